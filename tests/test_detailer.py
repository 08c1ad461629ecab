"""The Detailer (ADetailer): argument parsing, detectors (built-in, extensions', YOLO files refused
safely), masks, the loop with a fake inpaint, and the infotext ADetailer writes. No diffusion model:
the engine's inpaint is replaced by one that paints the mask's bounding box and records the call."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from studio.detailer import (
    ADETAILER_COMPAT_VERSION,
    Box,
    Detection,
    DetectorRegistry,
    detailer_from_alwayson,
    expand_prompts,
    inpaint_overrides,
    parse_adetailer,
    run_detailer,
)
from studio.detailer import detectors as detectors_module
from studio.detailer.args import DetailerUnit, key_suffix
from studio.detailer.masks import box_mask, build_masks, dilate_erode, filter_by_ratio, filter_k, offset
from studio.errors import RequestError
from studio.generation.infotext import build_infotext, parse_infotext

RED = (255, 0, 0)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((256, 256), Image.LANCZOS)


@pytest.fixture
def registry(tmp_path) -> DetectorRegistry:
    return DetectorRegistry(tmp_path / "models" / "adetailer")


class FakeInpaint:
    """Paints the mask's bounding box red (or the whole mask, for inverted masks) and records calls."""

    def __init__(self, whole_mask: bool = False):
        self.calls: list[tuple[Image.Image, dict[str, Any]]] = []
        self.whole_mask = whole_mask

    def __call__(self, image: Image.Image, mask: Image.Image, overrides: dict[str, Any]) -> Image.Image:
        self.calls.append((mask.copy(), dict(overrides)))
        out = image.copy()
        if self.whole_mask:
            out.paste(Image.new("RGB", image.size, RED), (0, 0), mask)
        else:
            out.paste(RED, mask.getbbox())
        return out


def boxes_detector(*boxes: Box, seen: list | None = None):
    def fn(image: Image.Image, confidence: float) -> list[Box]:
        if seen is not None:
            seen.append((image.size, confidence))
        return list(boxes)
    return fn


def one_unit(**fields: Any):
    config = parse_adetailer([True, False, {"ad_model": "face_opencv", **fields}])
    assert config is not None
    return config


# --------------------------------------------------------------------------- arguments


def test_parse_arg_shapes():
    unit = {"ad_model": "face_opencv", "ad_prompt": "a face"}
    for args in ([True, False, unit], [True, unit], [unit], (True, False, unit)):
        config = parse_adetailer(args)
        assert config is not None and [u.ad_prompt for _, u in config.enabled_units()] == ["a face"]
        assert config.skip_img2img is False
    assert parse_adetailer([True, True, unit]).skip_img2img is True
    assert parse_adetailer([False, False, unit]) is None          # ad_enable off
    assert parse_adetailer([False, unit]) is None
    assert parse_adetailer([True, False]) is None                 # no unit
    assert parse_adetailer([]) is None
    assert parse_adetailer([True, False, {"ad_model": "None"}]) is None            # ADetailer skips "None"
    assert parse_adetailer([{"ad_model": "face_opencv", "ad_tab_enable": False}]) is None
    # a skipped unit keeps its place: the 2nd unit is still the 2nd
    config = parse_adetailer([True, False, {"ad_model": "None"}, {"ad_model": "face_opencv"}])
    assert [n for n, _ in config.enabled_units()] == [1]
    assert config.model_names() == ["face_opencv"]
    assert "ADetailer model 2nd" in config.infotext_params()
    with pytest.raises(RequestError, match="must be a list"):
        parse_adetailer({"ad_model": "face_opencv"})


