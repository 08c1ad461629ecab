"""ControlNet preprocessors ("modules" in sd-webui-controlnet terms).

A :class:`PreprocessorRegistry` is created by the app; it owns the annotators folder and a cache of
loaded detector networks, so two registries never share state.  Every preprocessor receives an RGB
image that the registry has already scaled (see :meth:`PreprocessorRegistry.run`) and returns an RGB
control map.  Weight-needing detectors come from controlnet-aux and are only ever loaded from the
local annotators folder: every file is checked first, because controlnet-aux falls back to the
Hugging Face hub for anything that is not a local folder.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from studio.controlnet import model_free
from studio.controlnet.ip_adapter import IP_ADAPTER_MODULES
from studio.controlnet.lama import LamaMissing, lama_fill

ANNOTATORS_REPO = "lllyasviel/Annotators"
# sd-webui-controlnet pads the detector input up to a multiple of 64 (resize_image_with_pad) because
# several networks down-sample by 2**6; the pad is cropped off the map afterwards.
PAD_MULTIPLE = 64
BUILT_IN = "built-in"  # Preprocessor.source of the modules shipped here; otherwise an extension's name
# the modules whose map carries a mask (white = generate): the inpaint ControlNets read it
INPAINT_MODULES = ("inpaint", "inpaint_only", "inpaint_only+lama")


@dataclass(frozen=True)
class Slider:
    """A preprocessor parameter the UI draws as a slider."""

    label: str
    minimum: float
    maximum: float
    value: float
    step: float = 1.0

    def api_dict(self) -> dict:
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum,
                "step": self.step}


class PreprocessorError(ValueError):
    """A preprocessor cannot run: unknown name, missing weights or a missing optional package."""


RESOLUTION = Slider("Resolution", 64, 2048, 512, 8)


@dataclass(frozen=True)
class Preprocessor:
    name: str
    label: str
    run: Callable[..., Image.Image]
    resolution: Slider | None = RESOLUTION
    slider_1: Slider | None = None
    slider_2: Slider | None = None
    needs_weights: tuple[str, ...] = ()
    source: str = BUILT_IN
    # The extension's notion: True only for modules that work without any ControlNet model.
    model_free: bool = False


# ---------------------------------------------------------------------------------------------
# image helpers


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparency is flattened onto white like the extension's HWC3."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def scaled_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Size with the short side equal to ``resolution`` and the aspect ratio kept."""
    k = resolution / min(width, height)
    return max(1, round(width * k)), max(1, round(height * k))


