"""The tiny SD3 / SD3.5 / FLUX.1 files load through diffusers' own single-file code, offline,
and give back exactly the weights they were made from.

diffusers 0.42's FLUX converters (transformer and kohya LoRA) hard-code the full model's
width: 3072 for q/k/v and 4 x 3072 for the MLP in a single block's fused ``linear1``. The
FLUX proofs run diffusers' own functions with those two constants set to the tiny width
(:func:`_at_width`); nothing else is changed.
"""

import types
from unittest import mock

import gguf
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FluxPipeline,
    FluxTransformer2DModel,
    GGUFQuantizationConfig,
    SD3Transformer2DModel,
)
from diffusers.loaders import lora_conversion_utils, lora_pipeline
from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    create_diffusers_clip_model_from_ldm,
    create_diffusers_t5_model_from_checkpoint,
    infer_diffusers_model_type,
    is_clip_sd3_model,
    is_open_clip_sd3_model,
    is_t5_in_single_file,
    load_single_file_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from studio.testing.flux import (
    FLUX_HEAD_DIM,
    FLUX_HEADS,
    FLUX_VARIANTS,
    flux_transformer_config,
    flux_transformer_to_bfl,
    make_clip_l,
    make_flux_checkpoint,
    make_flux_lora,
    make_flux_transformer,
    make_flux_vae,
    make_t5xxl,
    tiny_flux_components,
    write_flux_configs,
)
from studio.testing.quantized import make_fp8_variant, make_gguf_variant
from studio.testing.sd3 import (
    SD3_VARIANTS,
    make_sd3_checkpoint,
    make_sd3_transformer,
    tiny_sd3_components,
    write_sd3_configs,
)

FLUX_WIDTH = FLUX_HEAD_DIM * FLUX_HEADS
_FULL_FLUX_WIDTH = 3072


# --------------------------------------------------------------------------- helpers


def _patched_code(code: types.CodeType, width: int) -> types.CodeType:
    def const(value):
        if isinstance(value, types.CodeType):
            return _patched_code(value, width)
        if isinstance(value, tuple):
            return tuple(const(v) for v in value)
        if type(value) is int and value == _FULL_FLUX_WIDTH:
            return width
        if type(value) is int and value == 4 * _FULL_FLUX_WIDTH:
            return 4 * width
        return value

    return code.replace(co_consts=tuple(const(c) for c in code.co_consts))


def _at_width(function, width: int = FLUX_WIDTH):
    """``function`` (a diffusers FLUX converter) with its full-size width constants,
    nested functions included, replaced by ``width`` and ``4 * width``."""
    return types.FunctionType(_patched_code(function.__code__, width), function.__globals__,
                              function.__name__, function.__defaults__, function.__closure__)


def _tiny_flux_single_file():
    entry = SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    return mock.patch.dict(entry, {"checkpoint_mapping_fn": _at_width(entry["checkpoint_mapping_fn"])})


def _load_flux(path, configs, **kwargs):
    with _tiny_flux_single_file():
        return FluxTransformer2DModel.from_single_file(
            str(path), config=str(configs), subfolder="transformer", local_files_only=True, **kwargs)


def _assert_same_weights(expected: torch.nn.Module, loaded: torch.nn.Module, dtype=None):
    want, got = expected.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for key, value in want.items():
        value = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        assert not got[key].is_meta, f"{key} was not loaded"
        assert torch.equal(value, got[key].to(value.dtype)), key


def _keys(path):
    """name -> (dtype, shape) of each tensor in a safetensors file."""
    return {k: (v.dtype, tuple(v.shape)) for k, v in load_file(str(path)).items()}


# --------------------------------------------------------------------------- SD3


@pytest.fixture(scope="module")
def sd3_medium():
    return tiny_sd3_components("sd3-medium", seed=0)


