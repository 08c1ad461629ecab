"""SD3 / SD3.5 / FLUX.1 configs from tensor shapes, and FLUX.1's BFL -> diffusers renaming.

The derived configs are checked against the configs the tiny test files were built from
and, for full size, against diffusers' published configs: the real models are built on
the meta device and renamed to their original layouts, so only their shapes are used.
The renaming is checked against the tiny models' own weights and against diffusers' own
converter with its hard-coded width set to the tiny one (``_at_width``).
"""

import json

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, GGUFQuantizationConfig, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    load_single_file_checkpoint,
)
from diffusers.quantizers.gguf.utils import GGUFParameter
from safetensors.torch import load_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from studio.models.dit_arch import (
    SD3_SAMPLE_SIZE,
    TRANSFORMER_PREFIXES,
    VAE16_SAMPLE_SIZE,
    clip_text_config,
    component_prefixes,
    dit_family,
    flux_transformer_config,
    flux_variant,
    sd3_transformer_config,
    t5_encoder_config,
    vae16_config,
)
from studio.models.flux_keys import flux_to_diffusers
from studio.models.ldm_keys import vae_to_ldm
from studio.models.state_dict import ModelFileError, read_shapes
from studio.testing import dit_parts
from studio.testing import flux as tiny_flux
from studio.testing import sd3 as tiny_sd3
from studio.testing.quantized import make_fp8_variant, make_gguf_variant
from tests.test_factory_new_families import _at_width

PREFIX = "model.diffusion_model."
CLIP_L, CLIP_G, T5 = dit_parts.CLIP_L_PREFIX, dit_parts.CLIP_G_PREFIX, dit_parts.T5_PREFIX

# diffusers' published transformer configs (the hub's config.json of each repository).
_FLUX_REAL = {"patch_size": 1, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
              "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
              "axes_dims_rope": [16, 56, 56]}
FLUX_PUBLISHED = {
    "dev": _FLUX_REAL | {"in_channels": 64, "guidance_embeds": True},          # FLUX.1-dev
    "schnell": _FLUX_REAL | {"in_channels": 64, "guidance_embeds": False},     # FLUX.1-schnell
    "fill": _FLUX_REAL | {"in_channels": 384, "out_channels": 64, "guidance_embeds": True},
    "control": _FLUX_REAL | {"in_channels": 128, "out_channels": 64, "guidance_embeds": True},  # Depth
}
_SD3_REAL = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "attention_head_dim": 64,
             "joint_attention_dim": 4096, "pooled_projection_dim": 2048}
SD3_PUBLISHED = {
    "sd3-medium": _SD3_REAL | {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                               "pos_embed_max_size": 192},
    "sd3.5-large": _SD3_REAL | {"num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                                "pos_embed_max_size": 192, "qk_norm": "rms_norm"},
    "sd3.5-medium": _SD3_REAL | {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                                 "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                                 "dual_attention_layers": list(range(13))},
}


def _shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _meta(build, *args, **kwargs):
    """``build(*args, **kwargs)`` on the meta device: full-size shapes without memory or time. (Unlike
    accelerate's init_empty_weights this also skips SD3's 384^2-position sin/cos table.)"""
    with torch.device("meta"):
        return build(*args, **kwargs)


def _resolved(model) -> dict:
    """A diffusers model's config as its constructor saw it, tuples as lists."""
    def plain(value):
        return list(value) if isinstance(value, tuple) else value

    return {k: plain(v) for k, v in model.config.items() if not k.startswith("_")}


def _bits(value):
    # torch.equal has no fp8 kernel on the CPU: compare their bytes.
    return value.view(torch.uint8) if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else value


def _same_tensors(want, got):
    assert set(want) == set(got)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(_bits(got[key]), _bits(value)), key


def _write_config(folder, class_name, config):
    path = folder / "transformer" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"_class_name": class_name, **config}))
    return str(folder)


# --------------------------------------------------------------------------- tiny files


@pytest.fixture(scope="module")
def flux_models():
    return {variant: tiny_flux.tiny_flux_components(variant, seed=1) for variant in tiny_flux.FLUX_VARIANTS}


@pytest.fixture(scope="module")
def sd3_models():
    return {variant: tiny_sd3.tiny_sd3_components(variant, seed=1) for variant in tiny_sd3.SD3_VARIANTS}


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("flux")