def _resize_np(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2  # OpenCV loads on first use: start-up stays fast

    w, h = size
    if (arr.shape[1], arr.shape[0]) == (w, h):
        return arr
    shrinking = w * h < arr.shape[0] * arr.shape[1]
    return cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def _as_rgb_array(result: Any) -> np.ndarray:
    if isinstance(result, Image.Image):
        return np.asarray(to_rgb(result))
    arr = np.asarray(result)
    if arr.dtype != np.uint8:
        arr = arr.clip(0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = np.asarray(to_rgb(Image.fromarray(arr, "RGBA")))
    return arr


def _pad_to_multiple(arr: np.ndarray, multiple: int) -> np.ndarray:
    h, w = arr.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return arr
    # Edge replication keeps the pad free of artificial borders that edge detectors would trace.
    return np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="edge")


# ---------------------------------------------------------------------------------------------
# weight-free built-ins (numpy / cv2)


def _identity(image: Image.Image, resolution: int, slider_1=None, slider_2=None, **ctx) -> Image.Image:
    return image


def _invert(image: Image.Image, resolution: int, slider_1=None, slider_2=None, **ctx) -> Image.Image:
    return Image.fromarray(255 - np.asarray(image))


def _canny(image: Image.Image, resolution: int, slider_1=100, slider_2=200, **ctx) -> Image.Image:
    import cv2

    edges = cv2.Canny(np.asarray(image), int(slider_1), int(slider_2))
    return Image.fromarray(edges).convert("RGB")


def _blur_gaussian(image: Image.Image, resolution: int, slider_1=9.0, slider_2=None, **ctx) -> Image.Image:
    import cv2

    return Image.fromarray(cv2.GaussianBlur(np.asarray(image), (0, 0), float(slider_1)))


def _scribble_xdog(image: Image.Image, resolution: int, slider_1=32, slider_2=None, **ctx) -> Image.Image:
    import cv2

    x = np.asarray(image).astype(np.float32)
    fine = cv2.GaussianBlur(x, (0, 0), 0.5)
    coarse = cv2.GaussianBlur(x, (0, 0), 5.0)
    # Dark strokes are where the fine image is darker than its surroundings in every channel.
    strength = np.min(coarse - fine, axis=2).clip(0, 255)
    out = np.where(2.0 * strength > float(slider_1), 255, 0).astype(np.uint8)
    return Image.fromarray(out).convert("RGB")


def _lama(image: Image.Image, resolution: int, slider_1=None, slider_2=None, **ctx) -> Image.Image:
    """inpaint_only+lama's map: the image with its masked area filled by LaMa."""
    mask = ctx.get("mask")
    if mask is None:
        raise PreprocessorError("inpaint_only+lama needs a mask (white = the area to generate)")
    try:
        return lama_fill(image, mask, Path(ctx["annotators_dir"]), ctx["models"], ctx["models_lock"])
    except LamaMissing as e:
        raise PreprocessorError(str(e)) from e


def _threshold(image: Image.Image, resolution: int, slider_1=127, slider_2=None, **ctx) -> Image.Image:
    arr = np.asarray(image)
    return Image.fromarray(np.where(arr > float(slider_1), 255, 0).astype(np.uint8))


def _tile_resample(image: Image.Image, resolution: int, slider_1=1.0, slider_2=None, **ctx) -> Image.Image:
    import cv2

    rate = max(1.0, float(slider_1))
    if rate == 1.0:
        return image
    arr = np.asarray(image)
    h, w = arr.shape[:2]
    small = cv2.resize(arr, (max(1, int(w / rate)), max(1, int(h / rate))), interpolation=cv2.INTER_AREA)
    # Restored to the input size so the map lines up with the generation like every other module.
    return Image.fromarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))


def _import_aux(module: str, attr: str):
    """Import one controlnet-aux class; a missing dependency becomes a clear PreprocessorError."""
    import importlib

    try:
        return getattr(importlib.import_module(f"controlnet_aux.{module}"), attr)
    except ImportError as exc:
        missing = exc.name or str(exc)
        raise PreprocessorError(
            f"controlnet_aux.{module} could not be imported: the Python package '{missing}' is missing "
            f"(install it into the studio environment)") from exc


def _shuffle(image: Image.Image, resolution: int, slider_1=None, slider_2=None, **ctx) -> Image.Image:
    detector_cls = _import_aux("shuffle", "ContentShuffleDetector")
    arr = np.asarray(image)
    h, w = arr.shape[:2]
    seed = int(ctx.get("seed") or 0) % (2**32)
    # The detector draws from numpy's global generator; seed it for a repeatable map and put the
    # caller's generator state back afterwards.
    lock = ctx.get("global_rng_lock") or threading.Lock()
    with lock:
        state = np.random.get_state()
        try:
            np.random.seed(seed)
            out = detector_cls()(arr, detect_resolution=min(h, w), image_resolution=min(h, w),
                                 output_type="np")
        finally:
            np.random.set_state(state)
    return Image.fromarray(_resize_np(_as_rgb_array(out), (w, h)))


def _lineart_standard(image: Image.Image, resolution: int, slider_1=None, slider_2=None,
                      **ctx) -> Image.Image:
    detector_cls = _import_aux("lineart_standard", "LineartStandardDetector")
    arr = np.asarray(image)
    out = detector_cls()(arr, guassian_sigma=6.0, intensity_threshold=8, detect_resolution=min(arr.shape[:2]),
                         output_type="np")
    return Image.fromarray(_as_rgb_array(out))


