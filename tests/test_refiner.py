"""The SDXL refiner: its single file (probe, configs, loading), its conditioning (OpenCLIP bigG alone,
aesthetic-score time ids, checked against diffusers' StableDiffusionXLImg2ImgPipeline bit for bit),
and A1111's mid-sampling switch to a refiner (``refiner_checkpoint`` + ``refiner_switch_at``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from studio.devices import resolve_policy
from studio.errors import RequestError
from studio.generation.samplers import effective_schedule, make_scheduler, split_sampler_name
from studio.generation.sampling import (
    BatchSpec,
    RefinerSwitch,
    added_time_ids,
    convert_prediction,
    group_time_ids,
    refiner_due,
    sample,
    timestep_sigmas,
)
from studio.generation.step_callbacks import StepCallback
from studio.jobs import JobState
from studio.models.arch import derive_configs
from studio.models.catalog import CheckpointInfo
from studio.models.ldm_keys import UNET_PREFIX, unet_to_ldm
from studio.models.loader import load_checkpoint, read_checkpoint, reuse_model
from studio.models.probe import REFINER_TE, probe_checkpoint
from studio.networks.embeddings import Embedding
from studio.prompts.encode import TextConditioner
from studio.prompts.schedule import ConditioningPlan
from studio.testing.factory import make_checkpoint, make_diffusers_folder, pipeline_class, tiny_components

POLICY = resolve_policy(device="cpu", no_half=True)
PROMPT, NEGATIVE, STEPS = "a house by a lake", "blurry", 4


def _load(path: Path, root: Path):
    return load_checkpoint(CheckpointInfo(path=path, name=path.name), POLICY, root / "configs")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("refiner")


@pytest.fixture(scope="module")
def refiner_file(root) -> Path:
    return make_checkpoint(root / "tiny-refiner.safetensors", "sdxl-refiner", seed=1)


@pytest.fixture(scope="module")
def refiner(root, refiner_file):
    return _load(refiner_file, root)


@pytest.fixture(scope="module")
def base(root):
    return _load(make_checkpoint(root / "tiny-sdxl.safetensors", "sdxl", seed=1), root)


def plan_for(model) -> ConditioningPlan:
    return ConditioningPlan(model.conditioner, PROMPT, NEGATIVE, STEPS, 1)


def spec_for(model, sampler_name: str = "Euler", **changes) -> BatchSpec:
    sampler, schedule = split_sampler_name(sampler_name, "Automatic")
    settings = {"steps": STEPS, "cfg_scale": 7.0, "eta": None, "width": 64, "height": 64, "seeds": [5]}
    return BatchSpec(plan=plan_for(model), sampler=sampler, schedule=effective_schedule(sampler, schedule),
                     **(settings | changes))


def run(model, spec: BatchSpec) -> torch.Tensor:
    return sample(model, spec, JobState("job", "refiner test"))


class Loads:
    """A ``RefinerSwitch.load`` that counts its calls, as the lead's closure records the refiner."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self):
        self.calls += 1
        return self.model, plan_for(self.model)


# --------------------------------------------------------------------------- the file


