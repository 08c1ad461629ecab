"""ControlNet preprocessors ("modules" in sd-webui-controlnet terms).

A :class:`PreprocessorRegistry` is created by the app; it owns the annotators folder and a cache of
loaded detector networks, so two registries never share state.  Every preprocessor receives an RGB
image that the registry has already scaled (see :meth:`PreprocessorRegistry.run`) and returns an RGB
control map.  Weight-needing detectors come from controlnet-aux and are only ever loaded from the
local annotators folder: every file is checked first, because controlnet-aux falls back to the
Hugging Face hub for anything that is not a local folder.

Modules are named as the extension's UI names them ("depth_midas", "softedge_hedsafe"); its internal
keys ("depth", "hed_safe") and long UI names resolve to the same module (:meth:`PreprocessorRegistry.canonical`),
and the variants of one detector (openpose_face/hand/full, hed safe, pidinet scribble/sketch, leres++,
normal_midas from MiDaS) share one loaded network.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from studio.controlnet import model_free
from studio.controlnet.clip_vision import IP_ADAPTER_MODULES
from studio.controlnet.lama import LamaMissing, lama_fill

ANNOTATORS_REPO = "lllyasviel/Annotators"
# sd-webui-controlnet pads the detector input up to a multiple of 64 (resize_image_with_pad) because
# several networks down-sample by 2**6; the pad is cropped off the map afterwards.
PAD_MULTIPLE = 64
BUILT_IN = "built-in"  # Preprocessor.source of the modules shipped here; otherwise an extension's name
# the modules whose map carries a mask (white = generate): the inpaint ControlNets read it
INPAINT_MODULES = ("inpaint", "inpaint_only", "inpaint_only+lama")
# FLUX.1 Redux's module: the reference image as it is, read by a SigLIP encoder in sampling
# (studio.controlnet.redux); its slider is ReduxAdvanced's downsampling factor
REDUX_MODULE = "flux_redux"
REVISION_MODULES = ("revision_clipvision", "revision_ignore_prompt")   # studio.controlnet.revision


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
    """One module: ``name`` is what units and the API send, ``label`` what a person reads."""

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
    # sd-webui-controlnet knows each module by an internal key and a UI alias; the studio's name is
    # one of them (usually the alias). These hold the other one where it differs, so requests using
    # either resolve here and /controlnet/module_list?alias_names= can list the extension's keys.
    ext_name: str | None = None
    ext_label: str | None = None
    # False where the extension lists no resolution slider for the module (its legacy table hides
    # it); the detector still runs at the requested resolution here, default 512.
    resolution_listed: bool = True


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


def _lineart_standard_np(arr: np.ndarray) -> Any:
    detector_cls = _import_aux("lineart_standard", "LineartStandardDetector")
    return detector_cls()(arr, guassian_sigma=6.0, intensity_threshold=8, detect_resolution=min(arr.shape[:2]),
                          output_type="np")


def _lineart_standard(image: Image.Image, resolution: int, slider_1=None, slider_2=None,
                      **ctx) -> Image.Image:
    return Image.fromarray(_as_rgb_array(_lineart_standard_np(np.asarray(image))))


# ---------------------------------------------------------------------------------------------
# weight-needing built-ins (controlnet-aux detectors loaded from the annotators folder)


@dataclass(frozen=True)
class _AuxSpec:
    module: str
    cls: str
    # from_pretrained keyword -> file name; keeps each detector's own parameter names in one place.
    files: dict[str, str]
    # call(detector, rgb array, slider 1, slider 2, ctx) -> map; variants of one network differ only here
    call: Callable[..., Any]
    # the registry's model-cache key: the modules of one network (hed, hedsafe, scribble_hed) share it
    cache_key: str
    # where users get the files, for the missing-file message
    download: str = f"the {ANNOTATORS_REPO} repository"
    load_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def filenames(self) -> tuple[str, ...]:
        return tuple(self.files.values())


def _res(arr: np.ndarray) -> int:
    return int(min(arr.shape[:2]))


def _call_flags(det, arr, s1, s2, ctx, **flags):
    """A detector whose variants are keyword switches (safe, scribble, coarse, include_hand, ...)."""
    return det(arr, detect_resolution=_res(arr), image_resolution=_res(arr), output_type="np", **flags)


def _flags(**flags) -> Callable[..., Any]:
    return functools.partial(_call_flags, **flags)


def _call_openpose(det, arr, s1, s2, ctx, **flags):
    """OpenPose's map; for /controlnet/detect also the keypoints (``ctx["pose_sink"]``), in OpenPose's
    JSON format, as the extension returns them beside the map."""
    out = _call_flags(det, arr, s1, s2, ctx, **flags)
    sink = ctx.get("pose_sink")
    if sink is not None:
        from studio.controlnet.pose_render import poses_to_json

        poses = det.detect_poses(arr, flags.get("include_hand", False), flags.get("include_face", False))
        sink.append(poses_to_json(poses, arr.shape[1], arr.shape[0]))
    return out


def _openpose(**flags) -> Callable[..., Any]:
    return functools.partial(_call_openpose, **flags)


def _call_mlsd(det, arr, s1, s2, ctx):
    return det(arr, thr_v=float(s1), thr_d=float(s2), detect_resolution=_res(arr), image_resolution=_res(arr),
               output_type="np")


def _call_leres(det, arr, s1, s2, ctx, boost: bool = False):
    # boost (depth_leres++) merges estimates at several scales with the pix2pix network
    return det(arr, thr_a=float(s1), thr_b=float(s2), boost=boost, detect_resolution=_res(arr),
               image_resolution=_res(arr), output_type="np")


def _call_normal_midas(det, arr, s1, s2, ctx):
    # MiDaS depth turned into normals by its gradients; s1 is the background threshold below which
    # the (relative) depth counts as background and gets a flat normal
    _, normal = det(arr, bg_th=float(s1), depth_and_normal=True, detect_resolution=_res(arr),
                    image_resolution=_res(arr), output_type="np")
    return normal


def _call_teed(det, arr, s1, s2, ctx):
    return det(arr, detect_resolution=_res(arr), safe_steps=int(s1), output_type="np")


def _call_anyline(det, arr, s1, s2, ctx):
    """The extension's Anyline: MTEED soft edges, and where the standard lineart has intensity
    exactly 1 in groups of at least 36 pixels (counted over the three channels), the map is set
    to 1. Reproduced as it is, so maps match the extension's."""
    from skimage import morphology

    edges = _as_rgb_array(det(arr, detect_resolution=_res(arr), safe_steps=int(s1), output_type="np"))
    lineart = _as_rgb_array(_lineart_standard_np(arr))
    ones = np.repeat((lineart[:, :, :1] == 1), 3, axis=2)
    kept = morphology.remove_small_objects(ones, min_size=36, connectivity=1)
    return np.where(kept, np.uint8(1), edges)


