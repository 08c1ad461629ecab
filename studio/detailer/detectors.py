"""The detectors the Detailer can use, by the name a unit's ``ad_model`` gives.

Three kinds, looked up in this order:
- built in: ``face_opencv`` / ``person_opencv``, OpenCV's bundled Haar cascades (no download);
- added by extensions: ``fn(image, confidence) -> [Box | (Box, mask) | Detection, ...]``;
- YOLO files (``*.pt``) in ``models/adetailer``, as ADetailer lists them (by file name).

YOLO files are pickles of ultralytics' Python classes. The studio reads them with
``torch.load(weights_only=True)`` only, which refuses any class outside torch's allowlist, so a
file can't run code. Without ultralytics installed such a file is refused with a message saying
so; with it, the ultralytics and ``torch.nn`` classes the file names (and nothing else) are
allowed for that load, and ultralytics' ``YOLO`` runs the model loaded that way.

ADetailer's MediaPipe detectors need models the studio doesn't ship: their names are refused,
never mapped to something else behind the user's back.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from studio.detailer.masks import Detection
from studio.errors import RequestError
from studio.restore import face_boxes
from studio.restore.face_boxes import Box

log = logging.getLogger(__name__)

BUILT_IN = "built-in"  # Detector.source of the detectors shipped here; otherwise an extension's name
MEDIAPIPE_MODELS = ("mediapipe_face_full", "mediapipe_face_short", "mediapipe_face_mesh",
                    "mediapipe_face_mesh_eyes_only")
# A Haar hit's score is the cascade's level weight (about 3-8 for clear faces, below 2 for most false
# hits), not a probability: score / 10, capped at 1, is its confidence, so ADetailer's default
# threshold 0.3 keeps weights of 3 and up.
HAAR_SCORE_SCALE = 10.0
# the globals a YOLO pickle may name when ultralytics is installed (classes only)
YOLO_ALLOWED_PREFIXES = ("ultralytics.", "torch.nn.")

DetectorFn = Callable[[Image.Image, float], list[Any]]


@dataclass(frozen=True)
class Detector:
    name: str
    fn: DetectorFn
    source: str = BUILT_IN


def _haar(kind: str) -> DetectorFn:
    def run(image: Image.Image, confidence: float) -> list[Detection]:
        try:
            boxes = face_boxes.detect(image, kind)
        except face_boxes.CascadeMissingError as e:
            raise RequestError(str(e)) from None
        hits = [Box(b.x0, b.y0, b.x1, b.y1, min(1.0, max(0.0, b.score / HAAR_SCORE_SCALE))) for b in boxes]
        return [Detection(b) for b in hits if b.score >= confidence]
    return run


def builtin_detectors() -> list[Detector]:
    return [Detector("face_opencv", _haar("face")), Detector("person_opencv", _haar("person"))]


class DetectorRegistry:
    """Detectors by name: the built-ins, extensions' and the YOLO files in ``models_dir``.
    YOLO models are loaded once per file version and kept (``unload()`` frees them)."""

    def __init__(self, models_dir: Path | str, device: str | Callable[[], str] = ""):
        self.models_dir = Path(models_dir)
        # for ultralytics: "" = its choice (CUDA when there is one), "cpu", "cuda:0"; a callable is asked
        # when a YOLO model first loads (the studio's device policy, resolved then and not at start-up)
        self._device = device
        self._items: dict[str, Detector] = {d.name: d for d in builtin_detectors()}
        self._yolo: dict[Path, tuple[tuple[int, int], Any]] = {}
        self._lock = threading.RLock()

    @property
    def device(self) -> str:
        return self._device() if callable(self._device) else self._device

    # -- listing and registration ---------------------------------------------------------
    def model_files(self) -> dict[str, Path]:
        """``*.pt`` files in the models folder and below, by file name (the first of a name wins)."""
        if not self.models_dir.is_dir():
            return {}
        files: dict[str, Path] = {}
        for path in sorted(self.models_dir.rglob("*.pt")):
            if path.is_file():
                files.setdefault(path.name, path)
        return files

    def names(self) -> list[str]:
        """What ``ad_model`` may be: built-ins, then the files in the models folder, then extensions'."""
        with self._lock:
            items = list(self._items.values())
        builtins = [d.name for d in items if d.source == BUILT_IN]
        files = [n for n in self.model_files() if n not in self._items]
        extensions = [d.name for d in items if d.source != BUILT_IN]
        return builtins + files + extensions

    def add(self, name: str, fn: DetectorFn, source: str) -> None:
        """An extension's detector: ``fn(image, confidence)`` returns a list of ``Box`` (``score`` =
        confidence 0-1), ``(Box, mask)`` pairs (mask: a PIL image of the image's size, white = the
        object, or None) or ``Detection``s. A name already taken is a ValueError."""
        if not name or not isinstance(name, str):
            raise ValueError("a detector needs a name")
        if not callable(fn):
            raise ValueError(f"detector {name!r}: fn must be callable")
        if not source or source == BUILT_IN:
            raise ValueError(f"detector {name!r}: source must name the extension")
        with self._lock:
            if name in self._items:
                raise ValueError(f"a detector named {name!r} is already registered (from {self._items[name].source})")
            if name in self.model_files():
                raise ValueError(f"a detector named {name!r} already exists (a file in {self.models_dir})")
            self._items[name] = Detector(name, fn, source)

    def remove_source(self, source: str) -> list[str]:
        """Forget every detector ``source`` added (an extension disabled or unloaded); their names."""
        with self._lock:
            gone = [n for n, d in self._items.items() if d.source == source and source != BUILT_IN]
            for n in gone:
                del self._items[n]
        return gone

    def unload(self) -> None:
        """Free the YOLO models loaded so far."""
        with self._lock:
            self._yolo.clear()

    # -- use ------------------------------------------------------------------------------
    def check(self, name: str) -> None:
        """Raise the RequestError :meth:`detect` would for ``name`` (before a job is queued): unknown
        names, MediaPipe, YOLO files that can't be loaded safely."""
        self._resolve(name)

    def detect(self, name: str, image: Image.Image, confidence: float = 0.3,
               classes: str = "") -> list[Detection]:
        """Detector ``name``'s hits on ``image`` with confidence >= ``confidence``, in its order.
        ``classes``: YOLO-World's class list ("a, b"), ignored by other detectors (as ADetailer)."""
        detector = self._resolve(name)
        if isinstance(detector, Detector):
            if detector.source == BUILT_IN:
                raw = detector.fn(image, confidence)
            else:
                try:
                    raw = detector.fn(image, confidence)
                except RequestError:
                    raise
                except Exception as e:  # third-party code: its failure is reported with its name
                    raise RequestError(f"ADetailer detector {name!r} from extension {detector.source!r} failed: "
                                       f"{type(e).__name__}: {e}") from e
            found = _normalise(raw, image.size, name)
        else:
            found = detector.detect(image, confidence, classes)
        return [d for d in found if d.confidence >= confidence]

    def _resolve(self, name: str) -> Detector | _UltralyticsModel:
        with self._lock:
            detector = self._items.get(name)
        if detector is not None:
            return detector
        if name in MEDIAPIPE_MODELS:
            raise RequestError(
                f"ADetailer model {name!r} needs MediaPipe, which this studio doesn't ship. Available detectors: "
                f"{', '.join(self.names())}. For ADetailer's YOLO detectors, put the files (face_yolov8n.pt, "
                f"hand_yolov8n.pt, person_yolov8n-seg.pt, ...) in {self.models_dir}.")
        path = self.model_files().get(name)
        if path is None:
            raise RequestError(
                f"ADetailer model {name!r} not found. Available detectors: {', '.join(self.names())}. "
                f"YOLO detector files (*.pt) go in {self.models_dir}.")
        return self._yolo_model(name, path)

    def _yolo_model(self, name: str, path: Path) -> _UltralyticsModel:
        stat = path.stat()
        version = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._yolo.get(path)
            if cached is not None and cached[0] == version:
                return cached[1]
            model = _UltralyticsModel(path, load_yolo_checkpoint(name, path), self.device)
            self._yolo[path] = (version, model)
            return model