def test_parse_defaults_old_names_unknown_keys_and_ranges():
    unit = DetailerUnit()
    assert (unit.ad_model, unit.ad_confidence, unit.ad_dilate_erode, unit.ad_mask_blur, unit.ad_denoising_strength,
            unit.ad_inpaint_only_masked, unit.ad_inpaint_only_masked_padding, unit.ad_inpaint_width,
            unit.ad_mask_merge_invert, unit.ad_scheduler) == ("None", 0.3, 4, 4, 0.4, True, 32, 512, "None",
                                                              "Use same scheduler")
    config = one_unit(ad_mask_k_largest=2, is_api=[], some_future_field=1)   # pre-24.11 name; unknown keys
    assert config.units[0].ad_mask_k == 2
    assert one_unit(ad_mask_k=3, ad_mask_k_largest=2).units[0].ad_mask_k == 3
    with pytest.raises(RequestError, match="ADetailer 1st unit: ad_confidence"):
        one_unit(ad_confidence=1.5)
    with pytest.raises(RequestError, match="ADetailer 2nd unit: ad_mask_merge_invert"):
        parse_adetailer([{"ad_model": "face_opencv"}, {"ad_model": "face_opencv", "ad_mask_merge_invert": "Both"}])
    with pytest.raises(RequestError, match="ad_dilate_erode"):
        one_unit(ad_dilate_erode=200)


def test_unsupported_fields_refused_with_their_names():
    with pytest.raises(RequestError, match="ADetailer: ad_controlnet_model is not supported"):
        one_unit(ad_controlnet_model="control_v11p_sd15_inpaint")
    with pytest.raises(RequestError, match="ADetailer: ad_use_noise_multiplier is not supported"):
        one_unit(ad_use_noise_multiplier=True, ad_noise_multiplier=0.9)
    one_unit(ad_use_noise_multiplier=True, ad_noise_multiplier=1.0)   # x1 changes nothing: accepted
    one_unit(ad_use_noise_multiplier=False, ad_noise_multiplier=0.9)  # not used: accepted
    # a unit that doesn't run is not checked (ADetailer ignores it entirely)
    assert parse_adetailer([{"ad_model": "None", "ad_controlnet_model": "x"}, {"ad_model": "face_opencv"}])


def test_from_alwayson_title_in_any_case():
    unit = {"ad_model": "face_opencv"}
    assert detailer_from_alwayson({"ADetailer": {"args": [True, False, unit]}}) is not None
    assert detailer_from_alwayson({"adetailer": {"args": [unit]}}) is not None
    assert detailer_from_alwayson({"controlnet": {"args": []}}) is None
    assert detailer_from_alwayson(None) is None


def test_suffixes():
    assert [key_suffix(n) for n in (0, 1, 2, 3, 10, 11, 12, 20, 21)] == [
        "", " 2nd", " 3rd", " 4th", " 11th", " 12th", " 13th", " 21st", " 22nd"]


def test_infotext_for_two_units_as_adetailer_writes_it():
    config = parse_adetailer([True, False,
                              {"ad_model": "face_opencv", "ad_prompt": "detailed face, [PROMPT]"},
                              {"ad_model": "hand_yolov8n.pt", "ad_negative_prompt": "bad hands", "ad_mask_k": 2,
                               "ad_use_steps": True, "ad_steps": 20, "ad_inpaint_only_masked": False,
                               "ad_use_sampler": True, "ad_sampler": "Euler a", "ad_x_offset": 8,
                               "ad_mask_merge_invert": "Merge"}])
    params = config.infotext_params()
    assert list(params.items()) == [
        ("ADetailer model", "face_opencv"),
        ("ADetailer prompt", "detailed face, [PROMPT]"),
        ("ADetailer confidence", 0.3),
        ("ADetailer dilate erode", 4),
        ("ADetailer mask blur", 4),
        ("ADetailer denoising strength", 0.4),
        ("ADetailer inpaint only masked", True),
        ("ADetailer inpaint padding", 32),
        ("ADetailer model 2nd", "hand_yolov8n.pt"),
        ("ADetailer negative prompt 2nd", "bad hands"),
        ("ADetailer confidence 2nd", 0.3),
        ("ADetailer method to decide top k masks 2nd", "Area"),
        ("ADetailer mask only top k 2nd", 2),
        ("ADetailer x offset 2nd", 8),
        ("ADetailer dilate erode 2nd", 4),
        ("ADetailer mask merge invert 2nd", "Merge"),
        ("ADetailer mask blur 2nd", 4),
        ("ADetailer denoising strength 2nd", 0.4),
        ("ADetailer inpaint only masked 2nd", False),   # written when off; only its padding is left out
        ("ADetailer use separate steps 2nd", True),
        ("ADetailer steps 2nd", 20),
        ("ADetailer use separate sampler 2nd", True),
        ("ADetailer sampler 2nd", "Euler a"),       # "Use same scheduler" is left out
        ("ADetailer version", ADETAILER_COMPAT_VERSION),
    ]
    text = build_infotext("a photo", "", {"Steps": 20, "Seed": 1, **params})
    assert 'ADetailer prompt: "detailed face, [PROMPT]"' in text   # the writer quotes it, as A1111
    parsed = parse_infotext(text)
    assert parsed["ADetailer prompt"] == "detailed face, [PROMPT]"
    assert parsed["ADetailer inpaint only masked"] == "True" and parsed["ADetailer version"] == "25.3.0"


