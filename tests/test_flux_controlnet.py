"""FLUX.1 ControlNets: tiny diffusers-layout files (plain, Union, XLabs-style) probed and loaded offline,
and run by the studio's flow loop with the results of diffusers' own FluxControlNetPipeline."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxControlNetPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.controlnets.controlnet_flux import FluxMultiControlNetModel

from studio.controlnet.flux_controlnet import (
    FLUX_FAMILY,
    FluxControlGuidance,
    FluxControlUnit,
    flux_union_mode,
    is_flux_controlnet,
    load_flux_controlnet,
    probe_flux_controlnet,
)
from studio.controlnet.union import UNION
from studio.errors import RequestError
from studio.generation.dit_denoisers import FluxControl, FluxDenoiser, pack_latents
from studio.generation.noise import make_noise
from studio.models.state_dict import ModelFileError, load_state_dict, read_shapes
from studio.testing.dit_parts import T5_HIDDEN, clip_l_config
from studio.testing.flux import tiny_flux_components
from studio.testing.flux_controlnets import (
    UNION_NUM_MODE,
    make_flux_controlnet_file,
    make_flux_controlnet_folder,
    tiny_flux_controlnet,
)
from tests.helpers import flux_checkpoint, flux_latents

# the modules' own checks against diffusers; the engine-level tests of the same models run in the main command
pytestmark = pytest.mark.slow

SIZE = 64            # pixels: an 8x8 latent, 16 tokens
SEED = 7
GUIDANCE = 3.5
TOKENS = 8           # text tokens


@pytest.fixture(scope="module")
def parts():
    parts = tiny_flux_components("dev", seed=0)
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, TOKENS, T5_HIDDEN, generator=g)
    pooled = torch.randn(2, clip_l_config().hidden_size, generator=g)
    control = torch.rand(1, 3, SIZE, SIZE, generator=g)
    nets = {kind: tiny_flux_controlnet(kind, seed=i) for i, kind in enumerate(("plain", "union", "xlabs"))}
    nets["plain2"] = tiny_flux_controlnet("plain", seed=5)
    return SimpleNamespace(**parts, embeds=embeds, pooled=pooled, control=control, nets=nets)


def public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def run(parts, units: list[FluxControlUnit], steps: int = 3, cfg: float = 1.0, family: str = FLUX_FAMILY):
    return flux_latents(parts, [FluxControlGuidance(units)] if units else (), cfg, steps, SIZE, SEED, GUIDANCE,
                        flux_checkpoint(parts, family))


def unit(parts, kind: str = "plain", **fields) -> FluxControlUnit:
    if kind == "union":
        fields.setdefault("mode", 2)
    return FluxControlUnit(parts.nets[kind], parts.control, **fields)


class Counting:
    """Counts a ControlNet's forward calls."""

    def __init__(self, model, monkeypatch):
        self.calls = 0
        forward = model.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return forward(*args, **kwargs)

        monkeypatch.setattr(model, "forward", counted)


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("kind", ["plain", "union", "xlabs"])
def test_files_and_folders_load_as_diffusers_loads_them(parts, tmp_path, kind):
    model = parts.nets[kind]
    file = make_flux_controlnet_file(tmp_path / "diffusion_pytorch_model.safetensors", kind, model=model)
    folder = make_flux_controlnet_folder(tmp_path / "folder", kind, model=model)
    shapes = read_shapes(file)
    assert is_flux_controlnet(shapes)
    probe = probe_flux_controlnet(shapes, file.name)
    assert probe.family == FLUX_FAMILY and probe.label == "FLUX.1"
    assert probe.kind == (UNION if kind == "union" else "ControlNet")
    assert probe.num_mode == (UNION_NUM_MODE if kind == "union" else None)
    from_file = load_flux_controlnet(load_state_dict(file), torch.float32, "cpu", file.name)
    theirs = FluxControlNetModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    ours = load_flux_controlnet(folder, torch.float32, "cpu", "folder")
    assert public(from_file.config) == public(theirs.config)
    want = theirs.state_dict()
    for loaded in (from_file, ours):
        got = loaded.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_other_files_are_told_apart_and_xlabs_layout_is_refused():
    sd_controlnet = {"input_hint_block.0.weight": (16, 3, 3, 3), "input_blocks.0.0.weight": (32, 4, 3, 3)}
    assert not is_flux_controlnet(sd_controlnet)
    xlabs = {"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "controlnet_blocks.0.weight": (3072, 3072),
             "pos_embed_input.weight": (3072, 64)}
    assert not is_flux_controlnet(xlabs)
    with pytest.raises(ModelFileError, match="XLabs.*diffusers"):
        probe_flux_controlnet(xlabs, "flux-canny-controlnet-v3.safetensors")