def _call_seeded(det, arr, s1, s2, ctx):
    """A detector that draws random colours from numpy's global generator (segment-anything's
    mask colours): seeded for a repeatable map, the caller's generator state put back after."""
    lock = ctx.get("global_rng_lock") or threading.Lock()
    with lock:
        state = np.random.get_state()
        try:
            np.random.seed(int(ctx.get("seed") or 0) % (2**32))
            return det(arr, detect_resolution=_res(arr), image_resolution=_res(arr), output_type="np")
        finally:
            np.random.set_state(state)


def _check_weights(name: str, annotators_dir: Path, files: tuple[str, ...],
                   download: str = f"the {ANNOTATORS_REPO} repository") -> None:
    folder = Path(annotators_dir).resolve()
    for filename in files:
        if not (folder / filename).is_file():
            raise PreprocessorError(
                f"{name} needs {filename} in {folder} (download it from {download} and put it there)")


def _weighted(name: str, spec: _AuxSpec, default_dir: Path) -> Callable[..., Image.Image]:
    def run(image: Image.Image, resolution: int, slider_1=None, slider_2=None, **ctx) -> Image.Image:
        annotators_dir = Path(ctx.get("annotators_dir") or default_dir)
        models: dict = ctx.get("models") if ctx.get("models") is not None else {}
        lock = ctx.get("models_lock") or threading.Lock()
        with lock:
            detector = models.get(spec.cache_key)
            if detector is None:
                _check_weights(name, annotators_dir, spec.filenames, spec.download)
                detector_cls = _import_aux(spec.module, spec.cls)
                folder = str(annotators_dir.resolve())
                try:
                    detector = detector_cls.from_pretrained(folder, **spec.load_kwargs, **spec.files)
                except ImportError as exc:
                    raise PreprocessorError(
                        f"{name} could not be loaded: the Python package '{exc.name or exc}' is missing") from exc
                except Exception as exc:  # corrupt or mismatched weight files
                    raise PreprocessorError(
                        f"{name} could not load its weights from {folder}: {exc}") from exc
                models[spec.cache_key] = detector
        arr = np.asarray(image)
        import torch

        with torch.inference_mode():
            out = spec.call(detector, arr, slider_1, slider_2, ctx)
        return Image.fromarray(_as_rgb_array(out))

    return run