def test_inpaint_overrides_from_unit_switches():
    base = inpaint_overrides(DetailerUnit(ad_model="face_opencv"))
    assert base == {"denoising_strength": 0.4, "mask_blur": 4, "inpainting_fill": 1, "inpaint_full_res": True,
                    "inpaint_full_res_padding": 32, "inpainting_mask_invert": 0, "resize_mode": 0,
                    "restore_faces": False}
    # values without their "use" switch change nothing
    assert inpaint_overrides(DetailerUnit(ad_steps=9, ad_cfg_scale=3, ad_checkpoint="x", ad_clip_skip=2)) == base
    unit = DetailerUnit(ad_use_inpaint_width_height=True, ad_inpaint_width=768, ad_inpaint_height=640,
                        ad_use_steps=True, ad_steps=12, ad_use_cfg_scale=True, ad_cfg_scale=5.5,
                        ad_use_sampler=True, ad_sampler="Euler a", ad_scheduler="Karras",
                        ad_use_checkpoint=True, ad_checkpoint="other.safetensors", ad_use_vae=True,
                        ad_vae="vae.pt", ad_use_clip_skip=True, ad_clip_skip=2, ad_restore_face=True,
                        ad_inpaint_only_masked=False, ad_inpaint_only_masked_padding=64)
    assert inpaint_overrides(unit) == {
        "denoising_strength": 0.4, "mask_blur": 4, "inpainting_fill": 1, "inpaint_full_res": False,
        "inpaint_full_res_padding": 64, "inpainting_mask_invert": 0, "resize_mode": 0, "restore_faces": True,
        "width": 768, "height": 640, "steps": 12, "cfg_scale": 5.5, "sampler_name": "Euler a",
        "scheduler": "Karras", "clip_skip": 2,
        "override_settings": {"sd_model_checkpoint": "other.safetensors", "sd_vae": "vae.pt"}}
    same = inpaint_overrides(DetailerUnit(ad_use_sampler=True, ad_sampler="Use same sampler",
                                          ad_use_checkpoint=True, ad_checkpoint="Use same checkpoint",
                                          ad_use_vae=True, ad_vae="Use same VAE"))
    assert same == base


def test_expand_prompts():
    assert expand_prompts("", "main") == ["main"]
    assert expand_prompts("a [SEP] [PROMPT], b [SEP]", "main") == ["a", "main, b", "main"]
    assert expand_prompts("[PROMPT] and [PROMPT]", "x") == ["x and x"]


# --------------------------------------------------------------------------- masks


def test_mask_operations():
    size = (40, 30)
    mask = box_mask(Box(10, 10, 20, 15), size)
    arr = np.asarray(mask)
    assert arr.sum() == 10 * 5 * 255 and arr[10, 10] == 255 and arr[14, 19] == 255 and arr[15, 20] == 0
    up_right = np.asarray(offset(mask, 5, 3))        # x right, y UP (ADetailer's axes)
    assert Image.fromarray(up_right).getbbox() == (15, 7, 25, 12)
    gone = np.asarray(offset(mask, 0, 100))          # falls off; never wraps round
    assert not gone.any()
    # cv2's 4-px square kernel is anchored at (2, 2): it grows 1 px up/left and 2 px down/right
    assert dilate_erode(mask, 4).getbbox() == (9, 9, 22, 17)
    assert dilate_erode(mask, -4).getbbox() == (12, 12, 19, 14)
    assert build_masks([Detection(Box(10, 10, 12, 12))], size, dilate=-4) == []   # eroded away: dropped
    merged = build_masks([Detection(Box(0, 0, 5, 5)), Detection(Box(30, 20, 40, 30))], size, mode="Merge")
    assert len(merged) == 1 and np.asarray(merged[0]).sum() == (25 + 100) * 255
    inverted = build_masks([Detection(Box(0, 0, 5, 5))], size, mode="Merge and Invert")
    assert np.asarray(inverted[0]).sum() == (40 * 30 - 25) * 255
    own = Image.new("L", size, 0)
    own.paste(255, (1, 1, 3, 3))
    assert build_masks([Detection(Box(0, 0, 40, 30), own)], size)[0].getbbox() == (1, 1, 3, 3)