# --------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("kind", ["plain", "union", "xlabs"])
def test_loop_matches_diffusers_flux_controlnet_pipeline(parts, monkeypatch, kind):
    got = run(parts, [unit(parts, kind, weight=0.8)])
    # the studio encodes the map to the distribution's mean (as its img2img does); the pipeline samples
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxControlNetPipeline(scheduler=scheduler, vae=parts.vae, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=parts.transformer,
                                  controlnet=parts.nets[kind])
    pipe.set_progress_bar_config(disable=True)
    noise, _ = make_noise([SEED], (16, SIZE // 8, SIZE // 8))
    want = pipe(prompt_embeds=parts.embeds[1:], pooled_prompt_embeds=parts.pooled[1:], height=SIZE, width=SIZE,
                control_image=parts.control * 2 - 1, control_mode=2 if kind == "union" else None,
                controlnet_conditioning_scale=0.8, num_inference_steps=3, guidance_scale=GUIDANCE,
                latents=pack_latents(noise), output_type="latent").images
    torch.testing.assert_close(pack_latents(got), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, run(parts, []), atol=1e-3)


def test_weight_zero_is_no_unit(parts):
    assert torch.equal(run(parts, [unit(parts, weight=0.0)]), run(parts, []))


def test_guidance_window_is_respected(parts, monkeypatch):
    counter = Counting(parts.nets["plain"], monkeypatch)
    late = run(parts, [unit(parts, guidance_start=0.5, guidance_end=1.0)], steps=4)
    assert counter.calls == 2           # steps 2 and 3 of 4: step / steps in [0.5, 1]
    early = run(parts, [unit(parts, guidance_start=0.0, guidance_end=0.3)], steps=4)
    assert counter.calls == 4           # + steps 0 and 1
    none = run(parts, [], steps=4)
    assert not torch.allclose(late, none, atol=1e-4) and not torch.allclose(early, late, atol=1e-4)


def test_union_mode_changes_the_result(parts):
    assert not torch.allclose(run(parts, [unit(parts, "union", mode=0)]), run(parts, [unit(parts, "union", mode=4)]),
                              atol=1e-4)


def test_units_add_up_as_diffusers_multi_controlnet(parts):
    a, b = parts.nets["plain"], parts.nets["plain2"]
    denoiser = FluxDenoiser(parts.transformer, torch.float32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=g)
    cond = torch.randn(1, (SIZE // 16) ** 2, 64, generator=g)
    t = torch.tensor(700.0)
    context, pooled = parts.embeds[1:], parts.pooled[1:]
    got = denoiser(x, t, context, pooled, GUIDANCE,
                   controlnets=[FluxControl(a, cond, 0.7), FluxControl(b, cond, 0.4)])
    # diffusers: both ControlNets' samples summed, then the transformer
    tokens = pack_latents(x)
    ids = torch.zeros(SIZE // 16, SIZE // 16, 3)
    ids[..., 1] = torch.arange(SIZE // 16)[:, None]
    ids[..., 2] = torch.arange(SIZE // 16)[None, :]
    common = dict(timestep=t.expand(1) / 1000, guidance=torch.full((1,), GUIDANCE), pooled_projections=pooled,
                  encoder_hidden_states=context, txt_ids=torch.zeros(TOKENS, 3), img_ids=ids.reshape(-1, 3))
    with torch.inference_mode():
        blocks, singles = FluxMultiControlNetModel([a, b])(
            hidden_states=tokens, controlnet_cond=[cond, cond], controlnet_mode=[torch.tensor([-1])] * 2,
            conditioning_scale=[0.7, 0.4], return_dict=False, **common)
        want = parts.transformer(hidden_states=tokens, controlnet_block_samples=blocks,
                                 controlnet_single_block_samples=singles, return_dict=False, **common)[0]
    torch.testing.assert_close(pack_latents(got), want, rtol=1e-5, atol=1e-5)
    # units with different block counts (Union: 2 double, no single) add up too
    mixed = run(parts, [unit(parts, weight=0.5), unit(parts, "union", weight=0.5)])
    assert not torch.allclose(mixed, run(parts, [unit(parts, weight=0.5)]), atol=1e-4)


def test_control_mode_2_leaves_the_negative_prompt_without_control(parts):
    balanced = run(parts, [unit(parts)], cfg=2.0)
    controlnet_first = run(parts, [unit(parts, control_mode=2)], cfg=2.0)
    assert not torch.allclose(balanced, controlnet_first, atol=1e-4)
    assert not torch.allclose(controlnet_first, run(parts, [], cfg=2.0), atol=1e-4)


def test_other_flow_families_refuse_controlnet_units(parts):
    with pytest.raises(RequestError, match="SD3.*controlnets"):
        run(parts, [unit(parts)], family="sd3")


def test_union_units_need_a_mode_and_plain_ones_take_none(parts):
    with pytest.raises(RequestError, match="control mode"):
        FluxControlUnit(parts.nets["union"], parts.control)
    with pytest.raises(RequestError, match="not a Union"):
        FluxControlUnit(parts.nets["plain"], parts.control, mode=1)
    assert flux_union_mode("Depth", "none", UNION_NUM_MODE) == 2
    assert flux_union_mode(None, "canny", UNION_NUM_MODE) == 0
    assert flux_union_mode("Unknown", "dw_openpose_full", UNION_NUM_MODE) == 4
    with pytest.raises(RequestError, match="union_control_type"):
        flux_union_mode(None, "none", UNION_NUM_MODE)


def test_kontext_reference_tokens_get_no_control(parts):
    denoiser = FluxDenoiser(parts.transformer, torch.float32)
    g = torch.Generator().manual_seed(4)
    x, reference = torch.randn(2, 1, 16, SIZE // 8, SIZE // 8, generator=g)
    cond = torch.randn(1, (SIZE // 16) ** 2, 64, generator=g)
    args = (x, torch.tensor(500.0), parts.embeds[1:], parts.pooled[1:], GUIDANCE, None, reference)
    plain = denoiser(*args)
    controlled = denoiser(*args, controlnets=[FluxControl(parts.nets["plain"], cond, 1.0)])
    assert controlled.shape == plain.shape and not torch.allclose(controlled, plain, atol=1e-4)