@pytest.mark.parametrize("variant", SD3_VARIANTS)
def test_sd3_transformer_file_loads_exactly_with_diffusers(tmp_path, variant):
    components = tiny_sd3_components(variant, seed=3)
    path = make_sd3_transformer(tmp_path / "mmdit.safetensors", variant, components=components)
    keys = _keys(path)
    assert "joint_blocks.0.context_block.adaLN_modulation.1.bias" in keys  # diffusers' SD3 marker
    assert ("joint_blocks.0.x_block.attn.ln_q.weight" in keys) == (variant != "sd3-medium")
    assert ("joint_blocks.0.x_block.attn2.qkv.weight" in keys) == (variant == "sd3.5-medium")
    # the last block's context stream is pre-only: no output projection, no MLP
    assert "joint_blocks.1.context_block.mlp.fc1.weight" not in keys
    assert "joint_blocks.0.context_block.mlp.fc1.weight" in keys

    configs = write_sd3_configs(tmp_path / "configs", variant)
    loaded = SD3Transformer2DModel.from_single_file(
        str(path), config=str(configs), subfolder="transformer", local_files_only=True)
    _assert_same_weights(components["transformer"], loaded, torch.float16)


def test_sd3_all_in_one_file_loads_every_part_with_diffusers(tmp_path, sd3_medium):
    path = make_sd3_checkpoint(tmp_path / "sd3_medium_incl_clips_t5xxlfp16.safetensors",
                               components=sd3_medium, dtype=torch.float32)
    checkpoint = load_single_file_checkpoint(str(path))
    assert {k.split(".")[0] for k in checkpoint} == {"model", "first_stage_model", "text_encoders"}
    assert CHECKPOINT_KEY_NAMES["sd3"][1] in checkpoint
    assert is_clip_sd3_model(checkpoint) and is_open_clip_sd3_model(checkpoint)
    assert is_t5_in_single_file(checkpoint)
    configs = str(write_sd3_configs(tmp_path / "configs"))

    transformer = SD3Transformer2DModel.from_single_file(
        str(path), config=configs, subfolder="transformer", local_files_only=True)
    _assert_same_weights(sd3_medium["transformer"], transformer)
    vae = AutoencoderKL.from_single_file(str(path), config=configs, subfolder="vae", local_files_only=True)
    assert vae.config.latent_channels == 16
    _assert_same_weights(sd3_medium["vae"], vae)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, dict(checkpoint),
                                                       subfolder=name, config=configs, local_files_only=True)
        _assert_same_weights(sd3_medium[name], encoder)
    t5 = create_diffusers_t5_model_from_checkpoint(
        T5EncoderModel, dict(checkpoint), subfolder="text_encoder_3", config=configs, local_files_only=True)
    _assert_same_weights(sd3_medium["text_encoder_3"], t5)


def test_sd35_file_without_text_encoders_holds_mmdit_and_vae_only(tmp_path):
    path = make_sd3_checkpoint(tmp_path / "sd3.5_large.safetensors", "sd3.5-large", text_encoders=False)
    keys = _keys(path)
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model"}
    assert {dtype for dtype, _ in keys.values()} == {torch.float16}
    # 16-channel latent, no quant convs (the SD3 VAE has none)
    assert keys["first_stage_model.encoder.conv_out.weight"][1][0] == 2 * 16
    assert "first_stage_model.quant_conv.weight" not in keys


def test_sd3_files_are_a_function_of_the_seed(tmp_path):
    first = make_sd3_transformer(tmp_path / "a.safetensors", "sd3.5-medium", seed=5).read_bytes()
    again = make_sd3_transformer(tmp_path / "b.safetensors", "sd3.5-medium", seed=5).read_bytes()
    other = make_sd3_transformer(tmp_path / "c.safetensors", "sd3.5-medium", seed=6).read_bytes()
    assert first == again != other


# --------------------------------------------------------------------------- FLUX.1


@pytest.fixture(scope="module")
def flux_dev():
    return tiny_flux_components("dev", seed=0)


@pytest.fixture(scope="module")
def flux_configs(tmp_path_factory):
    return write_flux_configs(tmp_path_factory.mktemp("flux-configs"), "dev")