def test_filters():
    dets = [Detection(Box(0, 0, 10, 10, 0.9)), Detection(Box(0, 0, 40, 40, 0.5)),
            Detection(Box(0, 0, 20, 20, 0.7))]
    assert [d.box.width for d in filter_k(dets, 0)] == [10, 40, 20]
    assert [d.box.width for d in filter_k(dets, 2)] == [40, 20]
    assert [d.box.width for d in filter_k(dets, 2, "Confidence")] == [10, 20]
    # ratios of a 100x100 image: 0.01, 0.16, 0.04
    assert [d.box.width for d in filter_by_ratio(dets, (100, 100), 0.02, 0.1)] == [20]
    assert [d.box.width for d in filter_by_ratio(dets, (100, 100), 0.0, 0.04)] == [10, 20]


# --------------------------------------------------------------------------- detectors


def test_face_opencv_finds_the_astronauts_face(astronaut, registry):
    found = registry.detect("face_opencv", astronaut, 0.3)
    assert len(found) == 1
    box = found[0].box
    assert 70 <= box.x0 <= 100 and 125 <= box.x1 <= 155 and 15 <= box.y0 <= 45 and 70 <= box.y1 <= 100
    assert 0.3 <= found[0].confidence <= 1
    assert registry.detect("face_opencv", astronaut, 1.0) == []     # above its confidence


def test_names_lists_builtins_files_and_extensions(registry):
    registry.models_dir.mkdir(parents=True)
    (registry.models_dir / "face_yolov8n.pt").write_bytes(b"")
    (registry.models_dir / "sub").mkdir()
    (registry.models_dir / "sub" / "hand_yolov8n.pt").write_bytes(b"")
    (registry.models_dir / "notes.txt").write_text("x")
    registry.add("ext_face", boxes_detector(), source="my_ext")
    assert registry.names() == ["face_opencv", "person_opencv", "face_yolov8n.pt", "hand_yolov8n.pt", "ext_face"]


@pytest.mark.parametrize("name", ["mediapipe_face_full", "mediapipe_face_short", "mediapipe_face_mesh",
                                  "mediapipe_face_mesh_eyes_only"])
def test_mediapipe_names_refused(registry, name):
    config = parse_adetailer([{"ad_model": name}])   # a valid request: refused by the registry
    with pytest.raises(RequestError) as e:
        registry.check(config.model_names()[0])
    message = str(e.value)
    assert name in message and "MediaPipe" in message and "face_opencv" in message
    assert str(registry.models_dir) in message
    with pytest.raises(RequestError, match="MediaPipe"):
        run_detailer(Image.new("RGB", (64, 64)), config, registry, FakeInpaint(), "p", "n")


def test_unknown_name_refused(registry):
    with pytest.raises(RequestError, match=r"'face_yolov8n.pt' not found.*face_opencv.*models/adetailer"):
        registry.check("face_yolov8n.pt")


def write_fake_yolo(path: Path, monkeypatch, extra: Any = None) -> None:
    """A .pt whose pickle names ``ultralytics.nn.tasks.DetectionModel`` (and torch.nn's Conv2d), as a
    real YOLO file does: the class lives in a fake module that exists only while saving."""
    import torch

    names = ("ultralytics", "ultralytics.nn", "ultralytics.nn.tasks")
    modules = {n: types.ModuleType(n) for n in names}

    class DetectionModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

    DetectionModel.__module__ = "ultralytics.nn.tasks"
    DetectionModel.__qualname__ = DetectionModel.__name__ = "DetectionModel"
    modules["ultralytics.nn.tasks"].DetectionModel = DetectionModel
    path.parent.mkdir(parents=True, exist_ok=True)
    with monkeypatch.context() as m:
        for n, module in modules.items():
            m.setitem(sys.modules, n, module)
        ckpt = {"model": DetectionModel(), "train_args": {"imgsz": 640}}
        if extra is not None:
            ckpt["extra"] = extra
        torch.save(ckpt, path)
    return modules