@pytest.fixture(scope="module")
def flux_checkpoint(flux_dir, flux_models):
    return tiny_flux.make_flux_checkpoint(flux_dir / "flux1-dev-full.safetensors", components=flux_models["dev"],
                                          dtype=torch.float32)


@pytest.fixture(scope="module")
def sd3_checkpoint(tmp_path_factory, sd3_models):
    return tiny_sd3.make_sd3_checkpoint(tmp_path_factory.mktemp("sd3") / "sd3_medium_incl_clips.safetensors",
                                        components=sd3_models["sd3-medium"], dtype=torch.float32)


# --------------------------------------------------------------------------- what a file holds


def test_components_of_sd3_files(tmp_path, sd3_models, sd3_checkpoint):
    shapes = read_shapes(sd3_checkpoint)
    assert component_prefixes(shapes) == {"transformer": PREFIX, "vae": "first_stage_model.",
                                          "clip_l": CLIP_L, "clip_g": CLIP_G, "t5xxl": T5}
    assert dit_family(shapes) == "sd3"
    no_te = tiny_sd3.make_sd3_checkpoint(tmp_path / "sd3.5_large.safetensors", components=sd3_models["sd3.5-large"],
                                         text_encoders=False)
    assert component_prefixes(read_shapes(no_te)) == {"transformer": PREFIX, "vae": "first_stage_model."}
    for prefix in TRANSFORMER_PREFIXES:
        alone = tiny_sd3.make_sd3_transformer(tmp_path / f"mmdit{len(prefix)}.safetensors", prefix=prefix,
                                              components=sd3_models["sd3.5-medium"])
        assert component_prefixes(read_shapes(alone)) == {"transformer": prefix}
        assert dit_family(read_shapes(alone)) == "sd3"


def test_components_of_flux_files(tmp_path, flux_models, flux_checkpoint):
    shapes = read_shapes(flux_checkpoint)
    assert component_prefixes(shapes) == {"transformer": PREFIX, "vae": "vae.", "clip_l": CLIP_L, "t5xxl": T5}
    assert dit_family(shapes) == "flux1"
    dev = flux_models["dev"]
    alone = read_shapes(tiny_flux.make_flux_transformer(tmp_path / "flux1-dev.safetensors", components=dev))
    assert component_prefixes(alone) == {"transformer": ""} and dit_family(alone) == "flux1"
    ae = read_shapes(tiny_flux.make_flux_vae(tmp_path / "ae.safetensors", components=dev))
    assert component_prefixes(ae) == {"vae": ""} and dit_family(ae) is None
    t5 = read_shapes(tiny_flux.make_t5xxl(tmp_path / "t5xxl.safetensors", components=dev))
    assert dit_family(t5) is None


@pytest.mark.parametrize("prefix", TRANSFORMER_PREFIXES)
def test_other_dit_families_are_told_by_their_markers(flux_checkpoint, prefix):
    flux = {prefix + k.removeprefix(PREFIX): v for k, v in read_shapes(flux_checkpoint).items()
            if k.startswith(PREFIX)}
    assert dit_family(flux) == "flux1"
    # Chroma and FLUX.2 files also have FLUX.1's double blocks.
    assert dit_family(flux | {prefix + "distilled_guidance_layer.in_proj.bias": (64,)}) == "chroma"
    assert dit_family(flux | {prefix + "single_stream_modulation.lin.weight": (192, 64)}) == "flux2"
    zimage = {prefix + "layers.0.adaLN_modulation.0.weight": (256, 64), prefix + "cap_embedder.1.weight": (64, 96)}
    assert dit_family(zimage) == "zimage"
    assert component_prefixes(zimage) == {"transformer": prefix}
    # Lumina 2's modulation has a SiLU first: ".1." is not Z-Image.
    lumina = {prefix + "layers.0.adaLN_modulation.1.weight": (256, 64), prefix + "cap_embedder.0.weight": (96,)}
    assert dit_family(lumina) is None and component_prefixes(lumina) == {}


# --------------------------------------------------------------------------- FLUX.1 configs


@pytest.mark.parametrize("prefix", TRANSFORMER_PREFIXES)
@pytest.mark.parametrize("variant", tiny_flux.FLUX_VARIANTS)
def test_flux_config_of_tiny_files(tmp_path, flux_models, variant, prefix):
    path = tiny_flux.make_flux_transformer(tmp_path / "t.safetensors", prefix=prefix,
                                           components=flux_models[variant])
    shapes = read_shapes(path)
    assert flux_transformer_config(shapes, prefix) == tiny_flux.flux_transformer_config(variant)
    assert flux_variant(shapes, prefix) == {"depth": "control"}.get(variant, variant)