@pytest.mark.parametrize("variant", FLUX_VARIANTS)
def test_flux_transformer_file_loads_exactly_with_diffusers(tmp_path, variant):
    components = tiny_flux_components(variant, seed=2)
    path = make_flux_transformer(tmp_path / f"flux1-{variant}.safetensors", variant, components=components)
    checkpoint = load_single_file_checkpoint(str(path))
    # diffusers tells the variants apart by guidance_in and img_in's input width alone
    expected_type = {"dev": "flux-dev", "schnell": "flux-schnell", "fill": "flux-fill", "depth": "flux-depth"}
    assert infer_diffusers_model_type(checkpoint) == expected_type[variant]
    assert checkpoint["img_in.weight"].shape == (FLUX_WIDTH, flux_transformer_config(variant)["in_channels"])
    assert checkpoint["double_blocks.0.img_attn.norm.query_norm.scale"].shape == (FLUX_HEAD_DIM,)
    # one linear for q, k, v and the 4x wide MLP input
    assert checkpoint["single_blocks.0.linear1.weight"].shape == (7 * FLUX_WIDTH, FLUX_WIDTH)

    configs = write_flux_configs(tmp_path / "configs", variant)
    _assert_same_weights(components["transformer"], _load_flux(path, configs), torch.bfloat16)


def test_flux_fill_input_is_packed_latent_plus_masked_image_plus_mask():
    # 64 = 16 latent channels x 2 x 2; the 8x8 pixel mask becomes 64 channels per latent, x 4 packed
    assert flux_transformer_config("fill")["in_channels"] == 64 + 64 + 8 * 8 * 4 == 384
    assert flux_transformer_config("fill")["out_channels"] == 64


def test_flux_all_in_one_file_loads_every_part_with_diffusers(tmp_path, flux_dev, flux_configs):
    path = make_flux_checkpoint(tmp_path / "flux1-dev-full.safetensors", components=flux_dev,
                                dtype=torch.float32)
    checkpoint = load_single_file_checkpoint(str(path))
    assert {k.split(".")[0] for k in checkpoint} == {"model", "vae", "text_encoders"}
    assert infer_diffusers_model_type(checkpoint) == "flux-dev"
    assert is_clip_sd3_model(checkpoint) and is_t5_in_single_file(checkpoint)
    configs = str(flux_configs)

    _assert_same_weights(flux_dev["transformer"], _load_flux(path, configs))
    vae = AutoencoderKL.from_single_file(str(path), config=configs, subfolder="vae", local_files_only=True)
    _assert_same_weights(flux_dev["vae"], vae)
    clip = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, dict(checkpoint), subfolder="text_encoder", config=configs, local_files_only=True)
    _assert_same_weights(flux_dev["text_encoder"], clip)
    t5 = create_diffusers_t5_model_from_checkpoint(
        T5EncoderModel, dict(checkpoint), subfolder="text_encoder_2", config=configs, local_files_only=True)
    # ComfyUI's T5 has no encoder.embed_tokens copy, and diffusers 0.42 with transformers 5 leaves
    # that tied weight unloaded: re-tying it is up to the caller.
    assert t5.encoder.embed_tokens.weight.is_meta
    t5.tie_weights()
    _assert_same_weights(flux_dev["text_encoder_2"], t5)


def test_flux_vae_file_is_bfl_ae_layout_and_loads_with_diffusers(tmp_path, flux_dev, flux_configs):
    path = make_flux_vae(tmp_path / "ae.safetensors", components=flux_dev)
    keys = _keys(path)
    assert "encoder.conv_in.weight" in keys and "decoder.up.0.block.0.conv1.weight" in keys
    assert "quant_conv.weight" not in keys and "post_quant_conv.weight" not in keys
    assert keys["decoder.conv_in.weight"][1][1] == 16 and keys["encoder.conv_in.weight"][0] == torch.float32
    vae = AutoencoderKL.from_single_file(str(path), config=str(flux_configs), subfolder="vae",
                                         local_files_only=True)
    config = vae.config
    assert (config.latent_channels, config.scaling_factor, config.shift_factor) == (16, 0.3611, 0.1159)
    _assert_same_weights(flux_dev["vae"], vae)


