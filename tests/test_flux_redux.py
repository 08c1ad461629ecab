"""FLUX.1 Redux: SigLIP encoders and Redux files read from their real layouts, the tokens and the
sampling loop against diffusers' own Redux and FLUX pipelines, weight / window / CFG rows."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxPriorReduxPipeline
from PIL import Image
from transformers import SiglipImageProcessor

from studio.controlnet.clip_vision import (
    CLIP,
    SIGLIP,
    ClipVisionEncoders,
    encoder_kind,
    load_siglip_vision,
    siglip_vision_config,
)
from studio.controlnet.redux import (
    ReduxGuidance,
    ReduxUnit,
    downsample_tokens,
    is_redux_state_dict,
    load_redux,
    redux_probe,
)
from studio.errors import RequestError
from studio.generation.dit_denoisers import ExtraPromptTokens, FluxDenoiser, pack_latents
from studio.generation.noise import make_noise
from studio.generation.step_callbacks import ModelCall
from studio.models.state_dict import ModelFileError, load_state_dict, read_shapes
from studio.testing.dit_parts import T5_HIDDEN, clip_l_config
from studio.testing.flux import tiny_flux_components
from studio.testing.flux_adapters import (
    build_redux,
    build_siglip_vision,
    siglip_file_state,
    write_redux,
    write_siglip_vision,
)
from studio.testing.ip_adapters import write_clip_vision
from tests.helpers import flux_checkpoint, flux_latents

# the modules' own checks against diffusers (as test_flux_controlnet.py); the engine-level tests of the same
# models (tests/test_flux_adapters_engine.py) run in the main command
pytestmark = pytest.mark.slow

SIZE = 64
SEED = 7
GUIDANCE = 3.5
TOKENS = 8
ENCODER_SEED = 3
REDUX_SEED = 4


def reference() -> Image.Image:
    arr = np.zeros((48, 40, 3), np.uint8)
    arr[8:30, 5:25] = (250, 40, 10)
    arr[30:, 20:] = (10, 60, 240)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("redux")
    parts = tiny_flux_components("dev", seed=0)
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, TOKENS, T5_HIDDEN, generator=g)
    pooled = torch.randn(2, clip_l_config().hidden_size, generator=g)
    encoder_file = write_siglip_vision(root / "clip_vision" / "sigclip_vision_patch14_384.safetensors",
                                       seed=ENCODER_SEED)
    redux_file = write_redux(root / "style_models" / "flux1-redux-dev.safetensors", seed=REDUX_SEED)
    return SimpleNamespace(**parts, embeds=embeds, pooled=pooled, encoder_file=encoder_file, redux_file=redux_file,
                           encoders=ClipVisionEncoders([root / "clip_vision"]), redux=load_redux(redux_file))


def run(parts, units: list[ReduxUnit], cfg: float = 1.0, steps: int = 3) -> torch.Tensor:
    callbacks = [ReduxGuidance(units, parts.encoders)] if units else ()
    return flux_latents(parts, callbacks, cfg, steps, SIZE, SEED, GUIDANCE)


def unit(parts, **fields) -> ReduxUnit:
    return ReduxUnit(parts.redux, [reference()], **fields)


# --------------------------------------------------------------------------- files


def test_a_siglip_file_is_told_from_clip_and_loads_as_built(parts, tmp_path):
    built = build_siglip_vision(seed=ENCODER_SEED)
    shapes = read_shapes(parts.encoder_file)
    assert encoder_kind(shapes) == SIGLIP
    config = siglip_vision_config(shapes)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "hidden_act", "layer_norm_eps"):
        assert getattr(config, key) == getattr(built.config, key), key
    loaded = load_siglip_vision(parts.encoder_file)
    want = siglip_file_state(built)
    got = siglip_file_state(loaded)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    clip = write_clip_vision(tmp_path / "clip_vision_h.safetensors")
    assert encoder_kind(read_shapes(clip)) == CLIP


def test_encoders_pick_siglip_for_redux_and_clip_for_ip_adapters(parts, tmp_path):
    folder = tmp_path / "clip_vision"
    write_siglip_vision(folder / "sigclip.safetensors")
    write_clip_vision(folder / "clip_vision_h.safetensors", hidden=32, proj=24)
    encoders = ClipVisionEncoders([folder])
    assert {f.path.name: f.kind for f in encoders.files()} == {"sigclip.safetensors": SIGLIP,
                                                              "clip_vision_h.safetensors": CLIP}
    assert encoders.pick_siglip(32).path.name == "sigclip.safetensors"
    assert encoders.pick(32, True).path.name == "clip_vision_h.safetensors"   # SigLIP is never an IP-Adapter's
    with pytest.raises(RequestError, match="SigLIP.*1152.*sigclip_vision_patch14_384.*models/clip_vision"):
        encoders.pick_siglip(1152)
    assert isinstance(encoders.load(encoders.pick_siglip(32), torch.float32, "cpu"),
                      type(build_siglip_vision()))


def test_redux_files_load_by_their_names_and_shapes(parts, tmp_path):
    state = load_state_dict(parts.redux_file)
    assert is_redux_state_dict(state) and not is_redux_state_dict({"redux_up.weight": 0})
    want = build_redux(seed=REDUX_SEED).state_dict()
    got = parts.redux.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    probe = redux_probe(parts.redux)
    assert (probe.family, probe.kind, probe.context_dim) == ("flux1", "Redux", T5_HIDDEN)
    from safetensors.torch import save_file
    hidden = 2 * T5_HIDDEN   # BFL's is 3x the output
    odd = {"redux_up.weight": torch.zeros(hidden, 32), "redux_up.bias": torch.zeros(hidden),
           "redux_down.weight": torch.zeros(T5_HIDDEN, hidden), "redux_down.bias": torch.zeros(T5_HIDDEN)}
    save_file(odd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ModelFileError, match="not BFL's shape"):
        load_redux(tmp_path / "odd.safetensors")
    odd["redux_down.weight"] = torch.zeros(T5_HIDDEN, hidden + 1)
    save_file(odd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ModelFileError, match="redux_down takes"):
        load_redux(tmp_path / "odd.safetensors")


def test_downsampling_averages_square_blocks_of_the_token_grid():
    tokens = torch.arange(16 * 2, dtype=torch.float32).reshape(1, 16, 2)
    small = downsample_tokens(tokens, 2)
    grid = tokens.reshape(4, 4, 2)
    want = torch.stack([grid[r:r + 2, c:c + 2].mean(dim=(0, 1)) for r in (0, 2) for c in (0, 2)])
    assert torch.allclose(small[0], want)
    assert downsample_tokens(tokens, 1) is tokens


# --------------------------------------------------------------------------- the loop


def test_loop_matches_diffusers_redux_and_flux_pipelines(parts):
    got = run(parts, [unit(parts)])
    prior = FluxPriorReduxPipeline(image_encoder=build_siglip_vision(seed=ENCODER_SEED),
                                   feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
                                   image_embedder=build_redux(seed=REDUX_SEED))
    image_embeds = prior.image_embedder(prior.encode_image(reference(), "cpu", 1)).image_embeds
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=parts.vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=parts.transformer)
    pipe.set_progress_bar_config(disable=True)
    noise, _ = make_noise([SEED], (16, SIZE // 8, SIZE // 8))
    with torch.no_grad():
        want = pipe(prompt_embeds=torch.cat([parts.embeds[1:], image_embeds], dim=1),
                    pooled_prompt_embeds=parts.pooled[1:], height=SIZE, width=SIZE, num_inference_steps=3,
                    guidance_scale=GUIDANCE, latents=pack_latents(noise), output_type="latent").images
    torch.testing.assert_close(pack_latents(got), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, run(parts, []), atol=1e-3)


def test_weight_zero_is_no_unit_and_weight_and_downsampling_change_the_result(parts):
    plain = run(parts, [])
    assert torch.equal(run(parts, [unit(parts, weight=0.0)]), plain)
    full = run(parts, [unit(parts)])
    assert not torch.allclose(run(parts, [unit(parts, weight=0.5)]), full, atol=1e-4)
    assert not torch.allclose(run(parts, [unit(parts, downsampling=2)]), full, atol=1e-4)


def test_tokens_follow_the_window_and_add_up_over_units(parts):
    guidance = ReduxGuidance([unit(parts, guidance_start=0.5), unit(parts, weight=0.5)], parts.encoders)
    guidance.on_pass_start(SimpleNamespace(model=flux_checkpoint(parts)))

    def call(step: int, has_uncond: bool = False) -> ModelCall:
        return ModelCall(step, step, 4, None, 1.0, None, None, None, 2 if has_uncond else 1, 1, has_uncond)

    early = guidance.unet_kwargs(call(0))["prompt_tokens"]
    late = guidance.unet_kwargs(call(3, has_uncond=True))["prompt_tokens"]
    assert early.tokens.shape == (16, T5_HIDDEN) and late.tokens.shape == (32, T5_HIDDEN)
    assert torch.allclose(late.tokens[16:], early.tokens)   # the second unit's, at half weight
    assert torch.allclose(late.tokens[:16], early.tokens * 2)
    assert (early.uncond_rows, late.uncond_rows) == (0, 1)


def test_the_negative_rows_are_computed_without_the_image_tokens(parts):
    denoiser = FluxDenoiser(parts.transformer, torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 8, 8, generator=g).repeat(2, 1, 1, 1)
    t = torch.tensor(500.0)
    tokens = ExtraPromptTokens(torch.randn(4, T5_HIDDEN, generator=g), uncond_rows=1)
    with torch.no_grad():
        split = denoiser(x, t, parts.embeds, parts.pooled, GUIDANCE, prompt_tokens=tokens)
        without = denoiser(x, t, parts.embeds, parts.pooled, GUIDANCE)
        every_row = denoiser(x, t, parts.embeds, parts.pooled, GUIDANCE,
                             prompt_tokens=ExtraPromptTokens(tokens.tokens))
    torch.testing.assert_close(split[:1], without[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split[1:], every_row[1:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(split[1:], without[1:], atol=1e-4)


def test_a_unit_without_reference_image_is_refused(parts):
    guidance = ReduxGuidance([ReduxUnit(parts.redux, [])], parts.encoders)
    with pytest.raises(RequestError, match="no reference image"):
        guidance.on_pass_start(SimpleNamespace(model=flux_checkpoint(parts)))


def test_a_redux_file_on_another_family_is_refused_by_name(parts):
    from pathlib import Path

    from studio.controlnet.models import ControlNetInfo, LoadedControlNet, check_family

    loaded = LoadedControlNet(ControlNetInfo(Path("flux1-redux-dev.safetensors"), "flux1-redux-dev.safetensors"),
                              redux_probe(parts.redux), parts.redux)
    check_family(loaded, "flux1")
    for family, label in (("sd1", "SD1.x"), ("sdxl", "SDXL")):
        with pytest.raises(ModelFileError, match=f"Redux flux1-redux-dev.safetensors is for FLUX.1.*{label}"):
            check_family(loaded, family)