def test_the_tiny_refiner_has_the_real_layout(refiner_file):
    sd = load_file(refiner_file)
    assert not any(k.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.transformer.")) for k in sd)
    assert REFINER_TE + "text_projection" in sd and REFINER_TE + "transformer.resblocks.0.attn.in_proj_weight" in sd
    # label_emb takes 5 Fourier-embedded numbers + the pooled text (real: 5 * 256 + 1280 = 2560)
    assert sd[UNET_PREFIX + "label_emb.0.0.weight"].shape[1] == 5 * 8 + 64
    probe = probe_checkpoint({k: tuple(v.shape) for k, v in sd.items()})
    assert (probe.family, probe.variant, probe.label) == ("sdxl-refiner", "base", "SDXL refiner")
    assert probe.has_text_encoder and probe.has_vae


def test_diffusers_reads_the_tiny_refiner_file(root, refiner_file):
    """The file is the layout diffusers' own single-file loader reads as a refiner."""
    components = tiny_components("sdxl-refiner", seed=1)
    folder = make_diffusers_folder(root / "diffusers-refiner", "sdxl-refiner", components=components)
    pipe = pipeline_class("sdxl-refiner").from_single_file(str(refiner_file), config=str(folder),
                                                           local_files_only=True)
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score
    for name in ("unet", "vae", "text_encoder_2"):
        want, got = components[name].state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name


def test_the_refiner_loads(refiner, refiner_file):
    assert refiner.family == "sdxl-refiner" and refiner.is_sdxl and refiner.is_refiner
    assert [type(te).__name__ for te in refiner.text_encoders] == ["CLIPTextModelWithProjection"]
    assert refiner.text_widths == {"clip_g": 64}
    assert refiner.tokenizers[0].pad_token == "!"
    config = refiner.unet.config
    assert (config.addition_time_embed_dim, config.projection_class_embeddings_input_dim) == (8, 104)
    assert config.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D"]
    want = tiny_components("sdxl-refiner", seed=1)
    for name, module in (("unet", refiner.unet), ("vae", refiner.vae), ("text_encoder_2", refiner.text_encoders[0])):
        expected = want[name].state_dict()
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in expected.items()), name


def test_a_refiner_diffusers_folder_loads(root):
    folder = make_diffusers_folder(root / "folder-refiner", "sdxl-refiner", seed=2)
    info = CheckpointInfo(path=folder, name=folder.name, is_diffusers=True)
    model = load_checkpoint(info, POLICY, root / "configs")
    assert model.family == "sdxl-refiner" and model.text_widths == {"clip_g": 64}
    assert model.tokenizers[0].pad_token == "!"


def test_a_second_refiner_reuses_the_modules(root, refiner_file):
    first = _load(refiner_file, root)
    other = make_checkpoint(root / "other-refiner.safetensors", "sdxl-refiner", seed=2)
    ckpt = read_checkpoint(CheckpointInfo(path=other, name=other.name), root / "configs")
    reused = reuse_model(first, ckpt, POLICY)
    fresh = _load(other, root)
    for a, b in zip(reused.modules, fresh.modules):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_full_size_refiner_shapes_give_its_diffusers_config():
    """Stability AI's refiner (stabilityai/stable-diffusion-xl-refiner-1.0 unet/config.json), built
    empty: the config derived from its LDM shapes builds the same parameters."""
    from accelerate import init_empty_weights

    real = {"block_out_channels": (384, 768, 1536, 1536), "attention_head_dim": (6, 12, 24, 24),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": 4, "cross_attention_dim": 1280, "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2560, "sample_size": 128}
    with init_empty_weights():
        unet = UNet2DConditionModel(**real)
    shapes = {UNET_PREFIX + k: tuple(v.shape) for k, v in unet_to_ldm(unet.state_dict(), 2).items()}
    # the other components only need to be there: OpenCLIP bigG's projection gives the pooled width
    shapes |= {REFINER_TE + "text_projection": (1280, 1280), REFINER_TE + "token_embedding.weight": (49408, 1280),
               REFINER_TE + "positional_embedding": (77, 1280),
               REFINER_TE + "transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280)}
    shapes |= {f"first_stage_model.{k}": v for k, v in _sdxl_vae_shapes().items()}
    probe = probe_checkpoint(shapes)
    configs = derive_configs(shapes, probe)
    assert probe.family == "sdxl-refiner" and set(configs) == {"unet", "vae", "text_encoder_2"}
    derived = configs["unet"]
    assert (derived["addition_time_embed_dim"], derived["projection_class_embeddings_input_dim"]) == (256, 2560)
    with init_empty_weights():
        rebuilt = UNet2DConditionModel.from_config({k: v for k, v in derived.items() if not k.startswith("_")})
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}
    assert configs["text_encoder_2"]["hidden_size"] == 1280 and configs["text_encoder_2"]["projection_dim"] == 1280


def _sdxl_vae_shapes() -> dict[str, tuple[int, ...]]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    from studio.models.ldm_keys import vae_to_ldm

    with init_empty_weights():
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2)
    return {k: tuple(v.shape) for k, v in vae_to_ldm(vae.state_dict(), 4).items()}


