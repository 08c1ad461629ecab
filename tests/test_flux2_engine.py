"""FLUX.2 Klein through the studio's engine: the files as BFL and ComfyUI share them (the transformer in
``models/diffusion_models``, ``qwen_3_4b.safetensors`` in ``models/text_encoders``, BFL's
``flux2-vae.safetensors`` with its nested quant convs in ``models/vae``, a GGUF in ``models/unet``)
loaded by the real loader and compared with diffusers' ``Flux2KleinPipeline`` on the same modules and
noise; configs derived from the full-size shapes compared with the published ones; FLUX.2's VAE
classified as module kind "vae32"; its schedule's shift and its latent codec against the pipeline's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from PIL import Image
from safetensors.torch import save_file

from studio.config import Flags
from studio.core import Studio
from studio.families.flux2 import Flux2LatentCodec
from studio.generation.flow_samplers import FlowShift, make_flow_scheduler
from studio.generation.infotext import parse_infotext
from studio.generation.noise import make_noise
from studio.generation.request import Img2ImgRequest, Txt2ImgRequest
from studio.models.dit_arch import dit_family, flux2_transformer_config, flux2_vae_config
from studio.models.modules import classify_module, kind_from_shapes, pick_modules
from studio.models.state_dict import ModelFileError
from studio.testing.flux2 import (
    flux2_transformer_to_bfl,
    flux2_vae_state_dict,
    make_flux2_transformer,
    make_flux2_vae,
    tiny_flux2_klein_components,
)
from studio.testing.quantized import make_gguf_variant
from studio.testing.zimage import make_qwen3

KLEIN = "flux-2-klein-4b-fp32.safetensors"
KLEIN_BASE = "flux-2-klein-base-4b-fp32.safetensors"
KLEIN_GGUF = "flux-2-klein-4b-Q8_0.gguf"
QWEN3 = "qwen_3_4b.safetensors"
VAE = "flux2-vae.safetensors"

# The published transformer configs (the hub's transformer/config.json of black-forest-labs/FLUX.2-klein-4B
# and -9B; the base models' are the same).
_KLEIN = {"patch_size": 1, "in_channels": 128, "out_channels": None, "timestep_guidance_channels": 256,
          "mlp_ratio": 3.0, "attention_head_dim": 128, "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000,
          "eps": 1e-06, "guidance_embeds": False}
KLEIN_PUBLISHED = {
    "4b": _KLEIN | {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680},
    "9b": _KLEIN | {"num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                    "joint_attention_dim": 12288},
}
# Klein's scheduler config: FluxPipeline-style dynamic shifting, with BFL's exponent given as mu.
KLEIN_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True}


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    models = root / "models"
    parts = tiny_flux2_klein_components(seed=5)
    klein = make_flux2_transformer(models / "diffusion_models" / KLEIN, components=parts, dtype=torch.float32)
    shutil.copy(klein, models / "diffusion_models" / KLEIN_BASE)
    make_gguf_variant(klein, models / "unet" / KLEIN_GGUF, "Q8_0", arch="flux2")
    make_qwen3(models / "text_encoders" / QWEN3, components=parts, dtype=torch.float32)
    make_flux2_vae(models / "vae" / VAE, components=parts)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


# Live previews are off in these generations: generation/preview.py's fit pools 8 pixels per latent
# cell, and FLUX.2's cells are 16 (see test_live_previews_of_klein below).
NO_PREVIEWS = {"live_previews_enable": False}


def generate(studio, checkpoint: str = KLEIN, **fields):
    base = {"prompt": "a red cube", "negative_prompt": "blurry", "width": 64, "height": 64, "seed": 7,
            "save_images": False, "override_settings": {"sd_model_checkpoint": checkpoint, **NO_PREVIEWS}}
    return studio.engine.submit(Txt2ImgRequest(**{**base, **fields})).wait()


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def as_pixels(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.int16)


def pipeline(model) -> Flux2KleinPipeline:
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER), vae=model.vae,
                              text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0],
                              transformer=model.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- the same pixels as diffusers


def test_distilled_klein_from_bfl_files_matches_the_klein_pipeline(studio):
    result = generate(studio, steps=4, cfg_scale=1.0, sampler_name="Euler", scheduler="Simple")
    model = studio.engine.models.current
    assert (model.spec.id, model.probe.variant) == ("flux2", "distilled")
    assert model.modules_used == {"qwen3": QWEN3, "vae32": VAE}
    noise, _ = make_noise([7], (128, 4, 4))       # the pipeline's latents: 2x2-patchified, 1/16 of the image
    want = pipeline(model)(prompt="a red cube", height=64, width=64, num_inference_steps=4, guidance_scale=1.0,
                           latents=noise, output_type="np").images[0]
    assert np.abs(pixels(result.images[0]) - as_pixels(want)).max() <= 1
    assert pixels(result.images[0]).std() > 0


@pytest.mark.slow  # heavy; the quick suite keeps this family's other engine tests
def test_base_klein_with_cfg_a_negative_prompt_and_a_batch_matches_the_pipeline(studio):
    result = generate(studio, KLEIN_BASE, steps=3, cfg_scale=3.0, batch_size=2)
    model = studio.engine.models.current
    assert model.probe.variant == "base"
    pipe = pipeline(model)
    negative, _ = pipe.encode_prompt("blurry", device=torch.device("cpu"))    # the pipeline repeats it per image
    noise, _ = make_noise([7, 8], (128, 4, 4))
    want = pipe(prompt="a red cube", negative_prompt_embeds=negative, height=64, width=64, num_inference_steps=3,
                guidance_scale=3.0, num_images_per_prompt=2, latents=noise, output_type="np").images
    for got, expected in zip(result.images, want, strict=True):
        assert np.abs(pixels(got) - as_pixels(expected)).max() <= 1


@pytest.mark.slow  # heavy; the quick suite keeps this family's other engine tests
def test_presets_of_distilled_and_base(studio):
    distilled = parse_infotext(generate(studio).infotexts[0])        # API defaults: 50 steps, CFG 7
    assert (distilled["Steps"], distilled["CFG scale"], distilled["Sampler"]) == ("4", "1", "Euler")
    base = parse_infotext(generate(studio, KLEIN_BASE).infotexts[0])
    assert (base["Steps"], base["CFG scale"]) == ("50", "4")


@pytest.mark.slow  # heavy; CI's slow step runs it, the quick suite keeps the family's core tests
def test_gguf_transformer_dequantizes_on_compute(studio):
    result = generate(studio, KLEIN_GGUF, steps=2)
    model = studio.engine.models.current
    assert model.spec.id == "flux2"
    assert model.unet.single_transformer_blocks[0].attn.to_qkv_mlp_proj.weight.quant_type.name == "Q8_0"
    assert np.isfinite(pixels(result.images[0])).all() and pixels(result.images[0]).std() > 0


@pytest.mark.slow  # heavy; CI's slow step runs it, the quick suite keeps the family's core tests
def test_img2img_encodes_through_the_latent_codec(studio):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    request = {"prompt": "a red cube", "width": 64, "height": 64, "seed": 3, "steps": 4, "save_images": False,
               "init_images": [init], "override_settings": {"sd_model_checkpoint": KLEIN, **NO_PREVIEWS}}
    near = studio.engine.submit(Img2ImgRequest(**request, denoising_strength=0.25)).wait().images[0]
    same = studio.engine.submit(Img2ImgRequest(**request, denoising_strength=0.0)).wait().images[0]
    far = studio.engine.submit(Img2ImgRequest(**request, denoising_strength=1.0)).wait().images[0]
    assert near.size == (64, 64)
    assert 0 < np.abs(pixels(near) - pixels(same)).mean() < np.abs(pixels(far) - pixels(same)).mean()


def test_flux2_dev_is_refused_by_name(studio):
    path = studio.paths.models / "diffusion_models" / "flux2-dev.safetensors"
    save_file({"single_stream_modulation.lin.weight": torch.zeros(4, 2),
               "guidance_in.in_layer.weight": torch.zeros(4, 2)}, str(path))
    studio.engine.models.refresh()
    try:
        with pytest.raises(ModelFileError, match="FLUX.2 dev needs the Mistral"):
            generate(studio, path.name, steps=1)
    finally:
        path.unlink()
        studio.engine.models.refresh()


def test_live_previews_of_klein(studio):
    result = generate(studio, steps=2, override_settings={"sd_model_checkpoint": KLEIN})
    assert result.images[0].size == (64, 64)
    preview = studio.engine.models.current.previewer(torch.randn(128, 4, 4))   # 16 pixels per latent cell
    assert preview.size == (64, 64)


# --------------------------------------------------------------------------- schedule and latents


@pytest.mark.parametrize(("tokens", "steps"), [(16, 4), (4096, 4), (4096, 50), (16384, 28)])
def test_empirical_shift_and_schedule_are_the_pipelines(tokens, steps):
    shift = FlowShift(dynamic=True, empirical_mu=True, flux_sigmas=True)
    assert shift.mu(tokens, steps) == compute_empirical_mu(tokens, steps)
    _, timesteps = make_flow_scheduler("Euler", "Simple", shift, steps, tokens)
    reference = FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(tokens, steps))
    assert torch.equal(timesteps, reference.timesteps)


def test_latent_codec_is_the_pipelines_normalisation():
    vae = tiny_flux2_klein_components(seed=6)["vae"]
    codec = Flux2LatentCodec(vae)
    latents = torch.randn(2, 32, 8, 6)
    packed = codec.from_vae(latents)
    patched = Flux2KleinPipeline._patchify_latents(latents)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    assert packed.shape == (2, 128, 4, 3)
    torch.testing.assert_close(packed, (patched - mean) / std)
    torch.testing.assert_close(codec.to_vae(packed), latents)


# --------------------------------------------------------------------------- configs from shapes


@pytest.mark.parametrize("size", ["4b", "9b"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_klein_config_from_full_size_shapes_is_the_published_one(size, prefix):
    with init_empty_weights():
        real = Flux2Transformer2DModel.from_config(KLEIN_PUBLISHED[size])
    shapes = {prefix + k: tuple(v.shape) for k, v in flux2_transformer_to_bfl(real.state_dict()).items()}
    assert dit_family(shapes) == "flux2"
    assert kind_from_shapes(shapes) == ("transformer", "flux2")
    assert json.loads(json.dumps(flux2_transformer_config(shapes, prefix))) == KLEIN_PUBLISHED[size]


def test_vae_config_from_full_size_shapes_is_the_published_one():
    with init_empty_weights():
        real = AutoencoderKLFlux2()              # its defaults are FLUX.2's published VAE config
    shapes = {k: tuple(v.shape) for k, v in flux2_vae_state_dict(real, nested_quant_convs=False).items()}
    published = {k: v for k, v in real.config.items() if not k.startswith("_")}
    derived = flux2_vae_config(shapes, "")
    assert json.loads(json.dumps(derived)) == json.loads(json.dumps(published))


# --------------------------------------------------------------------------- the VAE as a module


def test_flux2_vae_files_are_classified_and_picked(tmp_path):
    parts = tiny_flux2_klein_components(seed=7)
    nested = classify_module(make_flux2_vae(tmp_path / VAE, components=parts))
    top = classify_module(make_flux2_vae(tmp_path / "ae-top-level.safetensors", components=parts,
                                         nested_quant_convs=False))
    assert (nested.kind, top.kind) == ("vae32", "vae32")
    assert pick_modules(["vae32"], [nested])["vae32"] is nested
    with pytest.raises(ModelFileError, match="FLUX.2 VAE.*flux2-vae.safetensors"):
        pick_modules(["vae32"], [])