# ---------------------------------------------------------------------------------------------
# weight-needing built-ins (controlnet-aux detectors loaded from the annotators folder)


@dataclass(frozen=True)
class _AuxSpec:
    module: str
    cls: str
    # from_pretrained keyword -> file name; keeps each detector's own parameter names in one place.
    files: dict[str, str]
    call: Callable[[Any, np.ndarray, Any, Any], Any]

    @property
    def filenames(self) -> tuple[str, ...]:
        return tuple(self.files.values())


def _res(arr: np.ndarray) -> int:
    return int(min(arr.shape[:2]))


def _call_plain(det, arr, s1, s2):
    return det(arr, detect_resolution=_res(arr), image_resolution=_res(arr), output_type="np")


def _call_mlsd(det, arr, s1, s2):
    return det(arr, thr_v=float(s1), thr_d=float(s2), detect_resolution=_res(arr), image_resolution=_res(arr),
               output_type="np")


def _call_openpose(det, arr, s1, s2):
    return det(arr, detect_resolution=_res(arr), image_resolution=_res(arr), include_body=True,
               include_hand=False, include_face=False, output_type="np")


def _call_leres(det, arr, s1, s2):
    return det(arr, thr_a=float(s1), thr_b=float(s2), boost=False, detect_resolution=_res(arr),
               image_resolution=_res(arr), output_type="np")


def _call_lineart_realistic(det, arr, s1, s2):
    # The detector draws black lines on white internally and returns white on black, as ControlNet wants.
    return det(arr, coarse=False, detect_resolution=_res(arr), image_resolution=_res(arr), output_type="np")


def _check_weights(name: str, annotators_dir: Path, files: tuple[str, ...]) -> None:
    folder = Path(annotators_dir).resolve()
    for filename in files:
        if not (folder / filename).is_file():
            raise PreprocessorError(
                f"{name} needs {filename} in {folder} (download it from the {ANNOTATORS_REPO} repository "
                f"and put it there)")


def _weighted(name: str, spec: _AuxSpec, default_dir: Path) -> Callable[..., Image.Image]:
    def run(image: Image.Image, resolution: int, slider_1=None, slider_2=None, **ctx) -> Image.Image:
        annotators_dir = Path(ctx.get("annotators_dir") or default_dir)
        models: dict = ctx.get("models") if ctx.get("models") is not None else {}
        lock = ctx.get("models_lock") or threading.Lock()
        with lock:
            detector = models.get(name)
            if detector is None:
                _check_weights(name, annotators_dir, spec.filenames)
                detector_cls = _import_aux(spec.module, spec.cls)
                folder = str(annotators_dir.resolve())
                try:
                    detector = detector_cls.from_pretrained(folder, **spec.files)
                except ImportError as exc:
                    raise PreprocessorError(
                        f"{name} could not be loaded: the Python package '{exc.name or exc}' is missing") from exc
                except Exception as exc:  # corrupt or mismatched weight files
                    raise PreprocessorError(
                        f"{name} could not load its weights from {folder}: {exc}") from exc
                models[name] = detector
        arr = np.asarray(image)
        import torch

        with torch.inference_mode():
            out = spec.call(detector, arr, slider_1, slider_2)
        return Image.fromarray(_as_rgb_array(out))

    return run


