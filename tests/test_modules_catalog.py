"""Separate text encoders, VAEs and transformer-only diffusion models (studio.models.modules)
and ComfyUI's extra_model_paths.yaml (studio.models.extra_paths)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from studio.models.extra_paths import COMFY_TO_STUDIO, module_folders, read_extra_model_paths
from studio.models.modules import (
    ModuleChoiceError,
    ModuleFile,
    classify_module,
    clip_kind,
    kind_from_shapes,
    pick_modules,
    scan_modules,
)
from studio.models.state_dict import ModelFileError, read_safetensors_header
from studio.testing import (
    make_checkpoint,
    make_clip_l,
    make_flux_checkpoint,
    make_flux_transformer,
    make_flux_vae,
    make_fp8_variant,
    make_gguf_variant,
    make_sd3_checkpoint,
    make_sd3_transformer,
    make_t5xxl,
    make_vae,
    tiny_flux_components,
    tiny_sd3_components,
)
from studio.testing.dit_parts import cast, clip_state_dict, save_safetensors

# --------------------------------------------------------------------------- tiny files


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models/ tree holding every kind of module file, as Forge/ComfyUI users lay them out."""
    root = tmp_path_factory.mktemp("modules") / "models"
    te, vae, dm, ckpt = root / "text_encoder", root / "VAE", root / "diffusion_models", root / "Stable-diffusion"
    flux = tiny_flux_components("dev", seed=1)
    sd3 = tiny_sd3_components("sd3.5-large", seed=2)

    make_clip_l(te / "clip_l.safetensors", components=flux)
    save_safetensors(te / "clip_g.safetensors",
                     cast(clip_state_dict(sd3["text_encoder_2"], with_projection=True), torch.float16))
    make_t5xxl(te / "t5" / "t5xxl_fp16.safetensors", components=flux)
    make_fp8_variant(te / "t5" / "t5xxl_fp16.safetensors", te / "t5" / "t5xxl_fp8_e4m3fn.safetensors")
    make_gguf_variant(te / "t5" / "t5xxl_fp16.safetensors", te / "t5" / "t5-v1_1-xxl-encoder-Q8_0.gguf",
                      arch="t5encoder")

    make_flux_vae(vae / "ae.safetensors", components=flux)
    make_vae(vae / "sd15.vae.safetensors", "sd1", seed=3)

    make_flux_transformer(dm / "flux1-dev.safetensors", components=flux)
    make_fp8_variant(dm / "flux1-dev.safetensors", dm / "flux1-dev-fp8.safetensors")
    make_fp8_variant(dm / "flux1-dev.safetensors", dm / "flux1-dev-e5m2.sft", torch.float8_e5m2)
    make_gguf_variant(dm / "flux1-dev.safetensors", dm / "flux1-dev-Q8_0.gguf", "Q8_0")
    make_sd3_transformer(dm / "sd3.5_large.safetensors", components=sd3)
    make_gguf_variant(dm / "sd3.5_large.safetensors", dm / "sd3.5_large-Q4_0.gguf", "Q4_0", arch="sd3")

    make_flux_checkpoint(ckpt / "flux1-dev-aio.safetensors", components=flux)
    make_fp8_variant(ckpt / "flux1-dev-aio.safetensors", ckpt / "flux1-dev-aio-fp8.safetensors",
                     only_prefix="model.diffusion_model.")
    make_sd3_checkpoint(ckpt / "sd3.5_large_incl_clips.safetensors", components=sd3)
    make_checkpoint(ckpt / "sd15.safetensors", "sd1", seed=4)
    return root