# --------------------------------------------------------------------------- conditioning


def test_prompt_embeddings_are_bigg_penultimate_and_pooled(refiner):
    cond = refiner.conditioner.encode(PROMPT, 1)
    encoder, tokenizer = refiner.text_encoders[0], refiner.tokenizers[0]
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
    assert torch.equal(cond.embeds, out.hidden_states[-2]) and torch.equal(cond.pooled, out.text_embeds)


def test_textual_inversion_vectors_reach_the_refiner(refiner):
    vectors = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    plain = refiner.conditioner.encode("a tinyemb house", 1).embeds
    for key in ("clip_g", "default"):
        conditioner = TextConditioner(refiner, {"tinyemb": Embedding("tinyemb", Path("tinyemb.pt"), {key: vectors})})
        assert not torch.equal(conditioner.encode("a tinyemb house", 1).embeds, plain), key


def test_time_ids_are_diffusers_aesthetic_ids(refiner, base):
    spec = spec_for(refiner, width=64, height=96)
    pipe = StableDiffusionXLImg2ImgPipeline(vae=refiner.vae, text_encoder=None, text_encoder_2=refiner.text_encoders[0],
                                            tokenizer=None, tokenizer_2=refiner.tokenizers[0], unet=refiner.unet,
                                            scheduler=None, requires_aesthetics_score=True)
    positive, negative = pipe._get_add_time_ids((96, 64), (0, 0), (96, 64), 6.0, 2.5, (96, 64), (0, 0), (96, 64),
                                                torch.float32, text_encoder_projection_dim=64)
    ids = added_time_ids(refiner, spec)
    assert torch.equal(ids, torch.cat([negative, positive]))
    # the negative prompt's block gets the low score, every positive block the high one
    rows = group_time_ids(ids, groups=3, batch=2, has_negative=True)
    assert rows[:, 4].tolist() == [2.5, 2.5, 6.0, 6.0, 6.0, 6.0]
    assert group_time_ids(ids, groups=1, batch=2, has_negative=False)[:, 4].tolist() == [6.0, 6.0]
    assert added_time_ids(base, spec)[0].tolist() == [96, 64, 0, 0, 96, 64]


def test_refiner_sampling_equals_diffusers_img2img_at_full_strength(refiner):
    """Our loop on the refiner alone against StableDiffusionXLImg2ImgPipeline built from the loaded
    modules: strength 1.0 from the same latents and seed, Euler, 4 steps, CFG 7, bit for bit."""
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    spec = spec_for(refiner, init_latents=init, strength=1.0)
    ours = run(refiner, spec)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=refiner.vae, text_encoder=None, text_encoder_2=refiner.text_encoders[0], tokenizer=None,
        tokenizer_2=refiner.tokenizers[0], unet=refiner.unet,
        scheduler=make_scheduler(spec.sampler, spec.schedule, refiner.scheduler_config),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, image=init, strength=1.0, num_inference_steps=STEPS,
                  guidance_scale=7.0, generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert torch.equal(ours, theirs)


def test_the_aesthetic_score_changes_the_image(refiner):
    high = run(refiner, spec_for(refiner))
    low = run(refiner, spec_for(refiner, aesthetic_scores=(2.5, 2.5)))
    assert torch.isfinite(high).all() and not torch.equal(high, low)


# --------------------------------------------------------------------------- the switch