def _mediapipe_face(image: Image.Image, resolution: int, slider_1=1, slider_2=0.5, **ctx) -> Image.Image:
    """Face mesh landmarks drawn by mediapipe (which ships its own models: no annotator file)."""
    import importlib.util

    # controlnet-aux imports without mediapipe and fails only when drawing: ask first
    if importlib.util.find_spec("mediapipe") is None:
        raise PreprocessorError("mediapipe_face needs the Python package 'mediapipe', which is not installed "
                                "(pip install mediapipe into the studio environment)")
    detector_cls = _import_aux("mediapipe_face", "MediapipeFaceDetector")
    arr = np.asarray(image)
    out = detector_cls()(arr, max_faces=int(slider_1), min_confidence=float(slider_2), detect_resolution=_res(arr),
                         image_resolution=_res(arr), output_type="np")
    return Image.fromarray(_as_rgb_array(out))


# the networks, each once; the modules below pick a call (variant) of one of them
_HED = _AuxSpec("hed", "HEDdetector", {"filename": "ControlNetHED.pth"}, _flags(), "softedge_hed")
_PIDI = _AuxSpec("pidi", "PidiNetDetector", {"filename": "table5_pidinet.pth"}, _flags(), "softedge_pidinet")
_MIDAS = _AuxSpec("midas", "MidasDetector", {"filename": "dpt_hybrid-midas-501f0c75.pt"}, _flags(), "depth_midas")
_OPENPOSE = _AuxSpec("open_pose", "OpenposeDetector",
                     {"filename": "body_pose_model.pth", "hand_filename": "hand_pose_model.pth",
                      "face_filename": "facenet.pth"}, _flags(), "openpose")
_LINEART = _AuxSpec("lineart", "LineartDetector", {"filename": "sk_model.pth", "coarse_filename": "sk_model2.pth"},
                    _flags(), "lineart_realistic")
_LERES = _AuxSpec("leres", "LeresDetector", {"filename": "res101.pth", "pix2pix_filename": "latest_net_G.pth"},
                  _call_leres, "depth_leres")
_TEED_FROM = "the bdsqlsz/qinglong_controlnet-lllite repository (Annotators/7_model.pth)"
_MTEED_FROM = "the TheMistoAI/MistoLine repository (Anyline/MTEED.pth)"


def _variant(spec: _AuxSpec, call: Callable[..., Any]) -> _AuxSpec:
    return dataclasses.replace(spec, call=call)


# Sliders as the extension declares them. Its parameters default to step 0.01 where it names none,
# and its resolution sliders step by 8.
_HIDDEN: Mapping[str, Any] = MappingProxyType({"resolution_listed": False})
_STEP = 0.01
# IP-Adapter UI alias -> the extension's internal key, and back
_IP_ADAPTER_KEYS: Mapping[str, str] = MappingProxyType(
    {"ip-adapter_clip_h": "ip-adapter_clip_sd15", "ip-adapter_clip_g": "ip-adapter_clip_sdxl"})