def builtin_preprocessors(annotators_dir: Path) -> list[Preprocessor]:
    """The built-in modules, named as in sd-webui-controlnet."""
    annotators_dir = Path(annotators_dir)
    plain: list[Preprocessor] = [
        Preprocessor("none", "None", _identity, resolution=None),
        Preprocessor("invert", "Invert (from white bg & black line)", _invert, resolution=None),
        Preprocessor("canny", "Canny", _canny,
                     slider_1=Slider("Low Threshold", 1, 255, 100),
                     slider_2=Slider("High Threshold", 1, 255, 200)),
        Preprocessor("blur_gaussian", "Blur Gaussian", _blur_gaussian,
                     slider_1=Slider("Sigma", 0.01, 64.0, 9.0, 0.01)),
        Preprocessor("scribble_xdog", "Scribble XDoG", _scribble_xdog,
                     slider_1=Slider("XDoG Threshold", 1, 64, 32)),
        Preprocessor("threshold", "Threshold", _threshold,
                     slider_1=Slider("Binarization Threshold", 0, 255, 127)),
        Preprocessor("shuffle", "Shuffle", _shuffle),
        Preprocessor("lineart_standard", "Lineart Standard (from white bg & black line)", _lineart_standard),
        Preprocessor("tile_resample", "Tile Resample", _tile_resample, resolution=None,
                     slider_1=Slider("Down Sampling Rate", 1.0, 8.0, 1.0, 0.01)),
    ]
    weighted: list[tuple[str, str, _AuxSpec, Slider | None, Slider | None]] = [
        ("softedge_hed", "SoftEdge HED", _AuxSpec("hed", "HEDdetector", {"filename": "ControlNetHED.pth"},
                                                   _call_plain), None, None),
        ("softedge_pidinet", "SoftEdge PiDiNet",
         _AuxSpec("pidi", "PidiNetDetector", {"filename": "table5_pidinet.pth"}, _call_plain), None, None),
        ("mlsd", "M-LSD", _AuxSpec("mlsd", "MLSDdetector", {"filename": "mlsd_large_512_fp32.pth"}, _call_mlsd),
         Slider("MLSD Value Threshold", 0.01, 2.0, 0.1, 0.01),
         Slider("MLSD Distance Threshold", 0.01, 20.0, 0.1, 0.01)),
        ("depth_midas", "Depth MiDaS",
         _AuxSpec("midas", "MidasDetector", {"filename": "dpt_hybrid-midas-501f0c75.pt"}, _call_plain),
         None, None),
        ("openpose", "OpenPose",
         _AuxSpec("open_pose", "OpenposeDetector",
                  {"filename": "body_pose_model.pth", "hand_filename": "hand_pose_model.pth",
                   "face_filename": "facenet.pth"}, _call_openpose), None, None),
        ("normal_bae", "Normal BAE", _AuxSpec("normalbae", "NormalBaeDetector", {"filename": "scannet.pt"},
                                               _call_plain), None, None),
        ("lineart_realistic", "Lineart Realistic",
         _AuxSpec("lineart", "LineartDetector", {"filename": "sk_model.pth", "coarse_filename": "sk_model2.pth"},
                  _call_lineart_realistic), None, None),
        ("lineart_anime", "Lineart Anime",
         _AuxSpec("lineart_anime", "LineartAnimeDetector", {"filename": "netG.pth"}, _call_plain), None, None),
        ("depth_zoe", "Depth ZoeDepth",
         _AuxSpec("zoe", "ZoeDetector", {"filename": "ZoeD_M12_N.pt"}, _call_plain), None, None),
        ("depth_leres", "Depth LeReS",
         _AuxSpec("leres", "LeresDetector", {"filename": "res101.pth", "pix2pix_filename": "latest_net_G.pth"},
                  _call_leres),
         Slider("Remove Near %", 0, 100, 0, 0.1), Slider("Remove Background %", 0, 100, 0, 0.1)),
    ]
    for name, label, spec, s1, s2 in weighted:
        plain.append(Preprocessor(name, label, _weighted(name, spec, annotators_dir), slider_1=s1, slider_2=s2,
                                  needs_weights=spec.filenames))
    # the extension's weight-free image operations (studio/controlnet/model_free.py): recolor has no
    # resolution slider there (the map keeps the input's size); the colour grid has the usual one
    gamma = Slider("Gamma Correction", 0.1, 2.0, 1.0, 0.001)
    plain += [
        Preprocessor("recolor_luminance", "Recolor Luminance", model_free.recolor_luminance, resolution=None,
                     slider_1=gamma),
        Preprocessor("recolor_intensity", "Recolor Intensity", model_free.recolor_intensity, resolution=None,
                     slider_1=gamma),
        Preprocessor("color", "T2I-Adapter Color Grid", model_free.color_grid, resolution=RESOLUTION),
    ]
    # modules whose work is done in sampling (studio/controlnet/reference.py, latent_fixes.py): the map is
    # the image itself, at its own size; reference_* need no ControlNet model at all
    fidelity = Slider("Style Fidelity (only for Balanced mode)", 0.0, 1.0, 0.5, 0.01)
    variation = Slider("Variation", 3.0, 32.0, 8.0, 1.0)
    plain += [
        Preprocessor("reference_only", "reference_only", _identity, resolution=None, slider_1=fidelity,
                     model_free=True),
        Preprocessor("reference_adain", "reference_adain", _identity, resolution=None, slider_1=fidelity,
                     model_free=True),
        Preprocessor("reference_adain+attn", "reference_adain+attn", _identity, resolution=None,
                     slider_1=fidelity, model_free=True),
        Preprocessor("inpaint", "inpaint_global_harmonious", _identity, resolution=None),
        Preprocessor("inpaint_only", "inpaint_only", _identity, resolution=None),
        Preprocessor("inpaint_only+lama", "inpaint_only+lama", _lama, resolution=None,
                     needs_weights=("ControlNetLama.pth",)),
        # IP-Adapter: the reference image itself; the unit's CLIP vision encoder reads it in sampling
        *(Preprocessor(name, name, _identity, resolution=None) for name in IP_ADAPTER_MODULES),
        Preprocessor("tile_colorfix", "tile_colorfix", _identity, resolution=None, slider_1=variation),
        Preprocessor("tile_colorfix+sharp", "tile_colorfix+sharp", _identity, resolution=None, slider_1=variation,
                     slider_2=Slider("Sharpness", 0.0, 2.0, 1.0, 0.01)),
    ]
    return plain


