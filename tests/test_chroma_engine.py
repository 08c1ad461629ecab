"""Chroma through the studio's engine: a transformer-only file in models/diffusion_models completed
by T5-XXL and FLUX.1's ae.safetensors from the module folders, compared with diffusers' own
ChromaPipeline on the same modules and noise; the config derived from real-size shapes, the key
renaming against diffusers' converter, fp8 and GGUF Q8_0 files.

ChromaPipeline is given its own prompt encoding with the text mask as booleans: diffusers 0.42
passes that mask to the transformer as 0/1 floats, which attention adds to its logits instead of
masking with them (studio/families/chroma.py says more). Everything else -- the tokens, T5's
masked encoding, the schedule, the loop, CFG, packing, decoding -- is the pipeline's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file

from studio.config import Flags
from studio.core import Studio
from studio.families.chroma import ChromaDenoiser
from studio.generation.dit_denoisers import pack_latents
from studio.generation.infotext import parse_infotext
from studio.generation.noise import make_noise
from studio.generation.request import Txt2ImgRequest
from studio.models.chroma_keys import chroma_to_diffusers
from studio.models.dit_arch import chroma_transformer_config
from studio.models.dit_modules import on_meta
from studio.models.state_dict import ModelFileError
from studio.models.storage import storage_label
from studio.testing.chroma import (
    CHROMA_WIDTH,
    chroma_transformer_to_original,
    make_chroma_t5xxl,
    make_chroma_transformer,
    tiny_chroma_components,
)
from studio.testing.chroma import chroma_transformer_config as tiny_chroma_config
from studio.testing.flux import make_flux_vae
from studio.testing.quantized import make_fp8_variant, make_gguf_variant
from tests.test_factory_new_families import _at_width

CHROMA = "Chroma1-HD-fp32.safetensors"
CHROMA_FP8 = "Chroma1-HD-fp8.safetensors"
CHROMA_GGUF = "Chroma1-HD-Q8_0.gguf"
PROMPT, NEGATIVE = "a red cube", "blurry"


@pytest.fixture(scope="module")
def chroma():
    return tiny_chroma_components(seed=0)


@pytest.fixture(scope="module")
def studio(tmp_path_factory, chroma):
    root = tmp_path_factory.mktemp("chroma")
    models = root / "models"
    source = make_chroma_transformer(models / "diffusion_models" / CHROMA, components=chroma, dtype=torch.float32)
    make_fp8_variant(source, models / "diffusion_models" / CHROMA_FP8)
    make_gguf_variant(source, models / "unet" / CHROMA_GGUF, "Q8_0", arch="chroma")
    make_chroma_t5xxl(models / "text_encoders" / "t5xxl_fp16.safetensors", components=chroma, dtype=torch.float32)
    make_flux_vae(models / "vae" / "ae.safetensors", components=chroma)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def generate(studio, checkpoint: str, **fields):
    base = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": 64, "height": 64, "seed": 7,
            "save_images": False, "override_settings": {"sd_model_checkpoint": checkpoint}}
    return studio.engine.submit(Txt2ImgRequest(**{**base, **fields})).wait()


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def pipeline(model) -> ChromaPipeline:
    """diffusers' pipeline on the studio's modules, with the schedule Chroma1-HD's scheduler config gives."""
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = ChromaPipeline(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoders[0],
                          tokenizer=model.tokenizers[0], transformer=model.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- the same pixels as diffusers


def test_transformer_only_file_loads_with_t5_and_ae_from_the_module_folders(studio):
    result = generate(studio, CHROMA, steps=1)
    model = studio.engine.models.current
    assert model.spec.id == "chroma" and model.label
    assert model.modules_used == {"t5xxl": "t5xxl_fp16.safetensors", "vae16": "ae.safetensors"}
    assert isinstance(model.unet, ChromaTransformer2DModel) and len(model.text_encoders) == 1
    assert result.images[0].size == (64, 64)


def test_prompt_encoding_and_text_mask_are_chroma_pipelines(studio):
    generate(studio, CHROMA, steps=1)
    model = studio.engine.models.current
    embeds, _, mask, *_ = pipeline(model).encode_prompt(PROMPT, do_classifier_free_guidance=False)
    cond = model.conditioner.encode(PROMPT, 0)
    assert cond.embeds.shape == embeds.shape == (1, 512, model.text_encoders[0].config.d_model)
    torch.testing.assert_close(cond.embeds, embeds.float(), rtol=0, atol=1e-6)
    assert torch.equal(cond.pooled, mask.float())  # the prompt, EOS and one pad token
    assert model.conditioner.token_counts(PROMPT) == {"t5": (len(model.tokenizers[0](PROMPT).input_ids) - 1, 511)}


def test_generation_matches_diffusers_chroma_pipeline_with_cfg(studio):
    result = generate(studio, CHROMA, steps=4, cfg_scale=5.0, sampler_name="Euler", scheduler="Simple")
    model = studio.engine.models.current
    noise, _ = make_noise([7], (16, 8, 8))
    pipe = pipeline(model)
    embeds, _, mask, negative, _, negative_mask = pipe.encode_prompt(PROMPT, negative_prompt=NEGATIVE)
    want = pipe(prompt_embeds=embeds, prompt_attention_mask=mask.bool(), negative_prompt_embeds=negative,
                negative_prompt_attention_mask=negative_mask.bool(), height=64, width=64, num_inference_steps=4,
                guidance_scale=5.0, latents=pack_latents(noise), output_type="np").images[0]
    want = (want * 255).round().astype(np.int16)
    assert np.abs(pixels(result.images[0]) - want).max() <= 1
    params = parse_infotext(result.infotexts[0])
    assert params["CFG scale"] == "5" and "Distilled CFG Scale" not in params


def test_negative_prompt_counts_only_with_cfg(studio):
    a = generate(studio, CHROMA, steps=2, cfg_scale=3.0, negative_prompt="blurry")
    b = generate(studio, CHROMA, steps=2, cfg_scale=3.0, negative_prompt="sharp")
    c = generate(studio, CHROMA, steps=2, cfg_scale=1.0, negative_prompt="blurry")
    d = generate(studio, CHROMA, steps=2, cfg_scale=1.0, negative_prompt="sharp")
    assert not np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert np.array_equal(pixels(c.images[0]), pixels(d.images[0]))  # CFG 1: no negative pass


def test_a_batch_gives_the_images_of_its_seeds(studio):
    """Prompt and negative see different token counts: the denoiser runs them apart, the seeds together."""
    batch = generate(studio, CHROMA, steps=2, cfg_scale=4.0, batch_size=2)
    for image, seed in zip(batch.images, (7, 8), strict=True):
        alone = generate(studio, CHROMA, steps=2, cfg_scale=4.0, seed=seed)
        assert np.abs(pixels(image) - pixels(alone.images[0])).max() <= 1


def test_masked_pad_tokens_do_not_reach_the_image(chroma):
    """The text mask masks: what T5 left at the hidden pad positions changes nothing; a position
    the mask shows does (with diffusers' 0/1 float mask both would change the image)."""
    denoiser = ChromaDenoiser(chroma["transformer"], torch.float32)
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 16, 4, 4, generator=gen), torch.randn(1, 12, 96, generator=gen)
    mask = (torch.arange(12) < 5).float()[None]       # 4 tokens + EOS, then the visible pad
    t = torch.tensor(700.0)
    with torch.inference_mode():
        base = denoiser(x, t, context, mask, None)
        hidden = context.clone()
        hidden[:, 5:] = torch.randn(1, 7, 96, generator=gen)
        assert torch.allclose(denoiser(x, t, hidden, mask, None), base, atol=1e-5)
        one_more = (torch.arange(12) < 6).float()[None]
        assert not torch.allclose(denoiser(x, t, hidden, one_more, None), base, atol=1e-3)