def _normalise(raw: Any, size: tuple[int, int], name: str) -> list[Detection]:
    """An extension's answer as Detections; anything else is the extension's error, said with its name."""
    if not isinstance(raw, (list, tuple)):
        raise RequestError(f"ADetailer detector {name!r} returned {type(raw).__name__}, not a list of boxes")
    found = []
    for item in raw:
        if isinstance(item, Detection):
            box, mask = item.box, item.mask
        elif isinstance(item, Box):
            box, mask = item, None
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], Box):
            box, mask = item
        else:
            raise RequestError(f"ADetailer detector {name!r} returned {item!r}; expected Box or (Box, mask)")
        if mask is not None and not isinstance(mask, Image.Image):
            raise RequestError(f"ADetailer detector {name!r} returned a mask of type {type(mask).__name__}, "
                               "not a PIL image")
        if mask is not None and mask.size != size:
            mask = mask.convert("L").resize(size, Image.NEAREST)
        found.append(Detection(box, mask))
    return found


# -- YOLO files ---------------------------------------------------------------------------
def ultralytics_installed() -> bool:
    try:
        return importlib.util.find_spec("ultralytics") is not None
    except (ImportError, ValueError):  # ValueError: a module object without a spec stands in for it
        return False


def _refusal(name: str, path: Path, unsafe: list[str]) -> str:
    shown = ", ".join(unsafe[:6]) + (f" and {len(unsafe) - 6} more" if len(unsafe) > 6 else "")
    return (f"ADetailer model {name!r}: {path.name} is a pickle of Python objects ({shown}) that only "
            "the ultralytics package can build, and this studio never runs pickled code, so it can't use the "
            "file. Use the built-in 'face_opencv' detector (or 'person_opencv'), or a detector extension; with "
            "ultralytics installed the studio loads such files allowing only ultralytics' and torch.nn's classes.")


