"""ControlNet Union / ProMax: detection, config from shapes (= diffusers' own config), loading
(= diffusers' from_pretrained), residuals (= diffusers' forward), control types per unit."""

from __future__ import annotations

import socket

import pytest
import torch
from diffusers import ControlNetUnionModel

from studio.controlnet.union import (
    UNION,
    UNION_TYPES,
    derive_union_config,
    is_union_model,
    is_union_state_dict,
    load_union,
    union_probe,
    union_residuals,
    union_type_for_module,
    union_type_index,
)
from studio.errors import RequestError
from studio.models.state_dict import ModelFileError, load_state_dict, read_shapes
from studio.testing import tiny_components
from studio.testing.control_variants import control_lora_state_dict, write_union
from studio.testing.controlnets import build_controlnet

# the modules' own checks against diffusers; the engine-level tests of the same models run in the main command
pytestmark = pytest.mark.slow

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def components():
    return tiny_components("sdxl", seed=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, components):
    return write_union(tmp_path_factory.mktemp("union") / "controlnet-union-promax", components["unet"])


@pytest.fixture(scope="module")
def reference(folder):
    return ControlNetUnionModel.from_pretrained(folder, local_files_only=True).eval()


@pytest.fixture(scope="module")
def loaded(folder):
    return load_union(load_state_dict(folder / WEIGHTS))


def test_detection(folder, components):
    assert is_union_state_dict(read_shapes(folder / WEIGHTS))
    assert not is_union_state_dict(build_controlnet("sdxl", components=components).state_dict())
    assert not is_union_state_dict(control_lora_state_dict(components["unet"]))


def _normalised(config):
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    blocks = len(config["down_block_types"])
    layers = config["transformer_layers_per_block"]
    config["transformer_layers_per_block"] = [layers] * blocks if isinstance(layers, int) else list(layers)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def test_config_from_shapes_is_diffusers_config(folder, reference):
    derived = derive_union_config(read_shapes(folder / WEIGHTS))
    assert derived["_class_name"] == "ControlNetUnionModel"
    assert derived["num_control_type"] == len(UNION_TYPES)
    assert _normalised(ControlNetUnionModel.from_config(derived).config) == _normalised(reference.config)
    probe = union_probe(derived)
    assert (probe.family, probe.kind, probe.hint_channels) == ("sdxl", UNION, 3)


def test_load_union_equals_from_pretrained(loaded, reference):
    assert is_union_model(loaded) and not is_union_model(build_controlnet("sd1"))
    got, want = loaded.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_load_refuses_a_broken_file(folder):
    sd = load_state_dict(folder / WEIGHTS)
    del sd["spatial_ch_projs.bias"]
    with pytest.raises(ModelFileError, match="u.safetensors: weights do not fit"):
        load_union(sd, name="u.safetensors")


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2)}
    image = (torch.rand(1, 3, 64, 64, generator=g) > 0.5).float()
    return x, torch.tensor(500), context, added, image


@torch.no_grad()
def test_residuals_equal_diffusers_forward(loaded, reference):
    x, t, context, added, image = _inputs(loaded)
    down, mid = union_residuals(loaded, x, t, context, added, image, 3)
    one_hot = torch.zeros(2, len(UNION_TYPES))
    one_hot[:, 3] = 1
    want_down, want_mid = reference(x, t, encoder_hidden_states=context, controlnet_cond=[image.expand(2, -1, -1, -1)],
                                    control_type=one_hot, control_type_idx=[3], added_cond_kwargs=added,
                                    return_dict=False)
    assert len(down) == len(want_down)
    for a, b in zip([*down, mid], [*want_down, want_mid]):
        torch.testing.assert_close(a, b)


@torch.no_grad()
def test_type_changes_residuals(loaded):
    x, t, context, added, image = _inputs(loaded)
    canny = union_residuals(loaded, x, t, context, added, image, 3)
    depth = union_residuals(loaded, x, t, context, added, image, 1)
    assert not torch.allclose(canny[1], depth[1])
    with pytest.raises(RequestError):
        union_residuals(loaded, x, t, context, added, image, len(UNION_TYPES))


@pytest.mark.parametrize("module, index", [
    ("canny", 3), ("lineart_anime", 3), ("mlsd", 3), ("depth_midas", 1), ("depth_anything_v2", 1),
    ("openpose_full", 0), ("dw_openpose_full", 0), ("softedge_pidinet", 2), ("scribble_xdog", 2),
    ("normal_bae", 4), ("seg_ofade20k", 5), ("tile_resample", 6), ("tile_colorfix+sharp", 6),
    ("blur_gaussian", 6), ("inpaint_only+lama", 7),
])
def test_type_from_the_preprocessor(module, index):
    assert union_type_for_module(module) == index
    assert union_type_index("Unknown", module) == index
    assert union_type_index("", module) == index


def test_type_from_the_unit_field():
    # the extension's values, its Control Type names, any case; the field wins over the module
    assert union_type_index("Hard Edge", "depth_midas") == 3
    assert union_type_index("OpenPose", "none") == 0
    assert union_type_index("normal map", "none") == 4
    assert union_type_index("Scribble/Sketch", "none") == 2
    assert union_type_index("Tile/Blur", "none") == 6
    assert [union_type_index(name, "none") for name in UNION_TYPES] == list(range(len(UNION_TYPES)))


def test_type_refusals():
    with pytest.raises(RequestError, match="unknown union_control_type 'Sharpen'"):
        union_type_index("Sharpen", "canny")
    with pytest.raises(RequestError, match="union_control_type"):
        union_type_index("Unknown", "none")
    with pytest.raises(RequestError, match="implies none"):
        union_type_for_module("reference_only")
    with pytest.raises(RequestError, match="ProMax"):
        union_type_index("Tile", "none", num_types=6)
    assert union_type_index("Segmentation", "none", num_types=6) == 5


def test_full_size_promax_config_from_shapes():
    """xinsir's ProMax config (config.json of controlnet-union-sdxl-1.0, promax), built on the meta
    device: the shapes give the config back, heads and transformer depths included."""
    config = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
              "block_out_channels": [320, 640, 1280], "conditioning_embedding_out_channels": [16, 32, 96, 256],
              "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                                                "CrossAttnDownBlock2D"],
              "projection_class_embeddings_input_dim": 2816, "transformer_layers_per_block": [1, 2, 10],
              "use_linear_projection": True, "num_control_type": 8}
    with torch.device("meta"):
        full = ControlNetUnionModel(**config)
        derived = ControlNetUnionModel.from_config(
            derive_union_config({k: tuple(v.shape) for k, v in full.state_dict().items()}))
    assert _normalised(derived.config) == _normalised(full.config)
