"""ControlNet files: library names, probing from shapes, offline loading, family checks."""

from __future__ import annotations

import socket

import pytest
import torch
from safetensors.torch import save_file

from studio.controlnet.models import (
    ControlNetLibrary,
    check_family,
    legacy_model_hash,
    load_controlnet,
    probe_controlnet,
)
from studio.models.catalog import HashCache, sha256_file
from studio.models.state_dict import ModelFileError, read_shapes
from studio.testing import make_checkpoint, tiny_components
from studio.testing.controlnets import build_controlnet, make_controlnet, make_controlnet_folder


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def sd1():
    return tiny_components("sd1")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_components("sdxl")


def _library(tmp_path):
    return ControlNetLibrary([tmp_path / "ControlNet"], HashCache(tmp_path / "cache.json"))


def _load(tmp_path, name, family="sd1"):
    lib = _library(tmp_path)
    lib.refresh()
    info = lib.find(name)
    assert info is not None, name
    return load_controlnet(info, torch.float32, "cpu", tmp_path / "configs")


def _assert_same_weights(model, reference):
    got, want = model.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize(("filename", "prefix"), [
    ("canny.safetensors", False),
    ("canny.safetensors", True),
    ("canny.pth", False),
    ("canny.pth", True),
])
def test_original_layout_loads_exactly(tmp_path, sd1, filename, prefix):
    make_controlnet(tmp_path / "ControlNet" / filename, "sd1", components=sd1, prefix=prefix)
    loaded = _load(tmp_path, filename)
    assert loaded.probe.family == "sd1"
    assert loaded.probe.hint_channels == 3 and loaded.probe.in_channels == 4
    assert loaded.probe.context_dim == sd1["unet"].config.cross_attention_dim
    _assert_same_weights(loaded.model, build_controlnet("sd1", components=sd1))
    assert list(loaded.model.config.conditioning_embedding_out_channels) == [16, 32, 96, 256]
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_round_trip_key_layout(tmp_path, sd1):
    path = make_controlnet(tmp_path / "c.safetensors", "sd1", components=sd1)
    keys = set(read_shapes(path))
    assert {f"input_hint_block.{i}.weight" for i in range(0, 16, 2)} <= keys
    assert "input_hint_block.1.weight" not in keys  # SiLUs carry no weights
    assert {f"zero_convs.{i}.0.weight" for i in range(6)} <= keys
    assert {"middle_block_out.0.weight", "time_embed.0.weight", "input_blocks.0.0.weight"} <= keys
    assert not any(k.startswith(("controlnet_", "down_blocks", "label_emb")) for k in keys)
    prefixed = make_controlnet(tmp_path / "p.safetensors", "sd1", components=sd1, prefix=True)
    assert set(read_shapes(prefixed)) == {"control_model." + k for k in keys}


def test_sdxl_probes_and_loads(tmp_path, sdxl):
    path = make_controlnet(tmp_path / "ControlNet" / "xl" / "depth-xl.safetensors", "sdxl", components=sdxl)
    assert "label_emb.0.0.weight" in read_shapes(path)
    probe = probe_controlnet(read_shapes(path))
    assert probe.family == "sdxl" and probe.context_dim == sdxl["unet"].config.cross_attention_dim
    loaded = _load(tmp_path, "xl/depth-xl.safetensors")
    _assert_same_weights(loaded.model, build_controlnet("sdxl", components=sdxl))
    assert loaded.model.config.addition_time_embed_dim == sdxl["unet"].config.addition_time_embed_dim


def test_diffusers_folder_loads(tmp_path, sd1):
    make_controlnet_folder(tmp_path / "ControlNet" / "cn-folder", "sd1", components=sd1)
    lib = _library(tmp_path)
    items = lib.refresh()
    assert [i.name for i in items] == ["cn-folder"] and items[0].is_diffusers
    loaded = load_controlnet(items[0], torch.float32, "cpu", tmp_path / "configs")
    assert loaded.probe.family == "sd1"
    _assert_same_weights(loaded.model, build_controlnet("sd1", components=sd1))