def test_pickled_yolo_refused_without_running_it(registry, monkeypatch):
    write_fake_yolo(registry.models_dir / "face_yolov8n.pt", monkeypatch)
    assert "ultralytics" not in sys.modules
    assert "face_yolov8n.pt" in registry.names()
    with pytest.raises(RequestError) as e:
        registry.check("face_yolov8n.pt")
    message = str(e.value)
    assert "ultralytics.nn.tasks.DetectionModel" in message
    assert "never runs pickled code" in message and "face_opencv" in message and "extension" in message
    with pytest.raises(RequestError, match="never runs pickled code"):
        run_detailer(Image.new("RGB", (64, 64)), one_unit(ad_model="face_yolov8n.pt"), registry, FakeInpaint(),
                     "p", "n")


class Boom:
    """Stands for code a pickle could run: reduced to a call of ``record``."""

    calls: list[str] = []

    def __reduce__(self):
        return (sys.modules["evil"].record, ("ran",))


def test_yolo_allowlist_only_takes_ultralytics_and_torch_nn_classes(registry, monkeypatch):
    """With ultralytics 'installed' (a stand-in module), the file's ultralytics / torch.nn classes are
    allowed and it loads; a file that also names anything else is refused, and nothing of it runs."""
    path = registry.models_dir / "face_yolov8n.pt"
    modules = write_fake_yolo(path, monkeypatch)
    for n, module in modules.items():
        monkeypatch.setitem(sys.modules, n, module)
    monkeypatch.setattr(detectors_module, "ultralytics_installed", lambda: True)
    registry.check("face_yolov8n.pt")   # loads: only allowlisted classes (ultralytics + torch.nn.Conv2d)

    calls: list[str] = []

    def record(what: str) -> None:
        calls.append(what)

    record.__module__, record.__qualname__ = "evil", "record"
    evil = types.ModuleType("evil")
    evil.record = record
    monkeypatch.setitem(sys.modules, "evil", evil)
    write_fake_yolo(registry.models_dir / "evil.pt", monkeypatch, extra=Boom())
    with pytest.raises(RequestError, match=r"evil.pt names Python objects outside .*evil\.record"):
        registry.check("evil.pt")
    assert calls == []


