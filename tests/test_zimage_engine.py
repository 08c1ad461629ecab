"""Z-Image (Turbo) through the studio's engine: ComfyUI's files (the NextDiT-named transformer in
``models/diffusion_models``, ``qwen_3_4b.safetensors`` in ``models/text_encoders``, FLUX.1's
``ae.safetensors`` in ``models/vae``, a GGUF in ``models/unet``) loaded by the real loader and
compared with diffusers' ``ZImagePipeline`` on the same modules and noise; configs derived from
the full-size shapes compared with the published ones; Qwen3 files classified as modules."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3Model

from studio.config import Flags
from studio.core import Studio
from studio.generation.infotext import parse_infotext
from studio.generation.noise import make_noise
from studio.generation.request import Txt2ImgRequest
from studio.models.dit_arch import dit_family, zimage_transformer_config
from studio.models.modules import kind_from_shapes, pick_modules, scan_modules
from studio.models.qwen3_text import qwen3_prompt, qwen3_text_config
from studio.models.state_dict import ModelFileError
from studio.testing.flux import make_flux_vae
from studio.testing.quantized import make_gguf_variant
from studio.testing.zimage import (
    make_qwen3,
    make_zimage_transformer,
    qwen3_state_dict,
    tiny_zimage_components,
    zimage_transformer_to_original,
)

TURBO = "z_image_turbo_fp32.safetensors"
BASE = "z_image_fp32.safetensors"
TURBO_GGUF = "z_image_turbo-Q8_0.gguf"
QWEN3 = "qwen_3_4b.safetensors"

# The published configs (the hub's config.json of Tongyi-MAI/Z-Image-Turbo's transformer/ and
# text_encoder/ (Qwen3-4B)).
ZIMAGE_TURBO_PUBLISHED = {
    "all_f_patch_size": [1], "all_patch_size": [2], "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
    "cap_feat_dim": 2560, "dim": 3840, "in_channels": 16, "n_heads": 30, "n_kv_heads": 30, "n_layers": 30,
    "n_refiner_layers": 2, "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0,
}
QWEN3_4B_PUBLISHED = {
    "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06, "attention_bias": False,
}


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("zimage")
    models = root / "models"
    parts = tiny_zimage_components(seed=3)
    turbo = make_zimage_transformer(models / "diffusion_models" / TURBO, components=parts, dtype=torch.float32)
    shutil.copy(turbo, models / "diffusion_models" / BASE)
    make_gguf_variant(turbo, models / "unet" / TURBO_GGUF, "Q8_0", arch="lumina2")
    make_qwen3(models / "text_encoders" / QWEN3, components=parts, dtype=torch.float32)
    make_flux_vae(models / "vae" / "ae.safetensors", components=parts)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def generate(studio, checkpoint: str = TURBO, **fields):
    base = {"prompt": "a red cube", "negative_prompt": "blurry", "width": 64, "height": 64, "seed": 7,
            "save_images": False, "override_settings": {"sd_model_checkpoint": checkpoint}}
    return studio.engine.submit(Txt2ImgRequest(**{**base, **fields})).wait()


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def pipeline(model) -> ZImagePipeline:
    """ZImagePipeline on the studio's own modules, with Z-Image-Turbo's scheduler config."""
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=model.vae,
                          text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], transformer=model.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def as_pixels(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.int16)


# --------------------------------------------------------------------------- the same pixels as diffusers


def test_turbo_from_comfyui_files_matches_zimage_pipeline(studio):
    result = generate(studio, steps=4, cfg_scale=1.0, sampler_name="Euler", scheduler="Simple")
    model = studio.engine.models.current
    assert (model.spec.id, model.probe.variant) == ("zimage", "turbo")
    assert model.modules_used == {"qwen3": QWEN3, "vae16": "ae.safetensors"}
    noise, _ = make_noise([7], (16, 8, 8))
    want = pipeline(model)("a red cube", height=64, width=64, num_inference_steps=4, guidance_scale=0.0,
                           latents=noise, output_type="np").images[0]
    assert np.abs(pixels(result.images[0]) - as_pixels(want)).max() <= 1
    assert pixels(result.images[0]).std() > 0


def test_cfg_with_a_negative_prompt_and_a_batch_matches_the_pipeline(studio):
    # prompt and negative prompt differ in length: each row of the batch keeps its own caption length
    result = generate(studio, steps=3, cfg_scale=3.0, batch_size=2, negative_prompt="blurry, dark, low quality")
    model = studio.engine.models.current
    noise, _ = make_noise([7, 8], (16, 8, 8))
    want = pipeline(model)("a red cube", negative_prompt="blurry, dark, low quality", height=64, width=64,
                           num_inference_steps=3, guidance_scale=2.0,   # the pipeline's g is CFG - 1
                           num_images_per_prompt=2, latents=noise, output_type="np").images
    for got, expected in zip(result.images, want, strict=True):
        assert np.abs(pixels(got) - as_pixels(expected)).max() <= 1


def test_emphasis_changes_the_caption_and_plain_prompts_tokenize_as_the_pipeline(studio):
    generate(studio, steps=1)
    tokenizer = studio.engine.models.current.tokenizers[0]
    templated = tokenizer.apply_chat_template([{"role": "user", "content": "a red cube, (dusk)"}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
    plain = qwen3_prompt(tokenizer, r"a red cube, \(dusk\)", 512, thinking=True)
    assert plain.ids == tokenizer(templated)["input_ids"] and set(plain.weights) == {1.0}
    # each piece is tokenized on its own, spaces kept with the word after them: the same ids here
    weighted = qwen3_prompt(tokenizer, "a (red:1.5) cube", 512, thinking=True)
    assert weighted.ids == qwen3_prompt(tokenizer, "a red cube", 512, thinking=True).ids
    assert weighted.weights.count(1.5) == 1 and weighted.count == 3
    a = generate(studio, steps=2, prompt="a red cube")
    b = generate(studio, steps=2, prompt="a (red:1.5) cube")
    assert not np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


# --------------------------------------------------------------------------- files, presets, refusals


@pytest.mark.slow  # heavy; CI's slow step runs it, the quick suite keeps the family's core tests
def test_presets_of_turbo_and_base(studio):
    turbo = parse_infotext(generate(studio).infotexts[0])       # API defaults: 50 steps, CFG 7
    assert (turbo["Steps"], turbo["CFG scale"], turbo["Sampler"]) == ("9", "1", "Euler")
    base = generate(studio, BASE, steps=2)
    assert studio.engine.models.current.probe.variant == "base"
    assert parse_infotext(base.infotexts[0])["CFG scale"] == "5"


@pytest.mark.slow  # heavy; CI's slow step runs it, the quick suite keeps the family's core tests
def test_gguf_transformer_dequantizes_on_compute(studio):
    result = generate(studio, TURBO_GGUF, steps=2)
    model = studio.engine.models.current
    assert model.spec.id == "zimage"
    assert model.unet.layers[0].attention.to_q.weight.quant_type.name == "Q8_0"
    assert np.isfinite(pixels(result.images[0])).all() and pixels(result.images[0]).std() > 0


@pytest.mark.slow  # heavy; CI's slow step runs it, the quick suite keeps the family's core tests
def test_prompt_length_is_counted_in_qwen3_tokens(studio):
    generate(studio, steps=1)
    short = studio.engine.token_counts("a red cube")
    long = studio.engine.token_counts("a red cube " * 200)
    (count, limit), = short.values()
    # the chat template takes 8 of ZImagePipeline's 512: <|im_start|> user \n ... <|im_end|> \n <|im_start|>
    # assistant \n
    assert count == 3 and limit == 512 - 8
    assert next(iter(long.values()))[0] == 600


@pytest.mark.slow  # heavy; the quick suite keeps this family's other engine tests
def test_a_qwen3_of_another_width_is_refused_by_name(studio, tmp_path):
    folder = studio.paths.models / "text_encoders"
    other = Qwen3Model(Qwen3Config(vocab_size=151936, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=24))
    save_file(qwen3_state_dict(other), str(folder / "qwen_3_8b.safetensors"))
    try:
        studio.engine.models.unload()
        with pytest.raises(ModelFileError, match="several files could be a Qwen3 text encoder"):
            generate(studio, steps=1)
        with pytest.raises(ModelFileError, match="48 wide.*reads 32-wide"):
            generate(studio, steps=1, override_settings={"sd_model_checkpoint": TURBO,
                                                         "forge_additional_modules": ["qwen_3_8b.safetensors"]})
    finally:
        (folder / "qwen_3_8b.safetensors").unlink()
        studio.engine.models.refresh()


# --------------------------------------------------------------------------- configs from shapes


def test_turbo_config_from_full_size_shapes_is_the_published_one():
    with init_empty_weights():
        real = ZImageTransformer2DModel.from_config(ZIMAGE_TURBO_PUBLISHED)
    for prefix in ("", "model.diffusion_model."):
        shapes = {prefix + k: tuple(v.shape) for k, v in zimage_transformer_to_original(real.state_dict()).items()}
        assert dit_family(shapes) == "zimage"
        assert json.loads(json.dumps(zimage_transformer_config(shapes, prefix))) == ZIMAGE_TURBO_PUBLISHED


def test_qwen3_4b_config_from_full_size_shapes_is_the_published_one():
    with init_empty_weights():
        real = Qwen3Model(Qwen3Config(**QWEN3_4B_PUBLISHED))
    shapes = {k: tuple(v.shape) for k, v in qwen3_state_dict(real).items()}       # ComfyUI's "model." names
    assert kind_from_shapes(shapes) == ("qwen3", None)
    derived = qwen3_text_config({k.removeprefix("model."): v for k, v in shapes.items()})
    assert {k: derived[k] for k in QWEN3_4B_PUBLISHED} == QWEN3_4B_PUBLISHED
    assert derived["rope_theta"] == 1_000_000.0


# --------------------------------------------------------------------------- Qwen3 as a module


def test_qwen3_files_are_classified_and_picked(tmp_path):
    parts = tiny_zimage_components(seed=4)
    make_qwen3(tmp_path / "text_encoders" / QWEN3, components=parts)
    bare = {k.removeprefix("model."): v for k, v in qwen3_state_dict(parts["text_encoder"]).items()}
    save_file(bare, str(tmp_path / "text_encoders" / "qwen3-transformers-names.safetensors"))
    found = scan_modules([tmp_path])
    assert [(m.name, m.kind, m.storage) for m in found] == [
        ("text_encoders/qwen3-transformers-names.safetensors", "qwen3", "fp32"),
        ("text_encoders/qwen_3_4b.safetensors", "qwen3", "bf16")]
    picked = pick_modules(["qwen3"], found, [QWEN3])
    assert picked["qwen3"].name == "text_encoders/" + QWEN3
    # llama.cpp's names (a GGUF Qwen3) are a Qwen3 too, which the loader then refuses by name
    assert kind_from_shapes({"token_embd.weight": (151936, 2560), "blk.0.attn_q_norm.weight": (128,)})[0] == "qwen3"
    # Qwen2.5 has no per-head q/k norms: not a Qwen3
    assert kind_from_shapes({"model.embed_tokens.weight": (151936, 2048),
                             "model.layers.0.self_attn.q_proj.weight": (2048, 2048)})[0] == "unknown"