# ---------------------------------------------------------------------------------------------
# registry


def _control_map(p: Preprocessor, image: Image.Image, resolution: int, slider_1: Any, slider_2: Any,
                 ctx: dict[str, Any]) -> np.ndarray:
    """``p``'s output as an RGB array. An extension's module failing (or returning something that is
    not an image) is the extension's fault, not the server's: a PreprocessorError naming it, which
    the API answers with a 400. A built-in failing stays what it is, a bug to see in full."""
    if p.source == BUILT_IN:
        return _as_rgb_array(p.run(image, resolution, slider_1, slider_2, **ctx))
    try:
        return _as_rgb_array(p.run(image, resolution, slider_1, slider_2, **ctx))
    except Exception as e:  # third-party code: any failure is reported, with its type
        raise PreprocessorError(
            f"preprocessor {p.name!r} from extension {p.source!r} failed: {type(e).__name__}: {e}") from e


def _slider_value(slider: Slider | None, given: float | None) -> float | None:
    """The value to use: the slider default for None, or for -1 on a slider that cannot go negative
    (the A1111 API's "use the default" sentinel), else ``given`` clamped to the slider range."""
    if slider is None:
        return given
    if given is None or (given == -1 and slider.minimum > -1):
        return slider.value
    return float(min(max(float(given), slider.minimum), slider.maximum))