@pytest.mark.parametrize("variant", FLUX_PUBLISHED)
def test_flux_config_of_real_shapes_is_the_published_one(variant):
    model = _meta(FluxTransformer2DModel, **FLUX_PUBLISHED[variant])
    shapes = _shapes(tiny_flux.flux_transformer_to_bfl(model.state_dict()))
    derived = flux_transformer_config(shapes, "")
    assert _resolved(_meta(FluxTransformer2DModel.from_config, derived)) == _resolved(model) | {
        "out_channels": model.out_channels}  # the published dev/schnell configs leave it to default
    assert flux_variant(shapes, "") == variant


def test_flux_variant_refuses_unknown_inputs():
    with pytest.raises(ModelFileError, match="96 input channels"):
        flux_variant({"img_in.weight": (64, 96)}, "")


# --------------------------------------------------------------------------- SD3 configs


@pytest.mark.parametrize("variant", tiny_sd3.SD3_VARIANTS)
def test_sd3_config_of_tiny_files_loads_them_exactly(tmp_path, sd3_models, variant):
    components = sd3_models[variant]
    path = tiny_sd3.make_sd3_transformer(tmp_path / "mmdit.safetensors", components=components,
                                         dtype=torch.float32)
    derived = sd3_transformer_config(read_shapes(path), "")
    expected = tiny_sd3.sd3_transformer_config(variant)
    # The default resolution is in no shape: the real models' 1024 px (the tiny files say 8 latents).
    assert derived["sample_size"] == SD3_SAMPLE_SIZE
    assert derived | {"sample_size": expected["sample_size"]} == expected

    configs = _write_config(tmp_path / "configs", "SD3Transformer2DModel", derived)
    loaded = SD3Transformer2DModel.from_single_file(str(path), config=configs, subfolder="transformer",
                                                    local_files_only=True)
    _same_tensors(components["transformer"].state_dict(), loaded.state_dict())


@pytest.mark.parametrize("variant", SD3_PUBLISHED)
def test_sd3_config_of_real_shapes_is_the_published_one(variant):
    config = SD3_PUBLISHED[variant]
    model = _meta(SD3Transformer2DModel, **config)
    shapes = _shapes(tiny_sd3.sd3_transformer_to_original(model.state_dict(), config["num_layers"]))
    derived = sd3_transformer_config(shapes, "")
    assert _resolved(_meta(SD3Transformer2DModel.from_config, derived)) == _resolved(model)


# --------------------------------------------------------------------------- text encoders and VAE


def _fields(config: dict, reference) -> None:
    reference = reference.to_dict()
    for key, value in config.items():
        if key != "architectures":
            assert value == reference[key], key


def test_text_encoder_configs_of_tiny_files(sd3_checkpoint, flux_checkpoint):
    shapes = read_shapes(sd3_checkpoint)
    clip_l = clip_text_config(shapes, CLIP_L, projection=True)
    clip_g = clip_text_config(shapes, CLIP_G, projection=True)
    t5 = t5_encoder_config(shapes, T5)
    _fields(clip_l, dit_parts.clip_l_config())
    _fields(clip_g, dit_parts.clip_g_config())
    _fields(t5, dit_parts.t5_config())
    assert (clip_l["hidden_act"], clip_g["hidden_act"]) == ("quick_gelu", "gelu")
    assert clip_g["architectures"] == ["CLIPTextModelWithProjection"]

    flux = read_shapes(flux_checkpoint)
    assert clip_text_config(flux, CLIP_L, projection=False) == clip_l | {"architectures": ["CLIPTextModel"]}
    assert t5_encoder_config(flux, T5) == t5
    # ComfyUI's T5 has no encoder.embed_tokens copy: the encoder must use the shared table.
    model = T5EncoderModel(T5Config(**t5))
    assert model.encoder.embed_tokens.weight is model.shared.weight