_IP_ADAPTER_LABELS: Mapping[str, str] = MappingProxyType({key: label for label, key in _IP_ADAPTER_KEYS.items()})


def _aux_modules(annotators_dir: Path) -> list[Preprocessor]:
    """The controlnet-aux modules: (studio name, the extension's internal key if different, spec,
    sliders, listing flags)."""
    remove_near = Slider("Remove Near %", 0, 100, 0, 0.1)
    remove_bg = Slider("Remove Background %", 0, 100, 0, 0.1)
    safe_steps = Slider("Safe Steps", 0, 10, 2, 1)
    table: list[tuple[str, str | None, _AuxSpec, Mapping[str, Any]]] = [
        ("softedge_hed", "hed", _HED, {}),
        ("softedge_hedsafe", "hed_safe", _variant(_HED, _flags(safe=True)), {}),
        ("scribble_hed", None, _variant(_HED, _flags(scribble=True)), {}),
        ("softedge_pidinet", "pidinet", _PIDI, _HIDDEN),
        ("softedge_pidisafe", "pidinet_safe", _variant(_PIDI, _flags(safe=True)), _HIDDEN),
        ("scribble_pidinet", "pidinet_scribble", _variant(_PIDI, _flags(scribble=True)), _HIDDEN),
        ("t2ia_sketch_pidi", "pidinet_sketch", _variant(_PIDI, _flags(apply_filter=True)), _HIDDEN),
        ("mlsd", None, _AuxSpec("mlsd", "MLSDdetector", {"filename": "mlsd_large_512_fp32.pth"}, _call_mlsd, "mlsd"),
         {"slider_1": Slider("MLSD Value Threshold", 0.01, 2.0, 0.1, _STEP),
          "slider_2": Slider("MLSD Distance Threshold", 0.01, 20.0, 0.1, _STEP)}),
        ("depth_midas", "depth", _MIDAS, {}),
        ("normal_midas", "normal_map", _variant(_MIDAS, _call_normal_midas),
         {"slider_1": Slider("Normal Background Threshold", 0.0, 1.0, 0.4, _STEP)}),
        ("openpose", None, _variant(_OPENPOSE, _openpose(include_body=True, include_hand=False, include_face=False)),
         {}),
        ("openpose_face", None,
         _variant(_OPENPOSE, _openpose(include_body=True, include_hand=False, include_face=True)), _HIDDEN),
        ("openpose_faceonly", None,
         _variant(_OPENPOSE, _openpose(include_body=False, include_hand=False, include_face=True)), _HIDDEN),
        ("openpose_full", None,
         _variant(_OPENPOSE, _openpose(include_body=True, include_hand=True, include_face=True)), {}),
        ("openpose_hand", None,
         _variant(_OPENPOSE, _openpose(include_body=True, include_hand=True, include_face=False)), _HIDDEN),
        ("normal_bae", None, _AuxSpec("normalbae", "NormalBaeDetector", {"filename": "scannet.pt"}, _flags(),
                                      "normal_bae"), _HIDDEN),
        # the detector draws black lines on white internally and returns white on black, as ControlNet wants
        ("lineart_realistic", "lineart", _variant(_LINEART, _flags(coarse=False)), _HIDDEN),
        ("lineart_coarse", None, _variant(_LINEART, _flags(coarse=True)), _HIDDEN),
        ("lineart_anime", None, _AuxSpec("lineart_anime", "LineartAnimeDetector", {"filename": "netG.pth"},
                                         _flags(), "lineart_anime"), _HIDDEN),
        ("depth_zoe", None, _AuxSpec("zoe", "ZoeDetector", {"filename": "ZoeD_M12_N.pt"}, _flags(), "depth_zoe"),
         _HIDDEN),
        ("depth_leres", None, _LERES, {"slider_1": remove_near, "slider_2": remove_bg}),
        ("depth_leres++", None, _variant(_LERES, functools.partial(_call_leres, boost=True)),
         {"slider_1": remove_near, "slider_2": remove_bg}),
        ("softedge_teed", None, _AuxSpec("teed", "TEEDdetector", {"filename": "7_model.pth"}, _call_teed,
                                         "softedge_teed", download=_TEED_FROM), {"slider_1": safe_steps}),
        ("softedge_anyline", None, _AuxSpec("teed", "TEEDdetector", {"filename": "MTEED.pth"}, _call_anyline,
                                            "softedge_anyline", download=_MTEED_FROM),
         {"slider_1": safe_steps, "resolution": Slider("Resolution", 64, 2048, 1280, 8)}),
        ("mobile_sam", None, _AuxSpec("segment_anything", "SamDetector", {"filename": "mobile_sam.pt"}, _call_seeded,
                                      "mobile_sam", download="the dhkim2810/MobileSAM repository",
                                      load_kwargs={"model_type": "vit_t"}), {}),
    ]
    return [Preprocessor(name, name, _weighted(name, spec, annotators_dir), needs_weights=spec.filenames,
                         ext_name=ext_name, **options)
            for name, ext_name, spec, options in table]