def test_presets_are_chroma_pipelines_defaults(studio):
    result = generate(studio, CHROMA)   # steps, CFG and sampler left to the family
    params = parse_infotext(result.infotexts[0])
    assert (params["Steps"], params["CFG scale"], params["Sampler"]) == ("35", "5", "Euler")


# --------------------------------------------------------------------------- files and configs


def test_config_from_real_size_shapes_is_the_published_one():
    published = on_meta(ChromaTransformer2DModel)   # diffusers' defaults are Chroma1-HD's config
    shapes = {k: tuple(v.shape) for k, v in chroma_transformer_to_original(published.state_dict()).items()}
    config = chroma_transformer_config(shapes, "")
    built = on_meta(lambda: ChromaTransformer2DModel.from_config(config))
    public = {k: v for k, v in published.config.items() if not k.startswith("_")}
    assert {k: v for k, v in built.config.items() if not k.startswith("_")} == public
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in published.state_dict().items()}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_renaming_equals_diffusers_converter_at_the_tiny_width(tmp_path, chroma, prefix):
    path = make_chroma_transformer(tmp_path / "chroma.safetensors", prefix=prefix, components=chroma)
    weights = load_file(str(path))
    ours = chroma_to_diffusers(weights, prefix)
    theirs = _at_width(convert_chroma_transformer_checkpoint_to_diffusers, CHROMA_WIDTH)(dict(weights))
    assert set(ours) == set(theirs) == set(chroma["transformer"].state_dict())
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = chroma_transformer_config({k: tuple(v.shape) for k, v in weights.items()}, prefix)
    assert config == tiny_chroma_config()