def test_text_encoder_configs_of_real_shapes():
    t5 = _meta(T5EncoderModel, T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                        feed_forward_proj="gated-gelu"))
    derived = t5_encoder_config(_shapes(t5.state_dict()), "")
    assert {k: derived[k] for k in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "vocab_size",
                                    "feed_forward_proj", "relative_attention_num_buckets")} == {
        "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
        "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}  # google/t5-v1_1-xxl

    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            hidden_act="quick_gelu", projection_dim=768)
    big_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           hidden_act="gelu", projection_dim=1280)
    l_shapes = _shapes(_meta(CLIPTextModel, clip_l).state_dict())
    g_shapes = _shapes(_meta(CLIPTextModelWithProjection, big_g).state_dict())
    # Inside the all-in-one files, and as bare files (ComfyUI's clip_l / clip_g.safetensors).
    for prefix in ("", CLIP_L):
        _fields(clip_text_config({prefix + k: v for k, v in l_shapes.items()}, prefix, False), clip_l)
    for prefix in ("", CLIP_G):
        _fields(clip_text_config({prefix + k: v for k, v in g_shapes.items()}, prefix, True), big_g)


def _vae_shapes(config, prefix=""):
    vae = _meta(AutoencoderKL, **config)
    ldm = vae_to_ldm(vae.state_dict(), len(config["block_out_channels"]))
    return {prefix + k: tuple(v.shape) for k, v in ldm.items()}


def test_vae16_configs_of_tiny_files(flux_dir, flux_models, sd3_checkpoint, flux_checkpoint):
    ae = tiny_flux.make_flux_vae(flux_dir / "ae.safetensors", components=flux_models["dev"])
    cases = [(read_shapes(ae), "", "flux"), (read_shapes(flux_checkpoint), "vae.", "flux1"),
             (read_shapes(sd3_checkpoint), "first_stage_model.", "sd3")]
    for shapes, prefix, family in cases:
        derived = vae16_config(shapes, prefix, family)
        expected = dit_parts.vae16_config("sd3" if family == "sd3" else "flux")
        assert derived["sample_size"] == VAE16_SAMPLE_SIZE  # the published configs' tiling tile
        got = _resolved(AutoencoderKL.from_config(derived | {"sample_size": expected["sample_size"]}))
        assert got == _resolved(AutoencoderKL(**expected))


def test_vae16_config_of_real_shapes_and_quant_convs():
    published = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16,
                 "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                 "sample_size": 1024, "use_quant_conv": False, "use_post_quant_conv": False}
    flux = published | {"scaling_factor": 0.3611, "shift_factor": 0.1159}  # FLUX.1-dev/vae
    sd3 = published | {"scaling_factor": 1.5305, "shift_factor": 0.0609}   # stable-diffusion-3-medium/vae
    for family, config in (("flux", flux), ("sd3", sd3)):
        derived = vae16_config(_vae_shapes(config, "vae."), "vae.", family)
        built = _meta(AutoencoderKL.from_config, derived)
        assert _resolved(built) == _resolved(_meta(AutoencoderKL, **config))
    # a file that keeps SD's quant convs gets them
    with_convs = vae16_config(_vae_shapes(flux | {"use_quant_conv": True, "use_post_quant_conv": True}), "", "flux")
    assert with_convs["use_quant_conv"] and with_convs["use_post_quant_conv"]
    with pytest.raises(ModelFileError, match="sd1"):
        vae16_config(_vae_shapes(flux), "", "sd1")


# --------------------------------------------------------------------------- FLUX.1 renaming


def _diffusers_converter(state_dict):
    """diffusers' own converter at the tiny width; it pops from what it is given."""
    return _at_width(convert_flux_transformer_checkpoint_to_diffusers)(dict(state_dict))


@pytest.mark.parametrize("prefix", TRANSFORMER_PREFIXES)
@pytest.mark.parametrize("variant", tiny_flux.FLUX_VARIANTS)
def test_flux_renaming_gives_the_diffusers_weights(tmp_path, flux_models, variant, prefix):
    path = tiny_flux.make_flux_transformer(tmp_path / "t.safetensors", prefix=prefix,
                                           components=flux_models[variant], dtype=torch.float32)
    state_dict = load_file(str(path))
    converted = flux_to_diffusers(state_dict, prefix)
    _same_tensors(flux_models[variant]["transformer"].state_dict(), converted)
    _same_tensors(_diffusers_converter(state_dict), converted)


def test_flux_renaming_of_an_all_in_one_file_takes_only_the_transformer(flux_models, flux_checkpoint):
    converted = flux_to_diffusers(load_file(str(flux_checkpoint)), PREFIX)
    _same_tensors(flux_models["dev"]["transformer"].state_dict(), converted)