def test_text_encoder_files_load_with_transformers(tmp_path, flux_dev, flux_configs):
    clip_path = make_clip_l(tmp_path / "text_encoders" / "clip_l.safetensors", components=flux_dev)
    t5_path = make_t5xxl(tmp_path / "text_encoders" / "t5xxl_fp16.safetensors", components=flux_dev)
    clip_keys, t5_keys = _keys(clip_path), _keys(t5_path)
    assert all(k.startswith("text_model.") for k in clip_keys)
    assert "shared.weight" in t5_keys and "encoder.embed_tokens.weight" not in t5_keys
    assert t5_keys["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"][1] == (32, 2)
    with_copy = make_t5xxl(tmp_path / "t5_copy.safetensors", components=flux_dev, embed_tokens_copy=True)
    assert "encoder.embed_tokens.weight" in _keys(with_copy)

    files = (("text_encoder", clip_path, CLIPTextModel), ("text_encoder_2", t5_path, T5EncoderModel))
    for name, path, cls in files:
        folder = tmp_path / f"{name}-model"
        folder.mkdir()
        (folder / "config.json").write_bytes((flux_configs / name / "config.json").read_bytes())
        (folder / "model.safetensors").symlink_to(path)
        loaded = cls.from_pretrained(str(folder), local_files_only=True)
        _assert_same_weights(flux_dev[name], loaded, torch.float16)


def test_flux_files_are_a_function_of_the_seed(tmp_path):
    first = make_flux_transformer(tmp_path / "a.safetensors", "schnell", seed=5).read_bytes()
    again = make_flux_transformer(tmp_path / "b.safetensors", "schnell", seed=5).read_bytes()
    other = make_flux_transformer(tmp_path / "c.safetensors", "schnell", seed=6).read_bytes()
    assert first == again != other


# --------------------------------------------------------------------------- fp8 and GGUF


@pytest.fixture(scope="module")
def flux_dev_file(tmp_path_factory, flux_dev):
    folder = tmp_path_factory.mktemp("flux")
    return make_flux_transformer(folder / "flux1-dev.safetensors", components=flux_dev)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_transformer_loads_with_diffusers(tmp_path, flux_dev, flux_dev_file, flux_configs, fp8):
    path = make_fp8_variant(flux_dev_file, tmp_path / "flux1-dev-fp8.safetensors", fp8)
    stored = {(len(shape), dtype) for dtype, shape in _keys(path).values()}
    assert stored == {(2, fp8), (1, torch.bfloat16)}

    loaded = _load_flux(path, flux_configs, torch_dtype=torch.float32)
    for key, value in flux_dev["transformer"].state_dict().items():
        stored = value.to(torch.bfloat16)
        stored = stored.to(fp8) if value.ndim >= 2 else stored
        assert torch.equal(stored.float(), loaded.state_dict()[key]), key

    everything = make_fp8_variant(flux_dev_file, tmp_path / "all.safetensors", fp8, vectors=True)
    assert len({dtype for dtype, _ in _keys(everything).values()}) == 1


def test_fp8_variant_of_an_all_in_one_file_casts_only_the_transformer(tmp_path, flux_dev):
    full = make_flux_checkpoint(tmp_path / "full.safetensors", components=flux_dev)
    fp8 = make_fp8_variant(full, tmp_path / "full-fp8.safetensors", only_prefix="model.diffusion_model.")
    for key, (dtype, shape) in _keys(fp8).items():
        cast = key.startswith("model.diffusion_model.") and len(shape) >= 2
        assert (dtype == torch.float8_e4m3fn) == cast, key


@pytest.mark.parametrize(("qtype", "prefix", "tolerance"),
                         [("Q8_0", "", 0.02), ("Q4_0", "model.diffusion_model.", 0.3)])