def test_flux1_modulation_weights_are_refused():
    with pytest.raises(ModelFileError, match="Chroma transformer: no diffusers name known"):
        chroma_to_diffusers({"img_in.weight": torch.zeros(8, 4), "distilled_guidance_layer.in_proj.weight":
                             torch.zeros(8, 4), "double_blocks.0.img_mod.lin.weight": torch.zeros(48, 8)})


@pytest.fixture(scope="module")
def fp32_image(studio):
    return pixels(generate(studio, CHROMA, steps=2).images[0])


@pytest.mark.slow  # heavy; CI's slow step runs it, the quick suite keeps the family's core tests
def test_fp8_file_keeps_fp8_weights_close_to_the_fp32_model(studio, fp32_image):
    result = generate(studio, CHROMA_FP8, steps=2)
    transformer = studio.engine.models.current.unet
    assert storage_label(transformer) == "fp8_e4m3fn"
    assert transformer.single_transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert transformer.distilled_guidance_layer.in_proj.weight.dtype == torch.float8_e4m3fn
    # e4m3 keeps 3 bits of mantissa: the picture stays the fp32 model's, give or take rounding
    # (another seed is ~40 levels away on average)
    assert np.abs(pixels(result.images[0]) - fp32_image).mean() < 4


@pytest.mark.slow  # heavy; CI's slow step runs it, the quick suite keeps the family's core tests
def test_gguf_q8_file_dequantizes_on_compute_close_to_the_fp32_model(studio, fp32_image):
    result = generate(studio, CHROMA_GGUF, steps=2)
    transformer = studio.engine.models.current.unet
    assert transformer.single_transformer_blocks[0].attn.to_q.weight.quant_type.name == "Q8_0"
    assert transformer.distilled_guidance_layer.layers[0].linear_1.weight.quant_type.name == "Q8_0"
    assert np.abs(pixels(result.images[0]) - fp32_image).mean() < 2


def test_loras_are_refused_until_their_key_map_exists(studio):
    from studio.errors import RequestError

    with pytest.raises(RequestError, match="LoRAs"):
        studio.engine.submit(Txt2ImgRequest(prompt="a cube <lora:anything:1>", steps=1, width=64, height=64,
                                            save_images=False,
                                            override_settings={"sd_model_checkpoint": CHROMA})).wait()
