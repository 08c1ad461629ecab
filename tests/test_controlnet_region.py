"""The extension's effective_region_mask and advanced_weighting: parsed from the API and the CLI,
applied to ControlNet residuals (and IP-Adapter attention, through diffusers' ip_adapter_masks), and
refused on the unit kinds the extension does not support them on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from studio.config import Flags
from studio.controlnet.guidance import in_region
from studio.controlnet.units import ControlNetUnitRequest, UnitError, unit_from_api
from studio.core import Studio
from studio.generation.request import RequestError, Txt2ImgRequest
from studio.testing import tiny_components
from studio.testing.controlnets import make_controlnet
from studio.testing.ip_adapters import write_clip_vision, write_ip_adapter
from tests.helpers import control_square, guided_latents, make_models_dir

BASE = dict(prompt="a house", steps=3, width=64, height=64, seed=7, cfg_scale=7.0, sampler_name="Euler",
            save_images=False, checkpoint="tiny-sd1.safetensors")


def region(kind: str) -> Image.Image:
    arr = np.zeros((32, 32), np.uint8)
    if kind == "white":
        arr[:] = 255
    elif kind == "left":
        arr[:, :16] = 255
    return Image.fromarray(arr)


def test_the_api_fields_are_parsed():
    unit = unit_from_api({"module": "canny", "model": "x", "effective_region_mask": "MASK",
                          "advanced_weighting": [1, 0.5, 0.25]}, lambda b: f"decoded {b}")
    assert unit.effective_region_mask == "decoded MASK" and unit.advanced_weighting == (1.0, 0.5, 0.25)
    assert unit_from_api({"advanced_weighting": "1, 0.5 0.25"}, str).advanced_weighting == (1.0, 0.5, 0.25)
    assert unit_from_api({"advanced_weighting": None, "effective_region_mask": ""}, str).advanced_weighting is None
    for bad in (["a"], 3, [1, 20]):
        with pytest.raises(UnitError, match="advanced_weighting"):
            unit_from_api({"advanced_weighting": bad}, str)
    assert "effective_region_mask" not in ControlNetUnitRequest(effective_region_mask=region("white")).as_dict()


def test_cli_specs_take_both_fields(tmp_path):
    from studio.cli import parse_controlnet_spec

    path = tmp_path / "region.png"
    region("left").save(path)
    unit = parse_controlnet_spec(f"model=x,module=canny,effective_region_mask={path},advanced_weighting=1,0.5", 0)
    assert unit.effective_region_mask.size == (32, 32) and unit.advanced_weighting == (1.0, 0.5)


def test_a_residual_is_kept_only_inside_the_region():
    residual = torch.ones(2, 3, 8, 8)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32] = 1
    out = in_region(residual, mask)
    assert torch.equal(out[..., :3], residual[..., :3]) and torch.equal(out[..., 5:], torch.zeros(2, 3, 8, 3))
    assert in_region(residual, None) is residual


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("region")
    make_models_dir(root)
    folder = root / "models" / "ControlNet"
    make_controlnet(folder / "cn-canny.safetensors", "sd1", seed=2, components=tiny_components("sd1", seed=1))
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    s.select_checkpoint("tiny-sd1.safetensors")
    write_ip_adapter(folder / "ip-adapter_sd15.safetensors", s.models.current.unet, "base", 24, seed=2, gain=40.0)
    write_clip_vision(root / "models" / "clip_vision" / "clip_vision_h.safetensors", 32, 2, 24, seed=1)
    s.controlnets.library.refresh()
    yield s
    s.queue.shutdown()


def name(studio, stem: str) -> str:
    return next(n for n in studio.controlnets.names() if n.startswith(stem + " ["))


def controlnet(studio, **changes) -> ControlNetUnitRequest:
    return ControlNetUnitRequest(**{"module": "none", "model": name(studio, "cn-canny"), "image": control_square(),
                                    **changes})


def ip_adapter(studio, **changes) -> ControlNetUnitRequest:
    return ControlNetUnitRequest(**{"module": "ip-adapter_clip_sd15", "model": name(studio, "ip-adapter_sd15"),
                                    "image": control_square(), **changes})


def generate(studio, *units) -> np.ndarray:
    result = studio.txt2img(Txt2ImgRequest(**BASE, controlnet_units=tuple(units)))
    return np.asarray(result.images[0], dtype=np.int16)


def test_a_controlnet_region_mask_limits_where_the_unit_acts(studio, tmp_path):
    from studio.controlnet.guidance import ControlUnit
    from studio.controlnet.models import load_controlnet
    from studio.controlnet.units import map_to_tensor, region_to_tensor

    model = studio.select_checkpoint("tiny-sd1.safetensors")
    net = load_controlnet(studio.controlnets.library.find("cn-canny"), config_cache=tmp_path).model
    hint = map_to_tensor(control_square())

    def latents(mask=None):
        units = [] if mask == "none" else [ControlUnit(net, hint, region=region_to_tensor(mask, 64, 64))]
        return guided_latents(studio, model, units)

    none, full = latents("none"), latents()
    assert torch.equal(latents(region("white")), full) and torch.equal(latents(region("black")), none)
    half = latents(region("left"))
    change = (half - none).abs().mean(dim=(0, 1))   # per latent position
    assert change[:, :4].mean() > change[:, 4:].mean()   # the left half moved more (attention spreads some)
    # through the engine: the mask reaches the unit
    plain, steered = generate(studio), generate(studio, controlnet(studio))
    assert np.array_equal(generate(studio, controlnet(studio, effective_region_mask=region("white"))), steered)
    assert np.array_equal(generate(studio, controlnet(studio, effective_region_mask=region("black"))), plain)


def test_advanced_weighting_replaces_the_weight_per_residual(studio):
    half = generate(studio, controlnet(studio, weight=0.5))
    # 13 values as for SD1.x; the tiny ControlNet uses its 7 (extra values go unused, as the extension's zip)
    assert np.array_equal(generate(studio, controlnet(studio, advanced_weighting=(0.5,) * 13)), half)
    assert not np.array_equal(generate(studio, controlnet(studio, advanced_weighting=(0.0,) * 12 + (2.0,))), half)
    with pytest.raises(RequestError, match=r"advanced_weighting has 4 values; this ControlNet adds 7 residuals"):
        generate(studio, controlnet(studio, advanced_weighting=(1.0,) * 4))


def test_an_ip_adapter_region_mask_limits_its_attention(studio):
    plain, full = generate(studio), generate(studio, ip_adapter(studio))
    assert np.abs(full - plain).mean() > 0.5
    assert np.abs(generate(studio, ip_adapter(studio, effective_region_mask=region("white"))) - full).max() <= 1
    assert np.abs(generate(studio, ip_adapter(studio, effective_region_mask=region("black"))) - plain).max() <= 1
    half = generate(studio, ip_adapter(studio, effective_region_mask=region("left")))
    assert np.abs(half - plain).mean() > 0.1 and np.abs(half - full).mean() > 0.1


def test_units_that_cannot_take_them_refuse_them(studio):
    with pytest.raises(RequestError, match="effective_region_mask works with ControlNet.*not with reference_only"):
        generate(studio, ControlNetUnitRequest(module="reference_only", image=control_square(),
                                               effective_region_mask=region("left")))
    with pytest.raises(RequestError, match="advanced_weighting .* not with reference_only"):
        generate(studio, ControlNetUnitRequest(module="reference_only", image=control_square(),
                                               advanced_weighting=(1.0,) * 13))


def test_reference_and_ip_adapter_units_run_together(studio):
    # the reference's extra UNet pass gets the adapter's image embeddings, as the real call does
    reference = ControlNetUnitRequest(module="reference_only", image=control_square())
    both = generate(studio, reference, ip_adapter(studio))
    assert not np.array_equal(both, generate(studio, reference))
    assert not np.array_equal(both, generate(studio, ip_adapter(studio)))


def test_ip_adapter_blocks_are_numbered_as_the_extension_numbers_them():
    import json
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    from studio.controlnet.ip_adapter import transformer_blocks

    configs = Path(__file__).resolve().parent.parent / "studio" / "models" / "configs"
    counts = {}
    for family in ("sd15", "sdxl"):
        with torch.device("meta"):   # the real layouts, no weights
            unet = UNet2DConditionModel.from_config(json.loads((configs / family / "unet" / "config.json").read_text()))
        names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
        blocks = transformer_blocks(names)
        counts[family] = len(set(blocks.values()))
        assert sorted(set(blocks.values())) == list(range(counts[family]))
    assert counts == {"sd15": 16, "sdxl": 11}   # the extension's transformer_block_num
    assert transformer_blocks(["mid_block.attentions.0.transformer_blocks.0.attn2.processor",
                               "down_blocks.2.attentions.1.transformer_blocks.0.attn2.processor",
                               "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"]) == {
        "down_blocks.2.attentions.1.transformer_blocks.0.attn2.processor": 0,
        "mid_block.attentions.0.transformer_blocks.0.attn2.processor": 1,
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor": 2}


def test_ip_adapter_advanced_weighting_weights_each_block(studio):
    from studio.controlnet.ip_adapter import transformer_blocks

    unet = studio.select_checkpoint("tiny-sd1.safetensors").unet
    count = len(set(transformer_blocks([n for n in unet.attn_processors if n.endswith("attn2.processor")]).values()))
    half = generate(studio, ip_adapter(studio, weight=0.5))
    assert np.abs(generate(studio, ip_adapter(studio, advanced_weighting=(0.5,) * count)) - half).max() <= 1
    one_block = generate(studio, ip_adapter(studio, advanced_weighting=(0.0,) * (count - 1) + (1.0,)))
    assert np.abs(one_block - half).mean() > 0.1
    with pytest.raises(RequestError, match=f"advanced_weighting needs one weight per cross-attention block of "
                                           f"this UNet \\({count};"):
        generate(studio, ip_adapter(studio, advanced_weighting=(1.0,) * (count + 1)))


def test_an_ip_adapter_units_painted_mask_hides_that_part_from_the_encoder(studio):
    from studio.controlnet.clip_vision import load_clip_vision
    from studio.controlnet.ip_adapter import clip_pixels, encode_reference

    files = studio.controlnets.clip_vision.files()
    encoder = load_clip_vision(files[0].path)
    image = control_square()
    everything = Image.new("L", image.size, 255)
    hidden, _ = encode_reference(encoder, [image], False, everything)
    blank = encoder(torch.zeros_like(clip_pixels([image], encoder.config.image_size))).image_embeds
    assert torch.allclose(hidden, blank, atol=1e-5)   # all hidden: the encoder sees the mean colour only
    unmasked, _ = encode_reference(encoder, [image], False)
    assert torch.equal(encode_reference(encoder, [image], False, Image.new("L", image.size, 0))[0], unmasked)
    # through the engine: the unit's painted mask is its CLIP mask, not a scribble to read
    plain = generate(studio, ip_adapter(studio))
    masked = generate(studio, ip_adapter(studio, mask=region("left").resize(image.size)))
    assert not np.array_equal(masked, plain)