def test_refuses_lora_and_checkpoint(tmp_path, sd1):
    lora = tmp_path / "ControlNet" / "style_lora.safetensors"
    lora.parent.mkdir(parents=True)
    save_file({
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(32, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    }, str(lora))
    make_checkpoint(tmp_path / "ControlNet" / "model.safetensors", "sd1", components=sd1)
    with pytest.raises(ModelFileError, match=r"style_lora\.safetensors: a LoRA, not a ControlNet"):
        _load(tmp_path, "style_lora")
    with pytest.raises(ModelFileError, match=r"model\.safetensors: a Stable Diffusion checkpoint, not a ControlNet"):
        _load(tmp_path, "model")
    with pytest.raises(ModelFileError, match="not a ControlNet"):
        probe_controlnet({"foo.weight": (3, 3)})


def test_family_mismatch_message(tmp_path, sdxl):
    make_controlnet(tmp_path / "ControlNet" / "xl.safetensors", "sdxl", components=sdxl)
    loaded = _load(tmp_path, "xl")
    check_family(loaded, "sdxl")
    check_family(loaded, "sdxl-inpaint")
    with pytest.raises(ModelFileError) as err:
        check_family(loaded, "sd1")
    assert str(err.value) == "ControlNet xl.safetensors is for SDXL, the loaded checkpoint is SD1.x"


def test_library_names(tmp_path, sd1):
    root = tmp_path / "ControlNet"
    make_controlnet(root / "control_v11p_sd15_canny.pth", "sd1", components=sd1)
    make_controlnet(root / "sub" / "openpose.safetensors", "sd1", components=sd1, seed=1)
    (root / "notes.txt").write_text("not a model", encoding="utf-8")
    (root / ".hidden").mkdir()
    make_controlnet(root / ".hidden" / "skip.safetensors", "sd1", components=sd1)
    make_controlnet_folder(root / "folder_cn", "sd1", components=sd1)
    lib = _library(tmp_path)
    items = lib.refresh()
    assert [i.name for i in items] == ["control_v11p_sd15_canny.pth", "folder_cn", "sub/openpose.safetensors"]

    canny = items[0]
    digest = sha256_file(canny.path)
    assert canny.sha256 == digest and canny.shorthash == digest[:10]
    assert canny.title == f"control_v11p_sd15_canny.pth [{digest[:10]}]"
    assert canny.api_name == f"control_v11p_sd15_canny [{legacy_model_hash(canny.path)}]"
    assert canny.model_name == "control_v11p_sd15_canny"
    # the hash is cached under the extension's key, so a fresh scan reuses it
    assert HashCache(tmp_path / "cache.json").get("controlnet/control_v11p_sd15_canny.pth", canny.path) == digest
    assert items[1].api_name.startswith("folder_cn [")

    for query in (canny.title, canny.name, "control_v11p_sd15_canny", canny.api_name,
                  "control_v11p_sd15_canny [0123456789]"):
        assert lib.find(query) is canny, query
    assert lib.find("sub/openpose.safetensors") is items[2]
    assert lib.find("openpose") is items[2]
    assert lib.find("None") is None and lib.find("") is None and lib.find("missing") is None


def test_forward_matches_unet_residuals(tmp_path, sd1):
    make_controlnet(tmp_path / "ControlNet" / "cn.safetensors", "sd1", components=sd1)
    model = _load(tmp_path, "cn").model
    unet = sd1["unet"]
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500])
    with torch.no_grad():
        down, mid = model(sample, t, encoder_hidden_states=context, controlnet_cond=hint,
                          conditioning_scale=1.0, return_dict=False)
        plain = unet(sample, t, encoder_hidden_states=context).sample
        guided = unet(sample, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid).sample
    levels = unet.config.block_out_channels
    assert len(down) == 1 + len(levels) * unet.config.layers_per_block + len(levels) - 1
    assert down[0].shape == (1, levels[0], 8, 8)
    assert mid.shape == (1, levels[-1], 4, 4)
    assert guided.shape == plain.shape
    assert not torch.allclose(guided, plain)


def test_sdxl_forward_with_size_conditioning(tmp_path, sdxl):
    make_controlnet(tmp_path / "ControlNet" / "xl.safetensors", "sdxl", components=sdxl)
    model = _load(tmp_path, "xl").model
    cfg = sdxl["unet"].config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    with torch.no_grad():
        _down, mid = model(torch.zeros(1, 4, 8, 8), torch.tensor([10]),
                          encoder_hidden_states=torch.zeros(1, 77, cfg.cross_attention_dim),
                          controlnet_cond=torch.zeros(1, 3, 64, 64),
                          added_cond_kwargs={"text_embeds": torch.zeros(1, pooled),
                                             "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]])},
                          return_dict=False)
    assert mid.shape[1] == cfg.block_out_channels[-1]


def test_config_cache_is_reused(tmp_path, sd1):
    make_controlnet(tmp_path / "ControlNet" / "a.safetensors", "sd1", components=sd1)
    make_controlnet(tmp_path / "ControlNet" / "b.safetensors", "sd1", components=sd1, seed=3)
    _load(tmp_path, "a")
    _load(tmp_path, "b")
    assert len([p for p in (tmp_path / "configs").iterdir() if p.is_dir()]) == 1


def test_legacy_model_hash_is_a1111s_old_hash(tmp_path):
    import hashlib

    data = bytes(range(256)) * (0x130000 // 256)
    big = tmp_path / "big.pth"
    big.write_bytes(data)
    # the 64 KiB at offset 1 MiB, as A1111's sd_models.model_hash reads them
    assert legacy_model_hash(big) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    big.write_bytes(data[:0x100000] + b"\xff" + data[0x100001:])  # one byte inside the window
    assert legacy_model_hash(big) != hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    small = tmp_path / "small.pth"
    small.write_bytes(b"tiny")
    assert legacy_model_hash(small) == hashlib.sha256(b"").hexdigest()[:8]
    assert legacy_model_hash(tmp_path / "missing.pth") == "NOFILE"
