"""Opt-in fast modes: token merging (tomesd, lossy, seeded) and regional torch.compile, from the
settings, a request, the API's override_settings and the CLI; plus the attention/layout flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.options import validate_changes as validate_options
from studio.config import Flags, parse_flags
from studio.core import Studio
from studio.devices import resolve_policy
from studio.generation.infotext import infotext_to_fields, parse_infotext
from studio.generation.request import RequestError, Txt2ImgRequest
from studio.optimizations import CompileOptions, TokenMerging, set_compiled, token_merging, token_merging_ratios
from studio.testing.factory import tiny_components
from studio.ui.settings_tab import apply_settings, shown_options
from tests.helpers import make_models_dir

BASE = dict(prompt="a red boat", steps=3, width=64, height=64, seed=5, sampler_name="Euler", save_images=False)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("opt")
    make_models_dir(root)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def test_token_merging_ratios_follow_a1111_fallbacks():
    assert token_merging_ratios({}, img2img=False) == (0.0, 0.0)
    assert token_merging_ratios({"token_merging_ratio": 0.5}, img2img=False) == (0.5, 0.5)
    settings = {"token_merging_ratio": 0.5, "token_merging_ratio_img2img": 0.3, "token_merging_ratio_hr": 0.2}
    assert token_merging_ratios(settings, img2img=False) == (0.5, 0.2)
    assert token_merging_ratios(settings, img2img=True) == (0.3, 0.2)
    # hand-edited config.json: unusable values mean off, never a crash
    assert token_merging_ratios({"token_merging_ratio": "lots", "token_merging_ratio_hr": 7}, False) == (0.0, 0.0)


def test_options_and_requests_refuse_bad_values():
    assert validate_options({"token_merging_ratio": "0.4", "sd_compile_unet": "true"}) == {
        "token_merging_ratio": 0.4, "sd_compile_unet": True}
    with pytest.raises(RequestError, match="token_merging_ratio: Input should be less than or equal to 0.9"):
        validate_options({"token_merging_ratio": 1.5})
    with pytest.raises(RequestError, match="sd_compile_backend: Input should be 'inductor', 'cudagraphs' or"):
        validate_options({"sd_compile_backend": "tensorrt"})
    from studio.generation.request import build_request

    with pytest.raises(RequestError, match="token_merging_ratio: Input should be less than or equal to 0.9"):
        build_request(Txt2ImgRequest, {**BASE, "token_merging_ratio": 0.95})


def test_infotext_carries_the_ratios_back():
    fields = infotext_to_fields(parse_infotext("boat\nSteps: 3, Seed: 1, Token merging ratio: 0.5, "
                                               "Token merging ratio hr: 0.3"))
    assert fields["token_merging_ratio"] == 0.5 and fields["token_merging_ratio_hr"] == 0.3


def test_token_merging_changes_the_image_deterministically_and_is_removed(studio):
    plain = studio.txt2img(Txt2ImgRequest(**BASE))
    merged = studio.txt2img(Txt2ImgRequest(**BASE, token_merging_ratio=0.5))
    again = studio.txt2img(Txt2ImgRequest(**BASE, token_merging_ratio=0.5))
    assert np.abs(pixels(plain) - pixels(merged)).max() > 0, "merging did nothing"
    assert np.array_equal(pixels(merged), pixels(again)), "a seed must still mean one image"
    assert parse_infotext(merged.infotexts[0])["Token merging ratio"] == "0.5"
    assert "Token merging ratio" not in plain.infotexts[0]
    unet = merged.model.unet
    names = {type(m).__name__ for m in unet.modules()}
    assert "BasicTransformerBlock" in names and "ToMeBlock" not in names
    assert not any(hasattr(m, "_tome_info") or m._forward_pre_hooks for m in unet.modules())
    # and the UNet is back to its unpatched self
    after = studio.txt2img(Txt2ImgRequest(**BASE))
    assert np.array_equal(pixels(plain), pixels(after))


def test_settings_ratio_applies_and_a_request_can_turn_it_off(studio):
    studio.settings.update({"token_merging_ratio": 0.5}, persist=False)
    try:
        from_settings = studio.txt2img(Txt2ImgRequest(**BASE))
        off = studio.txt2img(Txt2ImgRequest(**BASE, token_merging_ratio=0.0))
        hires = studio.txt2img(Txt2ImgRequest(**BASE, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2))
    finally:
        studio.settings.update({"token_merging_ratio": 0.0}, persist=False)
    assert parse_infotext(from_settings.infotexts[0])["Token merging ratio"] == "0.5"
    assert "Token merging" not in off.infotexts[0]
    info = parse_infotext(hires.infotexts[0])
    assert info["Token merging ratio"] == "0.5" and info["Token merging ratio hr"] == "0.5"


def test_token_merging_callback_patches_one_pass_and_unpatches_on_error(studio):
    from studio.generation.samplers import effective_schedule, split_sampler_name
    from studio.generation.sampling import BatchSpec, sample
    from studio.generation.step_callbacks import StepCallback
    from studio.prompts.schedule import ConditioningPlan

    model = studio.select_checkpoint("tiny-sd1.safetensors")
    patched = []

    class Fails(StepCallback):
        def unet_kwargs(self, call):
            patched.append(any(type(m).__name__ == "ToMeBlock" for m in model.unet.modules()))
            raise RuntimeError("boom")

    sampler, schedule = split_sampler_name("Euler", "Automatic")
    spec = BatchSpec(plan=ConditioningPlan(model.conditioner, "a boat", "", 3, 1), sampler=sampler,
                     schedule=effective_schedule(sampler, schedule), steps=3, cfg_scale=7.0, eta=None, width=64,
                     height=64, seeds=[5], callbacks=[TokenMerging(0.5), Fails()])
    with pytest.raises(RuntimeError, match="boom"):
        studio.queue.run(lambda state: sample(model, spec, state))
    assert patched == [True]
    assert not any(type(m).__name__ == "ToMeBlock" or hasattr(m, "_tome_info") for m in model.unet.modules())


def test_token_merging_context_is_a_no_op_at_zero():
    unet = tiny_components("sd1")["unet"]
    with token_merging(unet, 0.0, seed=1):
        assert not hasattr(unet, "_tome_info")


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_regional_compile_on_and_off_keeps_outputs():
    torch.manual_seed(0)
    unet = tiny_components("sd1")["unet"].eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        ref = unet(x, 10, ctx).sample
        # "eager" runs dynamo's tracing without code generation: the wiring, not the compiler
        assert set_compiled(unet, CompileOptions(True, "eager"), cache_dir=_tmp())
        blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
        assert blocks and all(b._compiled_call_impl is not None for b in blocks)
        assert not set_compiled(unet, CompileOptions(True, "eager"), cache_dir=_tmp()), "idempotent"
        torch.testing.assert_close(unet(x, 10, ctx).sample, ref)
        assert set_compiled(unet, CompileOptions(False), cache_dir=_tmp())
        assert all(b._compiled_call_impl is None for b in blocks)


def _tmp():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp())


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_compile_setting_reaches_the_loaded_unet(studio):
    plain = studio.txt2img(Txt2ImgRequest(**BASE))
    studio.settings.update({"sd_compile_unet": True, "sd_compile_backend": "eager"}, persist=False)
    try:
        compiled = studio.txt2img(Txt2ImgRequest(**BASE))
        assert compiled.model.unet._studio_compiled == "eager"
    finally:
        studio.settings.update({"sd_compile_unet": False}, persist=False)
    back = studio.txt2img(Txt2ImgRequest(**BASE))
    assert back.model.unet._studio_compiled is None
    assert np.abs(pixels(plain) - pixels(compiled)).max() <= 1


@pytest.mark.slow
def test_inductor_compile_matches_eager(studio):
    """The real compiler (a C++ toolchain; ~1 min cold on 2 cores, seconds from the disk cache)."""
    plain = studio.txt2img(Txt2ImgRequest(**BASE))
    studio.settings.update({"sd_compile_unet": True, "sd_compile_backend": "inductor"}, persist=False)
    try:
        compiled = studio.txt2img(Txt2ImgRequest(**BASE))
    finally:
        studio.settings.update({"sd_compile_unet": False}, persist=False)
    assert (studio.paths.data / "cache" / "torch-compile").is_dir()
    assert np.abs(pixels(plain) - pixels(compiled)).max() <= 2


def test_settings_tab_shows_the_defaults_the_studio_uses(studio):
    """A key missing from config.json is shown with the value the studio really uses, so pressing Apply
    without touching anything saves nothing (it once turned 3 ControlNet units into 1)."""
    from studio.ui.settings_tab import _value

    keys = [key for section in shown_options().values() for key in section]
    assert _value(studio, "control_net_unit_count") == 3
    assert _value(studio, "jpeg_quality") == 80
    untouched = {key: _value(studio, key) for key in keys}
    assert apply_settings(studio, untouched) == "Nothing changed."


def test_settings_tab_saves_checked_values_and_refuses_bad_ones(studio):
    keys = {key for section in shown_options().values() for key in section}
    assert {"token_merging_ratio", "sd_compile_unet", "samples_format"} <= keys
    assert apply_settings(studio, {"token_merging_ratio": 0.0}) == "Nothing changed."
    message = apply_settings(studio, {"token_merging_ratio": 2.0, "jpeg_quality": 50})
    assert message.startswith("❌") and "token_merging_ratio" in message
    assert studio.settings.get("jpeg_quality", 80) == 80, "a refused apply saves nothing"
    try:
        assert apply_settings(studio, {"token_merging_ratio": 0.3, "jpeg_quality": 90}) == (
            "Saved — 2 settings changed:\n- Quality for saved jpeg and webp images (`jpeg_quality`): `80` → `90`\n"
            "- Token merging ratio (lossy) (`token_merging_ratio`): `0` → `0.3`")
        import json

        saved = json.loads(studio.settings.path.read_text())
        assert saved["token_merging_ratio"] == 0.3 and saved["jpeg_quality"] == 90
    finally:
        studio.settings.update({"token_merging_ratio": 0.0, "jpeg_quality": 80}, persist=False)


def test_attention_and_layout_flags():
    flags = parse_flags(["--opt-split-attention", "--opt-channelslast"])
    policy = resolve_policy("cpu", no_half=True, split_attention=flags.opt_split_attention,
                            force_channels_last=flags.opt_channelslast)
    assert policy.attention == "sliced" and policy.channels_last
    default = resolve_policy("cpu", no_half=True)
    assert default.attention == "sdpa" and not default.channels_last


def test_default_policy_keeps_sdpa_and_split_attention_replaces_it(tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

    make_models_dir(tmp_path)
    for split, expected in ((False, AttnProcessor2_0), (True, SlicedAttnProcessor)):
        s = Studio.create(Flags(data_dir=str(tmp_path), no_half=True, opt_split_attention=split))
        try:
            model = s.select_checkpoint("tiny-sd1.safetensors")
            kinds = {type(p) for p in model.unet.attn_processors.values()}
            assert kinds == {expected}, (split, kinds)
        finally:
            s.queue.shutdown()