def builtin_preprocessors(annotators_dir: Path) -> list[Preprocessor]:
    """The built-in modules, named as sd-webui-controlnet's UI names them (its internal keys where
    they differ are aliases: see :meth:`PreprocessorRegistry.aliases`)."""
    annotators_dir = Path(annotators_dir)
    plain: list[Preprocessor] = [
        Preprocessor("none", "None", _identity, resolution=None),
        Preprocessor("invert", "Invert (from white bg & black line)", _invert, resolution=None,
                     ext_label="invert (from white bg & black line)"),
        Preprocessor("canny", "Canny", _canny,
                     slider_1=Slider("Low Threshold", 1, 255, 100),
                     slider_2=Slider("High Threshold", 1, 255, 200)),
        Preprocessor("blur_gaussian", "Blur Gaussian", _blur_gaussian,
                     slider_1=Slider("Sigma", 0.01, 64.0, 9.0, _STEP)),
        Preprocessor("scribble_xdog", "Scribble XDoG", _scribble_xdog,
                     slider_1=Slider("XDoG Threshold", 1, 64, 32, _STEP)),
        Preprocessor("threshold", "Threshold", _threshold,
                     slider_1=Slider("Binarization Threshold", 0, 255, 127, _STEP)),
        Preprocessor("shuffle", "Shuffle", _shuffle, resolution_listed=False),
        Preprocessor("lineart_standard", "Lineart Standard (from white bg & black line)", _lineart_standard,
                     ext_label="lineart_standard (from white bg & black line)", resolution_listed=False),
        Preprocessor("tile_resample", "Tile Resample", _tile_resample, resolution=None,
                     slider_1=Slider("Down Sampling Rate", 1.0, 8.0, 1.0, 0.01)),
        Preprocessor("mediapipe_face", "mediapipe_face", _mediapipe_face,
                     slider_1=Slider("Max Faces", 1, 10, 1, 1),
                     slider_2=Slider("Min Face Confidence", 0.01, 1.0, 0.5, 0.01)),
        *_aux_modules(annotators_dir),
    ]
    # the extension's weight-free image operations (studio/controlnet/model_free.py): recolor has no
    # resolution slider there (the map keeps the input's size); the colour grid has the usual one
    gamma = Slider("Gamma Correction", 0.1, 2.0, 1.0, 0.001)
    plain += [
        Preprocessor("recolor_luminance", "Recolor Luminance", model_free.recolor_luminance, resolution=None,
                     slider_1=gamma),
        Preprocessor("recolor_intensity", "Recolor Intensity", model_free.recolor_intensity, resolution=None,
                     slider_1=gamma),
        Preprocessor("t2ia_color_grid", "T2I-Adapter Color Grid", model_free.color_grid, resolution=RESOLUTION,
                     ext_name="color"),
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
        Preprocessor("inpaint", "inpaint_global_harmonious", _identity, resolution=None,
                     ext_label="inpaint_global_harmonious"),
        Preprocessor("inpaint_only", "inpaint_only", _identity, resolution=None),
        Preprocessor("inpaint_only+lama", "inpaint_only+lama", _lama, resolution=None,
                     needs_weights=("ControlNetLama.pth",)),
        # IP-Adapter: the reference image itself; the unit's CLIP vision encoder reads it in sampling.
        # Both of the extension's names are modules here (runtime reads the name); the pairs are linked
        # so the module list shows each once, under the key alias_names asks for.
        *(Preprocessor(name, name, _identity, resolution=None, ext_name=_IP_ADAPTER_KEYS.get(name),
                       ext_label=_IP_ADAPTER_LABELS.get(name)) for name in IP_ADAPTER_MODULES),
        # SDXL Revision (studio.controlnet.revision): the image's CLIP-G embedding, no model
        *(Preprocessor(name, name, _identity, resolution=None, model_free=True,
                       slider_1=Slider("Noise Augmentation", 0.0, 1.0, 0.0, 0.01)) for name in REVISION_MODULES),
        Preprocessor(REDUX_MODULE, REDUX_MODULE, _identity, resolution=None,
                     slider_1=Slider("Downsampling factor", 1, 9, 1, 1)),
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
        # the extension's other name for a module (internal key or UI alias) -> the registered name
        self._aliases: dict[str, str] = {}
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
        for alias in (p.ext_name, p.ext_label):
            if alias and alias != p.name:
                self._aliases.setdefault(alias, p.name)

    def unregister(self, name: str) -> None:
        if self._items.pop(name, None) is not None:
            self._aliases = {a: n for a, n in self._aliases.items() if n != name}

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of the extension's names for it ("depth" ->
        "depth_midas", "inpaint_global_harmonious" -> "inpaint"). A registered name wins over an alias."""
        if name in self._items:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise PreprocessorError(f"unknown preprocessor {name!r}; available: {', '.join(self.names())}")

    def get(self, name: str) -> Preprocessor:
        return self._items[self.canonical(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._aliases

    def aliases(self) -> dict[str, str]:
        """The extension's names that are not registered names -> the module they stand for."""
        return {a: n for a, n in self._aliases.items() if a not in self._items}

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
        sink = ctx.get("pose_sink")
        found = len(sink) if sink is not None else 0
        out = _control_map(p, Image.fromarray(padded), res, s1, s2, ctx)
        if out.shape[:2] != padded.shape[:2]:
            out = _resize_np(out, (padded.shape[1], padded.shape[0]))
        if sink is not None and len(sink) > found:
            # keypoints were read on the padded image, whose pad is at the right and bottom: the same
            # pixel coordinates hold on the cropped map; only its canvas is smaller
            sink[-1].update(canvas_width=size[0], canvas_height=size[1])
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

    def _api_key(self, p: Preprocessor, alias_names: bool) -> str:
        return (p.ext_label if alias_names else p.ext_name) or p.name

    def api_module_list(self, alias_names: bool = False) -> list[str]:
        """The extension's ``get_modules(alias_names)``: its internal keys, or with ``alias_names``
        its UI names, each module once, in :meth:`names` order."""
        keys: list[str] = []
        for name in self.names():
            key = self._api_key(self._items[name], alias_names)
            if key not in keys:
                keys.append(key)
        return keys

    def api_module_detail(self, alias_names: bool = False) -> dict:
        """Body of the extension's ``/controlnet/module_list?alias_names=...``: ``module_list`` and,
        per listed name, ``model_free`` and the sliders it shows (without a resolution slider where
        the extension hides it)."""
        detail = {}
        for name in self.names():
            p = self._items[name]
            key = self._api_key(p, alias_names)
            if key in detail:
                continue
            shown = (p.resolution if p.resolution_listed else None, p.slider_1, p.slider_2)
            detail[key] = {"model_free": p.model_free, "sliders": [s.api_dict() for s in shown if s is not None]}
        return {"module_list": list(detail), "module_detail": detail}