def test_switch_rule_is_a1111s_by_timestep():
    sampler, schedule = split_sampler_name("Euler", "Automatic")
    sigmas = timestep_sigmas(make_scheduler(sampler, effective_schedule(sampler, schedule),
                                            {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                             "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}))
    # completed ratio (999 - t) / 1000 for the timestep whose sigma is nearest
    assert refiner_due(float(sigmas[499]), 0.5, sigmas) and not refiner_due(float(sigmas[500]), 0.5, sigmas)
    assert refiner_due(float(sigmas[199]), 0.8, sigmas) and not refiner_due(float(sigmas[200]), 0.8, sigmas)
    assert not any(refiner_due(float(s), 1.0, sigmas) for s in sigmas)
    assert refiner_due(float(sigmas[999]), 0.0, sigmas) and not refiner_due(float("inf"), 0.0, sigmas)


class CallLog(StepCallback):
    def __init__(self):
        self.calls, self.steps = [], []

    def unet_kwargs(self, call):
        self.calls.append(call.index)
        return {}

    def on_step_end(self, step, tensors):
        self.steps.append(step.index)


def _count_calls(module, counter: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda *_: counter.append(1))


def test_switch_at_half_hands_over_once(base, refiner):
    plain = run(base, spec_for(base))
    loads, log = Loads(refiner), CallLog()
    base_calls, refiner_calls = [], []
    handles = [_count_calls(base.unet, base_calls), _count_calls(refiner.unet, refiner_calls)]
    try:
        switched = run(base, spec_for(base, refiner=RefinerSwitch(0.5, loads), callbacks=[log]))
    finally:
        for handle in handles:
            handle.remove()
    assert loads.calls == 1 and not torch.equal(switched, plain)
    # Euler's 4 steps run at timesteps 751, 501, 251, 1: completed 0.248, 0.498, 0.748, 0.998
    assert (len(base_calls), len(refiner_calls)) == (2, 2)
    # callbacks' UNet arguments are made for the first model only; every step still ends
    assert log.calls == [0, 1] and log.steps == [0, 1, 2, 3]


def test_switch_at_one_never_switches(base, refiner):
    loads = Loads(refiner)
    assert torch.equal(run(base, spec_for(base, refiner=RefinerSwitch(1.0, loads))), run(base, spec_for(base)))
    assert loads.calls == 0


def test_switch_at_zero_is_the_refiner_alone(base, refiner):
    loads = Loads(refiner)
    assert torch.equal(run(base, spec_for(base, refiner=RefinerSwitch(0.0, loads))), run(refiner, spec_for(refiner)))
    assert loads.calls == 1


@pytest.mark.parametrize("sampler_name", ["Heun", "DPM++ 2M", "DDIM"])
def test_switching_to_the_same_model_changes_nothing(base, sampler_name):
    """The scheduler and latents carry over the switch: a switch to the model itself is invisible."""
    spec, loads = spec_for(base, sampler_name), Loads(base)
    same = run(base, replace(spec, refiner=RefinerSwitch(0.5, loads)))
    assert torch.equal(same, run(base, spec)) and loads.calls == 1


def test_a_base_sdxl_refiner_gets_plain_sdxl_time_ids(root, base):
    path = make_checkpoint(root / "tiny-sdxl-2.safetensors", "sdxl", seed=2)
    loaded = []

    def load():
        # loaded at the switch, inside the loop: the model must not be made of inference tensors,
        # or it could never be patched (LoRA) or trained once cached
        loaded.append(_load(path, root))
        return loaded[0], plan_for(loaded[0])

    switched = run(base, spec_for(base, refiner=RefinerSwitch(0.5, load)))
    assert torch.isfinite(switched).all() and not torch.equal(switched, run(base, spec_for(base)))
    assert not any(p.is_inference() for p in loaded[0].unet.parameters())


def test_inpainting_models_refuse_a_refiner(root, base, refiner):
    inpaint = _load(make_checkpoint(root / "tiny-sdxl-inpaint.safetensors", "sdxl-inpaint", seed=1), root)
    with pytest.raises(RequestError, match="refiner"):
        run(inpaint, spec_for(inpaint, refiner=RefinerSwitch(0.5, Loads(refiner))))
    with pytest.raises(RequestError, match="inpainting"):
        run(base, spec_for(base, refiner=RefinerSwitch(0.5, Loads(inpaint))))


def test_prediction_conversion_between_eps_and_v():
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    for sigma in (0.03, 1.0, 14.6):
        a = 1 / np.sqrt(1 + sigma**2)
        x, v = a * x0 + sigma * a * eps, a * eps - sigma * a * x0
        torch.testing.assert_close(convert_prediction(v, x, sigma, "v_prediction", "epsilon"), eps)
        torch.testing.assert_close(convert_prediction(eps, x, sigma, "epsilon", "v_prediction"), v)
        assert convert_prediction(eps, x, sigma, "epsilon", "epsilon") is eps
