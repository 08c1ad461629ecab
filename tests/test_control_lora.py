"""Control-LoRAs: detection, building on the checkpoint's UNet (base + up @ down, full tensors
as given, UNet untouched), refusals, and use in the SDXL sampling loop."""

from __future__ import annotations

import socket

import pytest
import torch

from studio.config import Flags
from studio.controlnet.control_lora import (
    CONTROL_LORA,
    build_control_lora,
    is_control_lora,
    probe_control_lora,
)
from studio.controlnet.guidance import ControlUnit
from studio.core import Studio
from studio.models.state_dict import ModelFileError, load_state_dict, read_shapes
from studio.testing import tiny_components
from studio.testing.control_variants import write_control_lora
from studio.testing.controlnets import make_controlnet
from tests.helpers import guided_latents, make_models_dir

# the modules' own checks against diffusers; the engine-level tests of the same models run in the main command
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def unet():
    return tiny_components("sdxl", seed=1)["unet"]


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, unet):
    return write_control_lora(tmp_path_factory.mktemp("cl") / "control-lora-canny-rank4.safetensors", unet)


def _delta(up, down, weight):
    return (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)


def test_detected_and_probed_from_names(lora_file, unet, tmp_path):
    shapes = read_shapes(lora_file)
    assert is_control_lora(shapes)
    probe = probe_control_lora(shapes)
    assert (probe.family, probe.kind, probe.context_dim) == ("sdxl", CONTROL_LORA, unet.config.cross_attention_dim)
    assert (probe.hint_channels, probe.in_channels) == (3, 4)
    plain = make_controlnet(tmp_path / "plain.safetensors", "sdxl")
    assert not is_control_lora(read_shapes(plain))


def test_weights_are_base_plus_update_and_full_tensors(lora_file, unet):
    sd = load_state_dict(lora_file)
    model = build_control_lora(sd, unet)
    got, base = model.state_dict(), unet.state_dict()
    # a LoRA'd linear (attention query) and a LoRA'd 3x3 conv
    for name, ldm in (("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                       "input_blocks.1.1.transformer_blocks.0.attn1.to_q"),
                      ("down_blocks.0.resnets.0.conv1.weight", "input_blocks.1.0.in_layers.2"),
                      ("add_embedding.linear_1.weight", "label_emb.0.0")):
        want = base[name] + _delta(sd[ldm + ".up"], sd[ldm + ".down"], base[name])
        assert not torch.equal(got[name], base[name]), name
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)
    # full tensors: a norm taken from the file, and the ControlNet-only zero conv and hint CNN
    for name, ldm in (("down_blocks.0.resnets.0.norm1.weight", "input_blocks.1.0.in_layers.0.weight"),
                      ("controlnet_down_blocks.0.weight", "zero_convs.0.0.weight"),
                      ("controlnet_mid_block.bias", "middle_block_out.0.bias"),
                      ("controlnet_cond_embedding.conv_in.weight", "input_hint_block.0.weight")):
        assert torch.equal(got[name], sd[ldm]), name


def test_base_unet_is_left_unchanged(lora_file, unet):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    build_control_lora(load_state_dict(lora_file), unet)
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dtype_and_device(lora_file, unet):
    model = build_control_lora(load_state_dict(lora_file), unet, torch.float16, "cpu")
    assert next(model.parameters()).dtype == torch.float16
    assert not any(p.requires_grad for p in model.parameters())


def test_refuses_a_non_sdxl_checkpoint(lora_file):
    sd1_unet = tiny_components("sd1", seed=1)["unet"]
    with pytest.raises(ModelFileError, match="needs an SDXL base checkpoint"):
        build_control_lora(load_state_dict(lora_file), sd1_unet, name="cl.safetensors")


def test_refuses_a_unet_whose_shapes_do_not_fit(lora_file):
    inpaint_unet = tiny_components("sdxl-inpaint", seed=1)["unet"]  # 9 input channels
    with pytest.raises(ModelFileError, match="does not fit the loaded checkpoint's UNet"):
        build_control_lora(load_state_dict(lora_file), inpaint_unet)


def test_refuses_incomplete_and_unpaired_files(lora_file, unet):
    sd = load_state_dict(lora_file)
    no_zero_conv = {k: v for k, v in sd.items() if not k.startswith("zero_convs.1.")}
    with pytest.raises(ModelFileError, match="incomplete"):
        build_control_lora(no_zero_conv, unet)
    unpaired = {k: v for k, v in sd.items() if k != "input_blocks.1.0.in_layers.2.up"}
    with pytest.raises(ModelFileError, match="without their pair"):
        build_control_lora(unpaired, unet)
    stray = {**sd, "input_blocks.99.0.in_layers.0.weight": torch.zeros(3)}
    with pytest.raises(ModelFileError, match="no place for"):
        build_control_lora(stray, unet)


@pytest.fixture(scope="module")
def sdxl_studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("clx")
    make_models_dir(root, (("sdxl", ".safetensors"),))
    studio = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield studio, studio.select_checkpoint("tiny-sdxl.safetensors")
    studio.queue.shutdown()


def test_runs_in_the_sdxl_loop_and_weight_zero_is_none(sdxl_studio, tmp_path):
    studio, model = sdxl_studio
    path = write_control_lora(tmp_path / "cl.safetensors", model.unet, seed=3)
    net = build_control_lora(load_state_dict(path), model.unet)
    hint = (torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    none = guided_latents(studio, model, [], steps=2)
    zero = guided_latents(studio, model, [ControlUnit(net, hint, weight=0.0)], steps=2)
    one = guided_latents(studio, model, [ControlUnit(net, hint, weight=1.0)], steps=2)
    assert torch.equal(none, zero)
    assert not torch.allclose(none, one)