def test_flux_renaming_refuses_what_it_does_not_know(flux_dir, flux_models):
    path = tiny_flux.make_flux_transformer(flux_dir / "schnell.safetensors", "schnell",
                                           components=flux_models["schnell"])
    state_dict = load_file(str(path))
    with pytest.raises(ModelFileError, match="double_blocks.0.img_attn.lora.weight"):
        flux_to_diffusers(state_dict | {"double_blocks.0.img_attn.lora.weight": torch.zeros(2, 2)})
    with pytest.raises(ModelFileError, match="linear1.weight"):
        flux_to_diffusers(state_dict | {"single_blocks.0.linear1.weight": torch.zeros(192, 64)})
    with pytest.raises(ModelFileError, match="img_in"):
        flux_to_diffusers(state_dict, PREFIX)


def test_flux_renamed_dict_loads_through_from_single_file(flux_dir, flux_models):
    components = flux_models["fill"]
    path = tiny_flux.make_flux_transformer(flux_dir / "fill.safetensors", "fill", components=components,
                                           dtype=torch.float32)
    state_dict = load_file(str(path))
    configs = _write_config(flux_dir / "fill-configs", "FluxTransformer2DModel",
                            flux_transformer_config(_shapes(state_dict), ""))
    loaded = FluxTransformer2DModel.from_single_file(flux_to_diffusers(state_dict), config=configs,
                                                     subfolder="transformer", local_files_only=True)
    _same_tensors(components["transformer"].state_dict(), loaded.state_dict())


@pytest.fixture(scope="module")
def flux_bf16_file(flux_dir, flux_models):
    return tiny_flux.make_flux_transformer(flux_dir / "flux1-dev.safetensors", components=flux_models["dev"])


def test_flux_renaming_keeps_gguf_quantization(flux_dir, flux_bf16_file):
    gguf_file = make_gguf_variant(flux_bf16_file, flux_dir / "flux1-dev-Q8_0.gguf", "Q8_0")
    checkpoint = load_single_file_checkpoint(str(gguf_file))
    converted = flux_to_diffusers(checkpoint)
    reference = _diffusers_converter(checkpoint)
    assert set(converted) == set(reference)
    for key, value in converted.items():
        assert type(value) is type(reference[key]), key
        if isinstance(value, GGUFParameter):
            assert value.quant_type == reference[key].quant_type, key
        assert torch.equal(torch.Tensor.as_subclass(value, torch.Tensor),
                           torch.Tensor.as_subclass(reference[key], torch.Tensor)), key
    q8 = {v.quant_type.name for v in converted.values() if isinstance(v, GGUFParameter)}
    assert q8 == {"Q8_0"}
    assert isinstance(converted["single_transformer_blocks.0.proj_mlp.weight"], GGUFParameter)
    assert isinstance(converted["norm_out.linear.weight"], GGUFParameter)  # the swapped halves

    shapes = {k: tuple(v.quant_shape if isinstance(v, GGUFParameter) else v.shape) for k, v in checkpoint.items()}
    configs = _write_config(flux_dir / "gguf-configs", "FluxTransformer2DModel", flux_transformer_config(shapes, ""))
    loaded = FluxTransformer2DModel.from_single_file(
        converted, config=configs, subfolder="transformer", local_files_only=True,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
    for key, value in loaded.state_dict().items():
        assert type(value) is type(converted[key]), key
        assert torch.equal(torch.Tensor.as_subclass(value, torch.Tensor),
                           torch.Tensor.as_subclass(converted[key], torch.Tensor)), key
    assert loaded.single_transformer_blocks[0].attn.to_q.weight.quant_type.name == "Q8_0"


def test_flux_renaming_keeps_fp8(flux_dir, flux_bf16_file):
    fp8_file = make_fp8_variant(flux_bf16_file, flux_dir / "flux1-dev-fp8.safetensors")
    state_dict = load_file(str(fp8_file))
    converted = flux_to_diffusers(state_dict)
    _same_tensors(_diffusers_converter(state_dict), converted)
    assert converted["norm_out.linear.weight"].dtype == torch.float8_e4m3fn
    assert converted["single_transformer_blocks.1.proj_mlp.weight"].dtype == torch.float8_e4m3fn
    assert converted["x_embedder.bias"].dtype == torch.bfloat16