def test_gguf_transformer_loads_with_diffusers(tmp_path, flux_dev, flux_configs, qtype, prefix, tolerance):
    source = make_flux_transformer(tmp_path / "flux1-dev.safetensors", prefix=prefix, components=flux_dev)
    path = make_gguf_variant(source, tmp_path / f"flux1-dev-{qtype}.gguf", qtype)
    reader = gguf.GGUFReader(str(path))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "flux"
    types_by_name = {t.name: t.tensor_type.name for t in reader.tensors}
    assert set(types_by_name) == {k.removeprefix(prefix) for k in _keys(source)}  # BFL names, no prefix
    assert types_by_name["double_blocks.0.img_attn.qkv.weight"] == qtype
    assert types_by_name["double_blocks.0.img_attn.qkv.bias"] == "F32"
    assert types_by_name["single_blocks.0.norm.query_norm.scale"] == "F32"

    quantization = GGUFQuantizationConfig(compute_dtype=torch.float32)
    loaded = _load_flux(path, flux_configs, quantization_config=quantization)
    weight = loaded.single_transformer_blocks[0].proj_mlp.weight
    assert weight.quant_type.name == qtype
    reference = flux_dev["transformer"]
    assert torch.equal(loaded.transformer_blocks[0].attn.to_q.bias,
                       reference.transformer_blocks[0].attn.to_q.bias.to(torch.bfloat16).float())

    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, 96, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
    }
    with torch.no_grad():
        want, got = reference(**inputs).sample, loaded(**inputs).sample
    assert (want - got).abs().max() <= tolerance * want.abs().max()


# --------------------------------------------------------------------------- kohya LoRA


def test_kohya_flux_lora_converts_and_applies_with_diffusers(tmp_path, flux_dev):
    rank, alpha = 4, 2.0
    path = make_flux_lora(tmp_path / "kohya.safetensors", components=flux_dev, rank=rank, alpha=alpha,
                          dtype=torch.float32)
    keys = _keys(path)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert keys["lora_unet_single_blocks_3_linear1.lora_up.weight"][1] == (7 * FLUX_WIDTH, rank)
    assert keys["lora_unet_double_blocks_1_txt_mlp_2.alpha"][1] == ()

    with mock.patch.object(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers",
                           _at_width(lora_conversion_utils._convert_kohya_flux_lora_to_diffusers)):
        state_dict = FluxPipeline.lora_state_dict(str(path))
    transformer = tiny_flux_components("dev", seed=0)["transformer"]
    modules = dict(transformer.named_modules())
    targets = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in state_dict}
    assert all(k.startswith("transformer.") for k in state_dict)
    assert len(targets) == 2 * 14 + 4 * 6  # every linear of every block; fused layers split
    for target in targets:
        out_features, in_features = modules[target].weight.shape
        assert state_dict[f"transformer.{target}.lora_A.weight"].shape[1] == in_features
        assert state_dict[f"transformer.{target}.lora_B.weight"].shape[0] == out_features

    before = {name: modules[name].weight.detach().clone()
              for name in ("transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp")}
    transformer.load_lora_adapter(state_dict, prefix="transformer")
    transformer.fuse_lora()
    with safe_open(str(path), framework="pt") as file:
        def delta(module, rows):
            up = file.get_tensor(f"{module}.lora_up.weight")
            return alpha / rank * up[rows] @ file.get_tensor(f"{module}.lora_down.weight")

        k_rows = slice(FLUX_WIDTH, 2 * FLUX_WIDTH)
        mlp_rows = slice(3 * FLUX_WIDTH, 7 * FLUX_WIDTH)
        expected = {
            "transformer_blocks.0.attn.to_k": delta("lora_unet_double_blocks_0_img_attn_qkv", k_rows),
            "single_transformer_blocks.0.proj_mlp": delta("lora_unet_single_blocks_0_linear1", mlp_rows),
        }
    for name, change in expected.items():
        torch.testing.assert_close(modules[name].weight.detach() - before[name], change, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- renaming guards


def test_renaming_refuses_unknown_keys_and_incomplete_fused_tensors():
    with pytest.raises(KeyError, match="no original name"):
        flux_transformer_to_bfl({"transformer_blocks.0.attn.new_thing.weight": torch.zeros(2, 2)})
    partial = {f"transformer_blocks.0.attn.to_{x}.weight": torch.zeros(2, 2) for x in "qk"}
    with pytest.raises(KeyError, match="needs 3 fused parts"):
        flux_transformer_to_bfl(partial)