def test_plain_weights_and_broken_files_refused(registry):
    import torch

    registry.models_dir.mkdir(parents=True)
    torch.save({"weight": torch.zeros(2)}, registry.models_dir / "weights.pt")
    (registry.models_dir / "broken.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(RequestError, match="holds no YOLO model object"):
        registry.check("weights.pt")
    with pytest.raises(RequestError, match="not a readable PyTorch file"):
        registry.check("broken.pt")


def test_extension_detectors_add_clash_fail_remove(registry):
    seen: list = []
    registry.add("blob", boxes_detector(Box(4, 4, 20, 20, 0.9), seen=seen), source="ext1")
    found = registry.detect("blob", Image.new("RGB", (64, 48)), 0.25)
    assert [d.box for d in found] == [Box(4, 4, 20, 20, 0.9)] and seen == [((64, 48), 0.25)]
    assert registry.detect("blob", Image.new("RGB", (64, 48)), 0.95) == []   # below the threshold
    with pytest.raises(ValueError, match="already registered"):
        registry.add("blob", boxes_detector(), source="ext2")
    with pytest.raises(ValueError, match="already registered"):
        registry.add("face_opencv", boxes_detector(), source="ext2")

    def broken(image, confidence):
        raise KeyError("no weights")

    registry.add("broken", broken, source="ext2")
    registry.add("odd", lambda image, confidence: "a box", source="ext2")
    with pytest.raises(RequestError, match="'broken' from extension 'ext2' failed: KeyError"):
        registry.detect("broken", Image.new("RGB", (8, 8)))
    with pytest.raises(RequestError, match="'odd' returned str"):
        registry.detect("odd", Image.new("RGB", (8, 8)))
    assert sorted(registry.remove_source("ext2")) == ["broken", "odd"]
    assert "broken" not in registry.names() and "blob" in registry.names()
    assert registry.remove_source("built-in") == [] and "face_opencv" in registry.names()


# --------------------------------------------------------------------------- the loop


def test_detailer_changes_only_the_dilated_face_box(astronaut, registry):
    face = registry.detect("face_opencv", astronaut, 0.3)[0].box
    inpaint = FakeInpaint()
    config = one_unit(ad_prompt="a detailed face")
    out, params = run_detailer(astronaut, config, registry, inpaint, "an astronaut", "blurry", seed=7, subseed=9)
    assert len(inpaint.calls) == 1
    mask, overrides = inpaint.calls[0]
    assert mask.size == astronaut.size and mask.mode == "L"
    assert overrides == {"prompt": "a detailed face", "negative_prompt": "blurry", "seed": 7, "subseed": 9,
                         **inpaint_overrides(config.units[0])}
    # the mask is the face box grown by the 4-px kernel (1 px up/left, 2 px down/right)
    x0, y0, x1, y1 = mask.getbbox()
    assert (x0, y0, x1, y1) == (face.x0 - 1, face.y0 - 1, face.x1 + 2, face.y1 + 2)
    changed = np.any(np.asarray(out) != np.asarray(astronaut), axis=2)
    assert Image.fromarray(changed).getbbox() == (x0, y0, x1, y1)   # nothing outside it changed
    outside = np.ones_like(changed)
    outside[y0:y1, x0:x1] = False
    assert not changed[outside].any()
    assert params["ADetailer model"] == "face_opencv" and params["ADetailer prompt"] == "a detailed face"


def test_nothing_detected_leaves_the_image(registry):
    image = Image.new("RGB", (96, 96), (90, 120, 150))
    inpaint = FakeInpaint()
    out, params = run_detailer(image, one_unit(), registry, inpaint, "p", "n")
    assert inpaint.calls == [] and np.array_equal(np.asarray(out), np.asarray(image))
    assert params["ADetailer version"] == ADETAILER_COMPAT_VERSION


def test_sep_prompt_skip_and_seeds_per_detection(registry):
    boxes = [Box(2, 2, 12, 12, 0.9), Box(20, 2, 30, 12, 0.9), Box(40, 2, 50, 12, 0.9), Box(2, 30, 12, 40, 0.9)]
    registry.add("four", boxes_detector(*boxes), source="ext")
    config = one_unit(ad_model="four", ad_prompt="red eyes [SEP] [SKIP] [SEP] [PROMPT], smiling",
                      ad_negative_prompt="[SEP]ugly", ad_dilate_erode=0)
    inpaint = FakeInpaint()
    run_detailer(Image.new("RGB", (64, 64)), config, registry, inpaint, "a man", "lowres", seed=100)
    # detection 2 is [SKIP]ped; the last prompt is reused for detection 4
    assert [(o["prompt"], o["negative_prompt"], o["seed"]) for _, o in inpaint.calls] == [
        ("red eyes", "lowres", 100), ("a man, smiling", "ugly", 102), ("a man, smiling", "ugly", 103)]
    assert "subseed" not in inpaint.calls[0][1]
    assert [m.getbbox() for m, _ in inpaint.calls] == [(2, 2, 12, 12), (40, 2, 50, 12), (2, 30, 12, 40)]


def test_each_inpaint_starts_from_the_last_and_units_in_order(registry):
    registry.add("left", boxes_detector(Box(0, 0, 8, 8, 1.0)), source="ext")
    registry.add("right", boxes_detector(Box(24, 24, 32, 32, 1.0)), source="ext")
    config = parse_adetailer([{"ad_model": "left", "ad_prompt": "one"}, {"ad_model": "right", "ad_prompt": "two"}])
    seen_red: list[int] = []

    def inpaint(image, mask, overrides):
        seen_red.append(int((np.asarray(image)[..., 0] == 255).sum()))
        return FakeInpaint()(image, mask, overrides)

    out, params = run_detailer(Image.new("RGB", (32, 32)), config, registry, inpaint, "p", "n")
    assert seen_red == [0, 10 * 10]          # the 2nd unit sees the 1st unit's result (8x8 box, dilated)
    assert (np.asarray(out)[..., 0] == 255).sum() == 10 * 10 + 9 * 9   # the 2nd is cut by the image's edge
    assert params["ADetailer model 2nd"] == "right" and params["ADetailer prompt 2nd"] == "two"


def test_k_largest_and_ratio_filtering_in_the_loop(registry):
    boxes = [Box(0, 0, 10, 10, 0.9), Box(20, 20, 60, 60, 0.4), Box(70, 70, 90, 90, 0.6)]
    registry.add("three", boxes_detector(*boxes), source="ext")
    image = Image.new("RGB", (100, 100))

    def run(**fields):
        inpaint = FakeInpaint()
        run_detailer(image, one_unit(ad_model="three", ad_dilate_erode=0, **fields), registry, inpaint, "p", "n")
        return [m.getbbox() for m, _ in inpaint.calls]

    assert run() == [(0, 0, 10, 10), (20, 20, 60, 60), (70, 70, 90, 90)]
    assert run(ad_mask_k=1) == [(20, 20, 60, 60)]
    assert run(ad_mask_k=2, ad_mask_filter_method="Confidence") == [(0, 0, 10, 10), (70, 70, 90, 90)]
    assert run(ad_mask_min_ratio=0.02, ad_mask_max_ratio=0.1) == [(70, 70, 90, 90)]
    assert run(ad_confidence=0.5) == [(0, 0, 10, 10), (70, 70, 90, 90)]


def test_merge_and_invert_in_the_loop(registry):
    registry.add("two", boxes_detector(Box(4, 4, 12, 12, 1.0), Box(40, 30, 50, 40, 1.0)), source="ext")
    image = Image.new("RGB", (64, 48), (0, 0, 255))
    inpaint = FakeInpaint(whole_mask=True)
    out, _ = run_detailer(image, one_unit(ad_model="two", ad_dilate_erode=0, ad_mask_merge_invert="Merge"),
                          registry, inpaint, "p", "n")
    assert len(inpaint.calls) == 1
    assert (np.asarray(inpaint.calls[0][0]) > 0).sum() == 64 + 100
    assert (np.asarray(out)[..., 0] == 255).sum() == 64 + 100

    inpaint = FakeInpaint(whole_mask=True)
    out, _ = run_detailer(image, one_unit(ad_model="two", ad_dilate_erode=0,
                                          ad_mask_merge_invert="Merge and Invert"), registry, inpaint, "p", "n")
    assert len(inpaint.calls) == 1
    red = np.asarray(out)[..., 0] == 255
    assert red.sum() == 64 * 48 - 164 and not red[4:12, 4:12].any() and not red[30:40, 40:50].any()


def test_extension_masks_region_and_stop(registry):
    own = Image.new("L", (64, 64), 0)
    own.paste(255, (10, 10, 14, 30))                  # a segmentation mask thinner than its box
    registry.add("seg", lambda image, confidence: [(Box(10, 10, 30, 30, 0.8), own),
                                                   (Box(40, 40, 60, 60, 0.8), None)], source="ext")
    inpaint = FakeInpaint()
    run_detailer(Image.new("RGB", (64, 64)), one_unit(ad_model="seg", ad_dilate_erode=0), registry, inpaint, "p", "n")
    assert [m.getbbox() for m, _ in inpaint.calls] == [(10, 10, 14, 30), (40, 40, 60, 60)]

    region = Image.new("L", (64, 64), 0)
    region.paste(255, (45, 45, 50, 50))                # img2img inpaint of the whole picture: the user's mask
    inpaint = FakeInpaint()
    run_detailer(Image.new("RGB", (64, 64)), one_unit(ad_model="seg", ad_dilate_erode=0), registry, inpaint, "p",
                 "n", region=region)
    assert [m.getbbox() for m, _ in inpaint.calls] == [(40, 40, 60, 60)]

    inpaint = FakeInpaint()
    run_detailer(Image.new("RGB", (64, 64)), one_unit(ad_model="seg"), registry, inpaint, "p", "n",
                 should_stop=lambda: len(inpaint.calls) >= 1)
    assert len(inpaint.calls) == 1