@pytest.mark.parametrize(("relative", "kind", "family", "storage"), [
    ("text_encoder/clip_l.safetensors", "clip_l", None, "fp16"),
    ("text_encoder/clip_g.safetensors", "clip_g", None, "fp16"),
    ("text_encoder/t5/t5xxl_fp16.safetensors", "t5xxl", None, "fp16"),
    ("text_encoder/t5/t5xxl_fp8_e4m3fn.safetensors", "t5xxl", None, "fp8_e4m3fn"),
    ("text_encoder/t5/t5-v1_1-xxl-encoder-Q8_0.gguf", "t5xxl", None, "gguf Q8_0"),
    ("VAE/ae.safetensors", "vae16", None, "fp32"),
    ("VAE/sd15.vae.safetensors", "vae4", None, "fp32"),
    ("diffusion_models/flux1-dev.safetensors", "transformer", "flux1", "bf16"),
    ("diffusion_models/flux1-dev-fp8.safetensors", "transformer", "flux1", "fp8_e4m3fn"),
    ("diffusion_models/flux1-dev-e5m2.sft", "transformer", "flux1", "fp8_e5m2"),
    ("diffusion_models/flux1-dev-Q8_0.gguf", "transformer", "flux1", "gguf Q8_0"),
    ("diffusion_models/sd3.5_large.safetensors", "transformer", "sd3", "fp16"),
    ("diffusion_models/sd3.5_large-Q4_0.gguf", "transformer", "sd3", "gguf Q4_0"),
    ("Stable-diffusion/flux1-dev-aio.safetensors", "transformer", "flux1", "bf16"),
    ("Stable-diffusion/flux1-dev-aio-fp8.safetensors", "transformer", "flux1", "fp8_e4m3fn"),
    ("Stable-diffusion/sd3.5_large_incl_clips.safetensors", "transformer", "sd3", "fp16"),
    ("Stable-diffusion/sd15.safetensors", "unknown", None, "fp32"),
])
def test_tiny_files_are_classified(models, relative, kind, family, storage):
    module = classify_module(models / relative)
    assert (module.kind, module.family, module.storage) == (kind, family, storage)
    assert module.path == models / relative and module.name == Path(relative).name


def test_storage_of_an_all_in_one_is_its_transformers(models):
    # ComfyUI's fp8 checkpoints cast only the transformer; here most of the file's weights
    # (the 32,128-token T5 embedding) stay bf16, yet the transformer's fp8 is what counts.
    header = read_safetensors_header(models / "Stable-diffusion" / "flux1-dev-aio-fp8.safetensors")
    elements: dict[str, int] = {}
    for name, info in header.items():
        if name != "__metadata__" and len(info["shape"]) >= 2:
            elements[info["dtype"]] = elements.get(info["dtype"], 0) + int(np.prod(info["shape"]))
    assert elements["BF16"] > elements["F8_E4M3"]
    assert classify_module(models / "Stable-diffusion" / "flux1-dev-aio-fp8.safetensors").storage == "fp8_e4m3fn"


def _write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_t5_in_llama_cpp_names(tmp_path):
    vocab, width = 32128, 32
    path = _write_gguf(tmp_path / "t5xxl-Q8.gguf", "t5encoder", {
        "token_embd.weight": np.zeros((vocab, width), np.float16),
        "enc.blk.0.attn_q.weight": np.zeros((width, width), np.float16),
        "enc.output_norm.weight": np.zeros(width, np.float32),
    })
    module = classify_module(path)
    assert (module.kind, module.storage) == ("t5xxl", "gguf F16")
    # The same names with UMT5's vocabulary (Wan's text encoder) are no T5-XXL.
    umt5 = _write_gguf(tmp_path / "umt5.gguf", "t5encoder", {
        "token_embd.weight": np.zeros((256384, 4), np.float16),
        "enc.blk.0.attn_q.weight": np.zeros((4, 4), np.float16),
    })
    assert classify_module(umt5).kind == "unknown"


def test_gguf_architecture_names_a_transformer_whose_names_say_nothing(tmp_path):
    names = {"some.block.weight": np.zeros((4, 4), np.float32)}
    module = classify_module(_write_gguf(tmp_path / "a.gguf", "flux", names))
    assert (module.kind, module.family) == ("transformer", "flux1")
    assert classify_module(_write_gguf(tmp_path / "b.gguf", "llama", names)).kind == "unknown"