def _unreadable(name: str, path: Path, e: Exception) -> RequestError:
    return RequestError(f"ADetailer model {name!r}: {path.name} is not a readable PyTorch file "
                        f"({type(e).__name__}: {e})")


def _allowed_class(dotted: str) -> type | None:
    """The class ``dotted`` names, if it is a class of ultralytics or torch.nn; else None."""
    if not dotted.startswith(YOLO_ALLOWED_PREFIXES):
        return None
    module_name, _, attr = dotted.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) else None


def load_yolo_checkpoint(name: str, path: Path) -> Any:
    """The checkpoint in a YOLO ``.pt`` file, loaded with ``weights_only=True`` and nothing more than
    the ultralytics / torch.nn classes it names allowed. RequestError when that isn't possible."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # it names classes outside torch's allowlist (or isn't a pickle at all): see which
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        raise _unreadable(name, path, e) from None
    else:
        return _checked(name, path, ckpt)
    try:
        unsafe = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise _unreadable(name, path, e) from None
    if not ultralytics_installed():
        raise RequestError(_refusal(name, path, unsafe))
    allowed = {dotted: _allowed_class(dotted) for dotted in unsafe}
    refused = [dotted for dotted, cls in allowed.items() if cls is None]
    if refused:
        raise RequestError(f"ADetailer model {name!r}: {path.name} names Python objects outside ultralytics' and "
                           f"torch.nn's classes ({', '.join(refused)}); this studio never runs pickled code, so "
                           "it won't load it. Use 'face_opencv' or a detector extension.")
    # with ultralytics installed: tested with a stand-in module (the real package isn't installed in CI)
    try:
        with torch.serialization.safe_globals(list(allowed.values())):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise RequestError(f"ADetailer model {name!r}: {path.name} could not be loaded safely: {e}") from None
    return _checked(name, path, ckpt)


def _checked(name: str, path: Path, ckpt: Any) -> Any:
    """A YOLO checkpoint is a dict with a model object ("model" or "ema"); plain weights can't be run."""
    import torch

    model = None
    if isinstance(ckpt, dict):
        model = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    if not isinstance(model, torch.nn.Module):
        raise RequestError(f"ADetailer model {name!r}: {path.name} holds no YOLO model object (only weights), "
                           "so the studio can't build a detector from it. Use 'face_opencv' or a detector extension.")
    return ckpt


class _UltralyticsModel:
    """A YOLO model loaded by :func:`load_yolo_checkpoint`, run by ultralytics' ``YOLO``.

    NOT TESTED HERE (ultralytics is not installed in CI). ``YOLO(path)`` would read the file again
    with ultralytics' own loader, which unpickles with ``weights_only=False``; its loader
    (``ultralytics.nn.tasks.torch_safe_load``, looked up at call time by ``load_checkpoint`` /
    ``attempt_load_one_weight`` in ultralytics 8.x) is replaced, for the construction only and under
    the registry's lock, by one that returns the checkpoint loaded safely above."""

    def __init__(self, path: Path, ckpt: Any, device: str):
        self.path, self.device = path, device
        self._ckpt: Any = ckpt
        self._yolo: Any = None
        self._lock = threading.Lock()

    def _model(self) -> Any:
        with self._lock:
            if self._yolo is None:
                from unittest import mock

                from ultralytics import YOLO
                from ultralytics.nn import tasks

                ckpt = self._ckpt

                def safe_loaded(weight: Any, *args: Any, **kwargs: Any) -> tuple[Any, str]:
                    return ckpt, str(weight)

                with mock.patch.object(tasks, "torch_safe_load", safe_loaded):
                    self._yolo = YOLO(str(self.path))
                self._ckpt = None
            return self._yolo

    def detect(self, image: Image.Image, confidence: float, classes: str) -> list[Detection]:
        model = self._model()
        wanted = [c.strip() for c in classes.split(",") if c.strip()]
        if wanted and "-world" in self.path.stem:  # YOLO-World: open vocabulary, as ADetailer
            model.set_classes(wanted)
        result = model(image.convert("RGB"), conf=confidence, device=self.device, verbose=False,
                       retina_masks=True)[0]
        xyxy = result.boxes.xyxy.cpu().numpy().reshape(-1, 4)
        conf = result.boxes.conf.cpu().numpy().reshape(-1)
        masks = result.masks.data.cpu().numpy() if result.masks is not None else None
        found = []
        for i, ((x0, y0, x1, y1), c) in enumerate(zip(xyxy.tolist(), conf.tolist())):
            box = Box(math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1), float(c))
            mask = None
            if masks is not None:
                mask = Image.fromarray(((masks[i] > 0.5) * 255).astype(np.uint8))
                if mask.size != image.size:
                    mask = mask.resize(image.size, Image.NEAREST)
            found.append(Detection(box, mask))
        return found
