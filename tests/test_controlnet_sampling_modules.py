"""The ControlNet modules whose work happens inside sampling: reference_only / reference_adain(+attn),
inpaint / inpaint_only / inpaint_only+lama, tile_colorfix(+sharp), and Recolor's post-processing.
Engine level on the tiny SD1 model, through the real loader and the real sampling loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from studio.config import Flags
from studio.controlnet.latent_fixes import box_blur, predicted_x0, prediction_from_x0
from studio.controlnet.reference import (
    ReferenceGuidance,
    ReferenceUnit,
    _adain_layers,
    original_blocks,
    style_fidelity,
    transformer_blocks,
)
from studio.controlnet.units import ControlNetUnitRequest, fit_control_mask
from studio.core import Studio
from studio.generation.request import Img2ImgRequest, RequestError, Txt2ImgRequest
from studio.generation.step_callbacks import ModelCall, PassInfo
from studio.testing import tiny_components
from studio.testing.controlnets import make_controlnet
from tests.helpers import make_models_dir

BASE = dict(prompt="a house", steps=4, width=64, height=64, seed=11, cfg_scale=7.0, sampler_name="Euler",
            save_images=False)


def stripes() -> Image.Image:
    """A reference with strong, large structure: red/blue vertical stripes."""
    arr = np.zeros((64, 64, 3), np.uint8)
    for x in range(64):
        arr[:, x] = (230, 40, 30) if (x // 16) % 2 == 0 else (20, 50, 220)
    return Image.fromarray(arr)


def gradient() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, 255 - x * 2], axis=2).astype(np.uint8))


def centre_mask() -> Image.Image:
    arr = np.zeros((64, 64), np.uint8)
    arr[16:48, 16:48] = 255
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn-sampling")
    make_models_dir(root)
    make_controlnet(root / "models" / "ControlNet" / "cn-inpaint.safetensors", "sd1", seed=2,
                    components=tiny_components("sd1", seed=1))
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    s.select_checkpoint("tiny-sd1.safetensors")
    yield s
    s.queue.shutdown()


def unit(**changes) -> ControlNetUnitRequest:
    return ControlNetUnitRequest(**{"module": "reference_only", "model": "None", "image": stripes(), **changes})


def generate(studio, *units, **changes) -> np.ndarray:
    result = studio.txt2img(Txt2ImgRequest(**{**BASE, **changes}, controlnet_units=tuple(units)))
    return np.asarray(result.images[0], dtype=np.int16)


def test_the_modules_are_listed_as_the_extension_lists_them(studio):
    detail = studio.preprocessors.api_module_detail()["module_detail"]
    for name in ("reference_only", "reference_adain", "reference_adain+attn"):
        assert detail[name]["model_free"] is True
        assert detail[name]["sliders"] == [{"name": "Style Fidelity (only for Balanced mode)", "value": 0.5,
                                            "min": 0.0, "max": 1.0, "step": 0.01}]
    for name in ("inpaint", "inpaint_only", "inpaint_only+lama", "tile_colorfix", "tile_colorfix+sharp"):
        assert detail[name]["model_free"] is False
    assert [s["name"] for s in detail["tile_colorfix+sharp"]["sliders"]] == ["Variation", "Sharpness"]


def test_style_fidelity_follows_the_control_mode():
    assert style_fidelity(0.5, 0, False, False) == 0.5
    assert style_fidelity(0.5, 0, True, False) == 0.125        # SDXL: cubed
    assert style_fidelity(0.5, 2, False, False) == 1.0         # ControlNet is more important
    assert style_fidelity(0.5, 1, False, False) == 0.0         # My prompt is more important
    assert style_fidelity(0.5, 0, False, True) == 0.0          # hires pass
    assert style_fidelity(3.0, 0, False, False) == 1.0


def run_pass(studio, model, callback, x, t=500, sigma=1.0, has_uncond=True):
    """One patched UNet call as the loop makes it: pass start, the callback's kwargs, the UNet, pass end."""
    context = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    info = PassInfo(model, 4, [1])
    callback.on_pass_start(info)
    try:
        call = ModelCall(0, 0, 4, torch.tensor(t), sigma, x, context, None, 2, 1, has_uncond)
        extra = callback.unet_kwargs(call)
        with torch.inference_mode():
            out = model.unet(x, torch.tensor(t), encoder_hidden_states=context, **extra).sample
    finally:
        callback.on_pass_end(info)
    return out