def test_unreadable_files_raise_model_file_error(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all")
    (tmp_path / "model.ckpt").write_bytes(b"")
    for name in ("broken.safetensors", "broken.gguf", "model.ckpt", "absent.safetensors", "absent.gguf"):
        with pytest.raises(ModelFileError):
            classify_module(tmp_path / name)


# --------------------------------------------------------------------------- rules on real shapes


def _hf_clip(width: int, layers: int, projection: bool, prefix: str = "") -> dict[str, tuple[int, ...]]:
    shapes = {
        "text_model.embeddings.token_embedding.weight": (49408, width),
        "text_model.embeddings.position_embedding.weight": (77, width),
        "text_model.final_layer_norm.weight": (width,),
    }
    for i in range(layers):
        shapes[f"text_model.encoder.layers.{i}.self_attn.q_proj.weight"] = (width, width)
        shapes[f"text_model.encoder.layers.{i}.mlp.fc1.weight"] = (4 * width, width)
    if projection:
        shapes["text_projection.weight"] = (width, width)
    return {prefix + k: v for k, v in shapes.items()}


@pytest.mark.parametrize("prefix", ["", "text_encoders.clip_l.transformer.", "cond_stage_model.transformer."])
def test_real_clip_l_and_bigg_are_told_apart_by_width(prefix):
    # FLUX/SD3 sets' clip_l.safetensors may carry a projection: still CLIP-L.
    assert kind_from_shapes(_hf_clip(768, 12, projection=False, prefix=prefix)) == ("clip_l", None)
    assert kind_from_shapes(_hf_clip(768, 12, projection=True, prefix=prefix)) == ("clip_l", None)
    assert kind_from_shapes(_hf_clip(1280, 32, projection=True, prefix=prefix)) == ("clip_g", None)
    assert kind_from_shapes(_hf_clip(1280, 32, projection=False, prefix=prefix)) == ("clip_g", None)
    # OpenCLIP-H (SD2's encoder) is neither.
    assert kind_from_shapes(_hf_clip(1024, 23, projection=True, prefix=prefix))[0] == "unknown"


def test_tiny_widths_fall_back_to_the_projection():
    assert clip_kind(32, has_projection=False) == "clip_l"
    assert clip_kind(64, has_projection=True) == "clip_g"
    assert clip_kind(1280, has_projection=False) == "clip_g"
    assert clip_kind(768, has_projection=True) == "clip_l"


def test_openclip_names_of_bigg():
    prefix = "conditioner.embedders.1.model."
    shapes = {
        prefix + "token_embedding.weight": (49408, 1280),
        prefix + "positional_embedding": (77, 1280),
        prefix + "text_projection": (1280, 1280),
        prefix + "transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
    }
    assert kind_from_shapes(shapes) == ("clip_g", None)


def _t5(width: int, vocab: int | None, names: str = "hf") -> dict[str, tuple[int, ...]]:
    if names == "hf":
        shapes = {"encoder.block.0.layer.0.SelfAttention.q.weight": (width, width)}
        return shapes | ({"shared.weight": (vocab, width)} if vocab else {})
    shapes = {"enc.blk.0.attn_q.weight": (width, width)}
    return shapes | ({"token_embd.weight": (vocab, width)} if vocab else {})


def test_t5_rules_on_real_shapes():
    assert kind_from_shapes(_t5(4096, 32128)) == ("t5xxl", None)
    assert kind_from_shapes(_t5(4096, 32128, "llama")) == ("t5xxl", None)
    assert kind_from_shapes(_t5(4096, None)) == ("t5xxl", None)
    assert kind_from_shapes({"text_encoders.t5xxl.transformer." + k: v for k, v in _t5(4096, 32128).items()})[0] \
        == "t5xxl"
    assert kind_from_shapes(_t5(4096, 256384))[0] == "unknown"      # UMT5-XXL
    assert kind_from_shapes(_t5(768, 32128))[0] == "unknown"        # T5 v1.1 base


def _vae(latent: int, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + "encoder.conv_in.weight": (128, 3, 3, 3),
            prefix + "decoder.conv_in.weight": (512, latent, 3, 3)}


@pytest.mark.parametrize("prefix", ["", "vae.", "first_stage_model."])
def test_vae_latent_channels(prefix):
    assert kind_from_shapes(_vae(16, prefix)) == ("vae16", None)
    assert kind_from_shapes(_vae(4, prefix)) == ("vae4", None)
    assert kind_from_shapes(_vae(32, prefix)) == ("vae32", None)  # FLUX.2's VAE
    assert kind_from_shapes(_vae(8, prefix))[0] == "unknown"


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_transformer_families(prefix):
    flux = {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (3072, 64)}

    def family(extra: dict[str, tuple[int, ...]]) -> tuple[str, str | None]:
        return kind_from_shapes({prefix + k: v for k, v in extra.items()})

    assert family(flux) == ("transformer", "flux1")
    assert family(flux | {"distilled_guidance_layer.in_proj.bias": (5120,)}) == ("transformer", "chroma")
    assert family(flux | {"single_stream_modulation.lin.weight": (18432, 6144)}) == ("transformer", "flux2")
    assert family({"joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}) == ("transformer", "sd3")
    zimage = {"layers.0.adaLN_modulation.0.weight": (15360, 256), "cap_embedder.0.weight": (2560,)}
    assert family(zimage) == ("transformer", "zimage")
    # Lumina 2 shares the caption embedder, not Z-Image's modulation layout.
    lumina = {"layers.0.adaLN_modulation.1.weight": (13824, 1024), "cap_embedder.0.weight": (2304,)}
    assert family(lumina)[0] == "unknown"


def test_several_parts_in_one_file_are_no_module():
    # An SD3 text-encoder bundle (CLIP-L + T5) fits no single slot.
    bundle = _hf_clip(768, 12, False, "text_encoders.clip_l.transformer.")
    bundle |= {"text_encoders.t5xxl.transformer." + k: v for k, v in _t5(4096, 32128).items()}
    assert kind_from_shapes(bundle)[0] == "unknown"
    # An SD1 checkpoint (UNet + VAE + CLIP) neither, though its VAE alone would be vae4.
    sd1 = _vae(4, "first_stage_model.") | {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    assert kind_from_shapes(sd1)[0] == "unknown"
    assert kind_from_shapes({})[0] == "unknown"


# --------------------------------------------------------------------------- scanning


def test_scan_finds_every_module_sorted_and_skips_what_it_cannot_read(models, tmp_path, caplog):
    folder = tmp_path / "text_encoder"
    shutil.copytree(models / "text_encoder", folder)
    shutil.copy(models / "VAE" / "ae.safetensors", folder / ".ae.safetensors.123.tmp")  # atomic_write's temp
    (folder / ".cache").mkdir()
    shutil.copy(models / "VAE" / "ae.safetensors", folder / ".cache" / "ae.safetensors")
    shutil.copy(models / "VAE" / "ae.safetensors", folder / "~ae.safetensors")
    (folder / "notes.txt").write_text("not a model")
    (folder / "AAA-broken.safetensors").write_bytes(b"\x00" * 4)

    with caplog.at_level(logging.WARNING, logger="studio.models.modules"):
        found = scan_modules([folder, folder / "t5", tmp_path / "absent"])

    assert [m.name for m in found] == [
        "clip_g.safetensors",
        "clip_l.safetensors",
        "t5/t5-v1_1-xxl-encoder-Q8_0.gguf",
        "t5/t5xxl_fp16.safetensors",
        "t5/t5xxl_fp8_e4m3fn.safetensors",
    ]
    assert [m.kind for m in found] == ["clip_g", "clip_l", "t5xxl", "t5xxl", "t5xxl"]
    assert all(m.path == folder / m.name for m in found)
    assert "AAA-broken.safetensors" in caplog.text


# --------------------------------------------------------------------------- picking


def _module(name: str, kind: str, folder: str = "/m/text_encoder") -> ModuleFile:
    return ModuleFile(path=Path(folder) / name, name=name, kind=kind,
                      family="flux1" if kind == "transformer" else None, storage="fp16")


CLIP_L = _module("clip_l.safetensors", "clip_l")
T5_FP16 = _module("t5xxl_fp16.safetensors", "t5xxl")
T5_FP8 = _module("fp8/t5xxl_fp8_e4m3fn.safetensors", "t5xxl")
AE = _module("ae.safetensors", "vae16", "/m/VAE")
SD_VAE = _module("vae-ft-mse.safetensors", "vae4", "/m/VAE")
FLUX = _module("flux1-dev.safetensors", "transformer", "/m/diffusion_models")


def test_single_files_are_picked_automatically():
    picked = pick_modules(["clip_l", "t5xxl", "vae16"], [SD_VAE, AE, T5_FP16, FLUX, CLIP_L])
    assert picked == {"clip_l": CLIP_L, "t5xxl": T5_FP16, "vae16": AE}
    assert list(picked) == ["clip_l", "t5xxl", "vae16"]


def test_several_candidates_need_a_choice():
    with pytest.raises(ModuleChoiceError) as e:
        pick_modules(["clip_l", "t5xxl"], [CLIP_L, T5_FP16, T5_FP8])
    message = str(e.value)
    assert "t5xxl_fp16.safetensors" in message and "fp8/t5xxl_fp8_e4m3fn.safetensors" in message
    assert '"VAE / Text Encoder"' in message and "forge_additional_modules" in message
    assert isinstance(e.value, ModelFileError)


@pytest.mark.parametrize("choice", [
    "fp8/t5xxl_fp8_e4m3fn.safetensors",   # the name in the selector
    "t5xxl_fp8_e4m3fn.safetensors",       # the bare file name
    "t5xxl_fp8_e4m3fn",                   # the stem
    "/m/text_encoder/fp8/t5xxl_fp8_e4m3fn.safetensors",  # the full path Forge saves
])
def test_a_choice_settles_it(choice):
    available = [CLIP_L, T5_FP16, T5_FP8, AE]
    picked = pick_modules(["clip_l", "t5xxl", "vae16"], available, [choice, "ae"])
    assert picked == {"clip_l": CLIP_L, "t5xxl": T5_FP8, "vae16": AE}


def test_choices_of_other_kinds_are_ignored():
    # The choice made for an SD1 model's VAE stays set when a FLUX model is loaded.
    picked = pick_modules(["vae16"], [AE, SD_VAE], ["vae-ft-mse.safetensors"])
    assert picked == {"vae16": AE}


def test_two_choices_of_one_kind():
    with pytest.raises(ModuleChoiceError, match="more than one T5-XXL") as e:
        pick_modules(["t5xxl"], [T5_FP16, T5_FP8], ["t5xxl_fp16", "t5xxl_fp8_e4m3fn"])
    assert "t5xxl_fp16.safetensors" in str(e.value) and "t5xxl_fp8_e4m3fn.safetensors" in str(e.value)


def test_a_choice_that_matches_nothing():
    with pytest.raises(ModuleChoiceError, match="'t5xxl_fp32' was not found; available: ") as e:
        pick_modules(["t5xxl"], [CLIP_L, T5_FP16], ["t5xxl_fp32"])
    assert "clip_l.safetensors" in str(e.value) and "t5xxl_fp16.safetensors" in str(e.value)


def test_a_missing_kind_says_where_to_put_it(tmp_path):
    with pytest.raises(ModuleChoiceError) as e:
        pick_modules(["clip_l", "t5xxl"], [CLIP_L, AE])
    message = str(e.value)
    assert "T5-XXL text encoder" in message and "t5xxl_fp16.safetensors" in message
    assert "models/text_encoder" in message

    folders = {"vae": (tmp_path / "VAE", tmp_path / "comfy" / "vae")}
    with pytest.raises(ModuleChoiceError) as e:
        pick_modules(["vae16"], [CLIP_L, SD_VAE], folders=folders)
    message = str(e.value)
    assert "16-channel VAE" in message and "ae.safetensors" in message
    assert str(tmp_path / "VAE") in message and str(tmp_path / "comfy" / "vae") in message


def test_unknown_kinds_are_a_programming_error():
    with pytest.raises(ValueError, match="unknown module kind"):
        pick_modules(["clip_h"], [CLIP_L])


def test_scanned_tiny_files_are_picked_for_flux(models):
    folders = module_folders(models)
    found = scan_modules(folders["text_encoders"] + folders["vae"])
    picked = pick_modules(["clip_l", "t5xxl", "vae16"], found, ["t5xxl_fp8_e4m3fn"])
    assert picked["clip_l"].path == models / "text_encoder" / "clip_l.safetensors"
    assert picked["t5xxl"].path == models / "text_encoder" / "t5" / "t5xxl_fp8_e4m3fn.safetensors"
    assert picked["vae16"].path == models / "VAE" / "ae.safetensors"


# --------------------------------------------------------------------------- extra_model_paths.yaml


EXAMPLE = """\
# a ComfyUI install in the home folder, as in ComfyUI's extra_model_paths.yaml.example
comfyui:
    base_path: ~/ComfyUI/
    is_default: true
    checkpoints: models/checkpoints/
    text_encoders: |
         models/text_encoders/
         models/clip/  # legacy location still supported
    clip_vision: models/clip_vision/
    diffusion_models: |
                 models/diffusion_models
                 models/unet
    vae: $SHARED_VAE

a111:
    loras: |
         webui/models/Lora
         webui/models/LyCORIS
    upscale_models: webui/models/ESRGAN
    embeddings: webui/embeddings
    hypernetworks: webui/models/hypernetworks

empty:
"""


def test_read_a_comfyui_yaml(tmp_path, monkeypatch):
    home, shared = tmp_path / "home", tmp_path / "shared-vae"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SHARED_VAE", str(shared))
    comfy = home / "ComfyUI" / "models"
    for folder in ("checkpoints", "text_encoders", "clip", "clip_vision", "diffusion_models"):
        (comfy / folder).mkdir(parents=True)   # models/unet is missing
    shared.mkdir()
    config = tmp_path / "config"
    for folder in ("models/Lora", "embeddings", "models/hypernetworks"):  # no LyCORIS, no ESRGAN
        (config / "webui" / folder).mkdir(parents=True)
    yaml_file = config / "extra_model_paths.yaml"
    yaml_file.write_text(EXAMPLE, encoding="utf-8")

    assert read_extra_model_paths(yaml_file) == {
        "checkpoints": (comfy / "checkpoints",),
        "text_encoders": (comfy / "text_encoders", comfy / "clip"),
        "diffusion_models": (comfy / "diffusion_models",),
        "vae": (shared,),
        # a section without base_path is relative to the yaml's folder
        "loras": (config / "webui" / "models" / "Lora",),
        "embeddings": (config / "webui" / "embeddings",),
    }


def test_relative_base_path_and_every_mapped_kind(tmp_path):
    base = tmp_path / "install"
    for comfy_kind in COMFY_TO_STUDIO:
        (base / comfy_kind).mkdir(parents=True)
    listed = "\n".join(f"    {kind}: {kind}" for kind in COMFY_TO_STUDIO)
    (tmp_path / "extra.yaml").write_text(f"x:\n    base_path: install\n{listed}\n", encoding="utf-8")
    got = read_extra_model_paths(tmp_path / "extra.yaml")
    expected: dict[str, tuple[Path, ...]] = {}
    for comfy_kind, kind in COMFY_TO_STUDIO.items():
        expected[kind] = expected.get(kind, ()) + (base / comfy_kind,)
    assert got == expected
    assert got["diffusion_models"] == (base / "diffusion_models", base / "unet")


def test_a_missing_yaml_adds_nothing(tmp_path):
    assert read_extra_model_paths(tmp_path / "extra_model_paths.yaml") == {}


def test_a_broken_yaml_names_the_line(tmp_path):
    path = tmp_path / "extra_model_paths.yaml"
    path.write_text("comfyui:\n    base_path: /x\n  vae: [models/vae\n", encoding="utf-8")
    with pytest.raises(ModelFileError, match=r"line 3\b"):
        read_extra_model_paths(path)
    path.write_text("comfyui:\n    - models/vae\n", encoding="utf-8")
    with pytest.raises(ModelFileError, match="'comfyui'"):
        read_extra_model_paths(path)
    path.write_text("comfyui:\n    vae: 3\n", encoding="utf-8")
    with pytest.raises(ModelFileError, match="'vae'"):
        read_extra_model_paths(path)


def test_module_folders(tmp_path):
    models = tmp_path / "models"
    for folder in ("text_encoder", "clip", "VAE", "unet"):
        (models / folder).mkdir(parents=True)
    os.symlink(models / "VAE", models / "vae")   # how a case-insensitive disk looks: one folder, two names
    cli_dir, comfy_te, comfy_vae = tmp_path / "te", tmp_path / "comfy" / "clip", tmp_path / "comfy" / "vae"
    for folder in (cli_dir, comfy_te, comfy_vae):
        folder.mkdir(parents=True)
    extra = {"text_encoders": (comfy_te, models / "clip"), "vae": (comfy_vae,), "loras": (tmp_path,)}

    folders = module_folders(models, extra, text_encoder_dirs=[cli_dir, tmp_path / "absent"])
    assert folders == {
        "text_encoders": (models / "text_encoder", models / "clip", cli_dir, comfy_te),
        "vae": (models / "VAE", comfy_vae),
        "diffusion_models": (models / "unet",),
    }
    assert module_folders(tmp_path / "nothing") == {"text_encoders": (), "vae": (), "diffusion_models": ()}