class PreprocessorRegistry:
    """Preprocessors by name, plus the detector networks loaded so far (one cache per registry)."""

    def __init__(self, annotators_dir: Path):
        self.annotators_dir = Path(annotators_dir)
        self._items: dict[str, Preprocessor] = {}
        self._models: dict[str, Any] = {}
        self._models_lock = threading.Lock()
        self._rng_lock = threading.Lock()

    @classmethod
    def with_builtins(cls, annotators_dir: Path) -> PreprocessorRegistry:
        registry = cls(annotators_dir)
        for p in builtin_preprocessors(registry.annotators_dir):
            registry.register(p)
        return registry

    def register(self, p: Preprocessor) -> None:
        if p.name in self._items:
            raise ValueError(f"a preprocessor named {p.name!r} is already registered "
                             f"(from {self._items[p.name].source})")
        self._items[p.name] = p

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> Preprocessor:
        try:
            return self._items[name]
        except KeyError:
            raise PreprocessorError(
                f"unknown preprocessor {name!r}; available: {', '.join(self.names())}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        rest = sorted(n for n in self._items if n != "none")
        return (["none"] if "none" in self._items else []) + rest

    def unload(self) -> None:
        """Forget every loaded detector network (frees its memory)."""
        with self._models_lock:
            self._models.clear()

    def run(self, name: str, image: Image.Image, resolution: int | None = 512, slider_1: float | None = None,
            slider_2: float | None = None, **ctx: Any) -> Image.Image:
        """Run preprocessor ``name`` on ``image`` and return its RGB control map.

        Like sd-webui-controlnet's ``resize_image_with_pad``: the image is flattened to RGB and scaled so its
        short side is ``resolution`` (clamped to the slider range; None or -1 means the default), then
        edge-padded to a multiple of 64 for the detector, and the pad is cropped off the map.  The map
        therefore has the scaled size, not the input size; the caller fits it to the generation.
        Preprocessors without a resolution slider get and return the input at its own size.
        Extra keyword arguments (``seed`` for shuffle) are handed to the preprocessor.
        """
        p = self.get(name)
        rgb = to_rgb(image)
        s1 = _slider_value(p.slider_1, slider_1)
        s2 = _slider_value(p.slider_2, slider_2)
        ctx = {**ctx, "annotators_dir": self.annotators_dir, "models": self._models,
               "models_lock": self._models_lock, "global_rng_lock": self._rng_lock}
        if p.resolution is None:
            return Image.fromarray(_control_map(p, rgb, 0, s1, s2, ctx))
        res = int(_slider_value(p.resolution, resolution))
        size = scaled_size(rgb.width, rgb.height, res)
        arr = _resize_np(np.asarray(rgb), size)
        padded = _pad_to_multiple(arr, PAD_MULTIPLE)
        out = _control_map(p, Image.fromarray(padded), res, s1, s2, ctx)
        if out.shape[:2] != padded.shape[:2]:
            out = _resize_np(out, (padded.shape[1], padded.shape[0]))
        return Image.fromarray(np.ascontiguousarray(out[: size[1], : size[0]]))

    def resolve_params(self, name: str, resolution: float | None, slider_1: float | None,
                       slider_2: float | None) -> tuple[int, float, float]:
        """The (resolution, slider 1, slider 2) that :meth:`run` would use, for the infotext; -1 stands
        for a slider the preprocessor does not have, as in the extension's infotext."""
        p = self.get(name)
        res = _slider_value(p.resolution, resolution) if p.resolution is not None else -1
        s1 = _slider_value(p.slider_1, slider_1) if p.slider_1 is not None else -1
        s2 = _slider_value(p.slider_2, slider_2) if p.slider_2 is not None else -1
        return int(res), float(s1), float(s2)

    def api_module_list(self) -> list[str]:
        return self.names()

    def api_module_detail(self) -> dict:
        """Shape of the extension's ``/controlnet/module_list?alias_names=false`` response."""
        detail = {}
        for name in self.names():
            p = self._items[name]
            sliders = [s.api_dict() for s in (p.resolution, p.slider_1, p.slider_2) if s is not None]
            detail[name] = {"model_free": p.model_free, "sliders": sliders}
        return {"module_list": self.names(), "module_detail": detail}