@pytest.mark.parametrize("module", ["reference_only", "reference_adain", "reference_adain+attn"])
def test_reference_at_weight_0_is_no_reference_and_at_1_changes_the_prediction(studio, module):
    assert np.array_equal(generate(studio, unit(module=module, weight=0.0)), generate(studio))
    model = studio.models.current
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    context = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = model.unet(x, torch.tensor(500), encoder_hidden_states=context).sample
    image = torch.from_numpy(np.asarray(stripes(), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    guided = run_pass(studio, model, ReferenceGuidance([ReferenceUnit(module, image, 1.0, 0.0, 1.0, 0.5, 0, 3)]), x)
    # the tiny random UNet predicts small values; the reference moves them by percents
    assert (guided - plain).abs().mean() > 0.01 * plain.abs().mean()


def test_reference_needs_no_model_and_says_so_in_the_infotext(studio):
    result = studio.txt2img(Txt2ImgRequest(**BASE, controlnet_units=(unit(),)))
    text = result.infotexts[0]
    assert "ControlNet 0: \"Module: reference_only, Model: None, Weight: 1.0" in text
    assert "Threshold A: 0.5" in text


def test_reference_attention_moves_each_layer_towards_the_reference():
    """One self-attention layer, patched: reading after the reference was written, its output lies
    between its own self-attention and attention to the reference's tokens alone, nearer the latter
    than the plain output is; with fidelity 1 the unconditional row stays plain."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from studio.controlnet.reference import _Machine, _ReferenceAttention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16)
    x, ref = torch.randn(2, 16, 32), torch.randn(2, 16, 32) * 3 + 1
    machine = _Machine()
    patched = _ReferenceAttention(AttnProcessor2_0(), machine, rank=0.0)
    attn.set_processor(patched)
    with torch.no_grad():
        plain = AttnProcessor2_0()(attn, x)
        to_ref = AttnProcessor2_0()(attn, x, ref)
        machine.writing, machine.attention, machine.weight, machine.fidelity = True, True, 1.0, 0.0
        attn(ref)
        machine.writing = False
        read = attn(x)
        assert (read - to_ref).norm() < (plain - to_ref).norm()
        assert not patched.bank.tokens            # a read empties the bank
        machine.writing, machine.fidelity, machine.uncond_rows = True, 1.0, [0]
        attn(ref)
        machine.writing = False
        read = attn(x)
    torch.testing.assert_close(read[0], plain[0])
    assert (read[1] - plain[1]).abs().max() > 1e-3


def test_adain_renormalises_each_block_to_the_reference_statistics(studio):
    model = studio.models.current
    unet = model.unet
    module, _ = _adain_layers(unet, False)[0]          # the middle block, rank 0: always taken
    seen: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        ref_unit = ReferenceUnit("reference_adain", torch.rand(1, 3, 64, 64), 1.0, 0.0, 1.0, 0.0, 0, seed=3)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        callback = ReferenceGuidance([ref_unit])
        captured: list[torch.Tensor] = []
        stats_hook = None

        def after(m, a, out):  # runs after the AdaIN hook: the renormalised output
            captured.append(out.detach().clone())

        callback_start = callback.on_pass_start

        def start(info):
            nonlocal stats_hook
            callback_start(info)
            stats_hook = module.register_forward_hook(after)

        callback.on_pass_start = start
        run_pass(studio, model, callback, x)
        stats_hook.remove()
    finally:
        hook.remove()
    written, read = seen[0], captured[1]        # the write pass's block output, then the read's, restyled
    w_var, w_mean = torch.var_mean(written.float(), dim=(2, 3), correction=0)
    r_var, r_mean = torch.var_mean(read.float(), dim=(2, 3), correction=0)
    torch.testing.assert_close(r_mean, w_mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r_var, w_var, atol=1e-3, rtol=1e-3)


def test_reference_attention_with_the_picture_itself_changes_nothing(studio):
    """Attending to a copy of one's own tokens gives the same attention output: with the reference's
    noised latents equal to the UNet input (fidelity 0), the patched UNet equals the plain one."""
    model = studio.models.current
    ref_unit = ReferenceUnit("reference_only", torch.zeros(1, 3, 64, 64), 1.0, 0.0, 1.0, 0.0, 0, seed=0)
    callback = ReferenceGuidance([ref_unit])
    start = callback.on_pass_start
    x_holder: list[torch.Tensor] = []

    def same_latents(info):
        start(info)
        ref_unit.latents = torch.zeros(1, 4, 8, 8)   # sigma 0 below: the write pass sees exactly these
        x_holder.append(torch.zeros(2, 4, 8, 8))

    callback.on_pass_start = same_latents
    x = torch.zeros(2, 4, 8, 8)
    patched = run_pass(studio, model, callback, x, sigma=0.0)
    context = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = model.unet(x, torch.tensor(500), encoder_hidden_states=context).sample
    torch.testing.assert_close(patched, plain, atol=1e-5, rtol=1e-4)


def test_the_unet_is_restored_after_a_reference_pass(studio):
    model = studio.models.current
    unet = model.unet
    before = dict(unet.attn_processors)
    hooks_before = {id(m): len(m._forward_hooks) for m in unet.modules()}
    ref_unit = ReferenceUnit("reference_adain+attn", torch.rand(1, 3, 64, 64), 1.0, 0.0, 1.0, 0.5, 0, seed=0)
    run_pass(studio, model, ReferenceGuidance([ref_unit]), torch.randn(2, 4, 8, 8))
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    assert {id(m): len(m._forward_hooks) for m in unet.modules()} == hooks_before


def test_block_tables_follow_the_original_unet_layout(studio):
    unet = studio.models.current.unet
    inputs, outputs = original_blocks(unet)
    layers = unet.config.layers_per_block
    assert len(inputs) == 1 + layers * len(unet.down_blocks) + (len(unet.down_blocks) - 1)
    assert len(outputs) == (layers + 1) * len(unet.up_blocks)
    widths = [b.norm1.normalized_shape[0] for b in transformer_blocks(unet)]
    assert widths == sorted(widths, reverse=True)


# --------------------------------------------------------------------------- inpaint


def inpaint_unit(**changes) -> ControlNetUnitRequest:
    return ControlNetUnitRequest(**{"module": "inpaint_only", "model": "cn-inpaint", "image": gradient(),
                                    "mask": centre_mask(), **changes})


def test_inpaint_only_keeps_the_control_image_outside_the_mask(studio):
    out = generate(studio, inpaint_unit())
    original = np.asarray(gradient(), dtype=np.int16)
    # far outside the mask (beyond the 7-pixel dilation and blur) the picture is the control image
    outside = np.ones((64, 64), bool)
    outside[8:56, 8:56] = False
    assert np.array_equal(out[outside], original[outside])
    assert np.abs(out[20:44, 20:44] - original[20:44, 20:44]).mean() > 5


def test_inpaint_only_at_weight_0_changes_only_the_paste_back(studio):
    """Weight 0: no ControlNet, no latent blending; only the pixel paste-back outside the mask remains."""
    plain = generate(studio)
    out = generate(studio, inpaint_unit(weight=0.0))
    assert np.array_equal(out[24:40, 24:40], plain[24:40, 24:40])


def test_inpaint_modules_need_a_mask(studio):
    for module in ("inpaint", "inpaint_only", "inpaint_only+lama"):
        with pytest.raises(RequestError, match="needs a mask"):
            studio.txt2img(Txt2ImgRequest(**BASE, controlnet_units=(inpaint_unit(module=module, mask=None),)))


def test_lama_without_its_weights_names_the_file(studio):
    with pytest.raises(RequestError, match="ControlNetLama.pth"):
        studio.txt2img(Txt2ImgRequest(**BASE, controlnet_units=(inpaint_unit(module="inpaint_only+lama"),)))


def test_inpaint_global_harmonious_feeds_masked_pixels_as_minus_one(studio):
    from diffusers.configuration_utils import FrozenDict

    from studio.controlnet.guidance import ControlUnit, control_residuals

    seen = []

    class Recorder(torch.nn.Module):
        config = FrozenDict(in_channels=4)

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, encoder_hidden_states, controlnet_cond, conditioning_scale, return_dict, **kw):
            seen.append(controlnet_cond)
            return [torch.zeros(1)], torch.zeros(1)

    image = torch.full((1, 3, 8, 8), 0.5)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    control_residuals([ControlUnit(Recorder(), torch.cat([image, mask], dim=1))], torch.zeros(2, 4, 1, 1),
                      torch.tensor(1), torch.zeros(2, 1, 4), None, 0, 4, 2, 1, True)
    cond = seen[0]
    assert cond.shape[1] == 3
    assert torch.all(cond[..., :4] == -1) and torch.all(cond[..., 4:] == 0.5)


def test_img2img_inpaint_runs_inpaint_only_as_global_harmonious(studio):
    req = Img2ImgRequest(**BASE, init_images=[gradient()], mask=centre_mask(), denoising_strength=0.75,
                         controlnet_units=(inpaint_unit(image=None, mask=None),))
    result = studio.img2img(req)
    assert any("inpaint_global_harmonious" in n for n in result.notes)
    assert "Module: inpaint," in result.infotexts[0]


def test_the_mask_follows_the_maps_resize_mode():
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (0, 0, 8, 32))            # the left eighth
    crop = np.asarray(fit_control_mask(mask, 32, 32, "Crop and Resize"))[:, :, 0]
    assert crop.max() == 0                     # cropped away
    fill = np.asarray(fit_control_mask(mask, 32, 32, "Resize and Fill"))[:, :, 0]
    assert fill[8:24, :4].min() == 255 and fill[8:24, 8:].max() == 0
    assert fill[:8].min() == 255 and fill[24:].min() == 255    # the added border is generated
    assert set(np.unique(np.asarray(fit_control_mask(mask, 40, 20, "Just Resize")))) <= {0, 255}


# --------------------------------------------------------------------------- tile colour fix


def test_prediction_conversions_round_trip():
    x, pred = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for kind in ("epsilon", "v_prediction"):
        x0 = predicted_x0(x, pred, 2.5, kind)
        torch.testing.assert_close(prediction_from_x0(x, x0, 2.5, kind), pred, atol=1e-5, rtol=1e-5)
    flat = torch.ones(1, 1, 6, 6)
    assert torch.equal(box_blur(flat, 2), flat)


@pytest.mark.parametrize("module", ["tile_colorfix", "tile_colorfix+sharp"])
def test_colorfix_moves_the_colours_to_the_control_image(studio, module):
    tile = ControlNetUnitRequest(module=module, model="cn-inpaint", image=stripes(), threshold_a=3)
    plain = generate(studio, ControlNetUnitRequest(module="none", model="cn-inpaint", image=stripes()))
    fixed = generate(studio, tile)
    ref = np.asarray(stripes(), dtype=np.float32)

    def low(a):   # the picture's colours at a coarse scale
        return np.asarray(Image.fromarray(a.astype(np.uint8)).resize((4, 4), Image.BOX), dtype=np.float32)

    assert np.abs(low(fixed) - low(ref)).mean() < np.abs(low(plain) - low(ref)).mean()
    assert np.array_equal(generate(studio, ControlNetUnitRequest(**{**tile.as_dict(), "image": stripes(),
                                                                     "weight": 0.0})), generate(studio))


def test_recolor_keeps_the_control_images_lightness(studio):
    from studio.controlnet.runtime import keep_lightness

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8))
    gray = Image.new("RGB", (16, 16), (90, 90, 90))
    out = np.asarray(keep_lightness(image, gray, "recolor_intensity"))
    assert np.abs(out.max(axis=2).astype(int) - 90).max() <= 2


@pytest.mark.slow
def test_inpaint_only_lama_fills_the_mask_with_lama_through_spandrel(studio):
    """A random-weight LaMa (spandrel's architecture, the original checkpoint's ``generator.`` keys)
    under the extension's file name: the map is the image with only the masked area repainted."""
    from spandrel.architectures.LaMa.__arch.LaMa import LaMa

    torch.manual_seed(0)
    weights = {f"generator.{k.removeprefix('model.')}" if k.startswith("model.model.") else k: v.contiguous()
               for k, v in LaMa(in_nc=4, out_nc=3).state_dict().items()}
    path = studio.preprocessors.annotators_dir / "ControlNetLama.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, path)   # the extension's .pth; spandrel reads it with its restricted unpickler
    try:
        detected = studio.preprocessors.run("inpaint_only+lama", gradient(), None, mask=centre_mask())
        arr, original = np.asarray(detected, dtype=np.int16), np.asarray(gradient(), dtype=np.int16)
        assert np.array_equal(arr[:12], original[:12])             # outside the mask: the image
        assert np.abs(arr[24:40, 24:40] - original[24:40, 24:40]).mean() > 1   # inside: LaMa's paint
        out = generate(studio, inpaint_unit(module="inpaint_only+lama"))
        assert np.array_equal(out[:4], original[:4])
    finally:
        path.unlink()
        studio.preprocessors.unload()


def test_a_units_drawn_mask_is_its_scribble_unless_the_option_says_otherwise(studio):
    """The extension's "canvas scribble mode": a non-inpaint unit with a painted mask reads the mask."""
    req = Txt2ImgRequest(**BASE, controlnet_units=(ControlNetUnitRequest(
        module="none", model="cn-inpaint", image=gradient(), mask=centre_mask()),))
    detected = np.asarray(studio.txt2img(req).detected_maps[0])
    assert np.array_equal(detected, np.asarray(centre_mask().convert("RGB")))
    studio.settings.update({"control_net_ignore_noninpaint_mask": True})
    try:
        detected = np.asarray(studio.txt2img(req).detected_maps[0])
    finally:
        studio.settings.update({"control_net_ignore_noninpaint_mask": False})
    assert np.array_equal(detected, np.asarray(gradient()))


def test_inpaint_only_resize_and_fill_outpaints_without_a_mask(studio):
    """A 64x32 picture on a 64x64 canvas: the border "Resize and Fill" adds is generated, the picture
    itself is kept (the extension's outpainting with the inpaint model)."""
    wide = gradient().resize((64, 32))
    out = generate(studio, inpaint_unit(mask=None, image=wide, resize_mode="Resize and Fill"))
    kept = np.asarray(wide, dtype=np.int16)
    assert np.abs(out[24:40] - kept[8:24]).max() <= 1            # the picture, away from the blurred seam
    assert np.abs(out[:6] - kept[:1]).mean() > 5                  # the generated border
