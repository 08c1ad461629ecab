"""The face restorers on disk (A1111's "Restore faces"): which files there are, loading them, using them.

Folders as A1111 lays them out under the data dir's ``models/``:

- ``GFPGAN/``: GFPGAN files, and RestoreFormer files (A1111 keeps those there too). A1111 also
  stores facexlib's helper weights here (``detection_*.pth``, ``parsing_*.pth``); they are skipped.
- ``Codeformer/`` (or ``CodeFormer/``): CodeFormer files.
- ``RestoreFormer/``: accepted for RestoreFormer files as well.

A file's kind is told from its name first (it contains "codeformer", "restoreformer" or
"gfpgan"; else the folder decides), so listing reads no weights. Loading (spandrel, on first use) has the last
word: a file that turns out to be another kind, or no face model at all, is refused by name.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from PIL import Image

from studio.errors import RequestError
from studio.restore.face_boxes import detect
from studio.upscale.errors import UpscalerError
from studio.upscale.models import MODEL_SUFFIXES, place_model, read_state_dict

if TYPE_CHECKING:  # spandrel takes ~2 s to import: only when a model is first loaded
    import spandrel
    import torch

KINDS = ("CodeFormer", "GFPGAN", "RestoreFormer")  # A1111's names, in its list order
# The folder a user is told to use comes first.
FOLDERS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "CodeFormer": ("Codeformer", "CodeFormer"),
    "GFPGAN": ("GFPGAN",),
    "RestoreFormer": ("GFPGAN", "RestoreFormer"),
})
_FOLDER_KIND: Mapping[str, str] = MappingProxyType(
    {"codeformer": "CodeFormer", "gfpgan": "GFPGAN", "restoreformer": "RestoreFormer"}
)
# Looked for in file names before the folder counts; the rarer words first.
_NAME_KIND = (("codeformer", "CodeFormer"), ("restoreformer", "RestoreFormer"), ("gfpgan", "GFPGAN"))
_EXAMPLE_NAMES: Mapping[str, str] = MappingProxyType(
    {"CodeFormer": "codeformer-v0.1.0.pth", "GFPGAN": "GFPGANv1.4.pth", "RestoreFormer": "RestoreFormer.pth"}
)
# facexlib's detector and face parser, which A1111 downloads into models/GFPGAN
_HELPER_PREFIXES = ("detection_", "parsing_")
MAX_LOADED = 2  # face models are 80-380 MB each; two cover switching between a pair


class FaceRestoreError(RequestError):
    """A face restorer that cannot be used as asked: unknown or missing kind, unusable file, bad value."""


@dataclass(frozen=True)
class FaceModelFile:
    """A face restoration file found on disk; ``kind`` as guessed from its name and folder."""

    kind: str
    path: Path


def kind_from_name(path: Path, folder: str) -> str | None:
    """The kind a file's name says it is, else the kind of ``folder`` (the one under ``models/``).

    ``None`` for facexlib's helper files and for folders that hold no face restorers.
    """
    name = path.name.lower()
    if name.startswith(_HELPER_PREFIXES):
        return None
    for word, kind in _NAME_KIND:
        if word in name:
            return kind
    return _FOLDER_KIND.get(folder.lower())


def find_face_models(models_dir: Path) -> list[FaceModelFile]:
    """Every face restoration file under ``models_dir``'s folders (sub-folders too), newest first within a kind."""
    folders: dict[Path, str] = {}
    for names in FOLDERS.values():
        for name in names:
            folder = models_dir / name
            if folder.is_dir():
                folders.setdefault(folder.resolve(), name)  # Codeformer == CodeFormer on some file systems
    found: list[tuple[float, FaceModelFile]] = []
    for folder, folder_name in folders.items():
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() not in MODEL_SUFFIXES or not path.is_file():
                continue
            kind = kind_from_name(path, folder_name)
            if kind is not None:
                found.append((path.stat().st_mtime, FaceModelFile(kind, path)))
    # A1111 picks the newest GFPGAN file; newest first for every kind keeps it one rule
    found.sort(key=lambda item: (KINDS.index(item[1].kind), -item[0], str(item[1].path)))
    return [item[1] for item in found]


def _face_registry() -> spandrel.ArchRegistry:
    """spandrel's architectures plus CodeFormer, without adding it to spandrel's global registry.

    CodeFormer lives in spandrel-extra-arches (its licence keeps it out of spandrel). Installing
    that package into ``MAIN_REGISTRY`` would also add its nine other architectures to what the
    upscaler library detects, and only once a face had been restored; a copy (copy-on-write, cheap)
    keeps the upscalers' behaviour independent of whether this ran.
    """
    import spandrel
    import spandrel_extra_arches

    registry = spandrel.MAIN_REGISTRY.copy()
    if "CodeFormer" not in registry:
        registry.add(spandrel_extra_arches.EXTRA_REGISTRY["CodeFormer"], ignore_duplicates=True)
    return registry


def load_face_model(path: Path, expected: str | None = None) -> spandrel.ImageModelDescriptor:
    """The face restoration model in ``path``, on the CPU in float32 and in eval mode.

    Reading goes through the upscalers' :func:`read_state_dict` (safetensors, or a pickle that may
    hold tensors only). Every failure is a :class:`FaceRestoreError` naming the file: unreadable,
    unknown architecture, weights that do not fit, not a face model, or (with ``expected``) a
    face model of another kind than its name said.
    """
    import spandrel

    try:
        state = read_state_dict(path)
    except UpscalerError as exc:
        raise FaceRestoreError(str(exc)) from exc
    try:
        descriptor = spandrel.ModelLoader(device="cpu", registry=_face_registry()).load_from_state_dict(state)
    except spandrel.UnsupportedModelError as exc:
        raise FaceRestoreError(
            f"{path}: not a face restoration model (none of the known architectures' key layouts "
            f"fits its {len(state)} tensors); GFPGAN, CodeFormer and RestoreFormer files are supported"
        ) from exc
    except Exception as exc:
        # Detection matched an architecture but the weights did not fit it (truncated or edited file).
        raise FaceRestoreError(f"{path}: looks like a known model but its weights do not load ({exc})") from exc
    arch = str(descriptor.architecture.id)
    if descriptor.purpose != "FaceSR" or not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise FaceRestoreError(
            f"{path}: not a face restoration model: it is a {descriptor.architecture.name} "
            f"{descriptor.purpose} model (upscalers belong in models/ESRGAN)"
        )
    if expected is not None and arch in KINDS and arch != expected:
        raise FaceRestoreError(
            f"{path}: is a {arch} model, not {expected}; rename it so its name contains {arch!r}"
        )
    return descriptor.float().eval()


class FaceRestorers:
    """The face restorers of one data dir: listing, choosing, loading (cached) and restoring.

    Up to ``max_loaded`` models stay loaded, keyed by path, modification time and size, so a
    replaced file is read again. Safe to call from several threads; model runs are serialised.
    """

    def __init__(self, models_dir: Path, max_loaded: int = MAX_LOADED) -> None:
        self.models_dir = Path(models_dir)
        self.max_loaded = max(1, max_loaded)
        self._lock = threading.RLock()
        self._files: list[FaceModelFile] = []
        self._loaded: OrderedDict[tuple[str, int, int], spandrel.ImageModelDescriptor] = OrderedDict()
        self.refresh()

    # -- listing ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Scan the folders again (after files were added or removed)."""
        files = find_face_models(self.models_dir)
        with self._lock:
            self._files = files

    def files(self) -> list[FaceModelFile]:
        """Every face restoration file found, by kind, newest first within a kind."""
        with self._lock:
            return list(self._files)

    def file_for(self, kind: str) -> FaceModelFile | None:
        """The file ``kind`` uses (the newest of its files), or ``None``."""
        return next((item for item in self.files() if item.kind == kind), None)

    def names(self) -> list[str]:
        """The kinds with a file present, in A1111's order: "CodeFormer", "GFPGAN", "RestoreFormer"."""
        present = {item.kind for item in self.files()}
        return [kind for kind in KINDS if kind in present]

    def api_list(self) -> list[dict[str, str | None]]:
        """A1111's ``GET /sdapi/v1/face-restorers`` items for the present kinds.

        A1111 lists its restorers whether or not their weights were downloaded yet (it fetches
        them on first use); nothing is downloaded here, so only what can run is listed.
        ``cmd_dir`` is the folder of the file in use.
        """
        return [{"name": kind, "cmd_dir": str(self.file_for(kind).path.parent)} for kind in self.names()]

    def folder_hint(self, kind: str) -> str:
        """Where a user puts a ``kind`` file: "models/Codeformer" under this data dir."""
        return str(self.models_dir / FOLDERS[kind][0])

    @staticmethod
    def check_name(name: str | None) -> None:
        """Refuse a restorer name the studio doesn't know (before a job is queued); whether its file is
        installed only matters once a face is found."""
        if name and str(name).strip() and str(name).strip().lower() not in (k.lower() for k in KINDS):
            raise FaceRestoreError(f"Unknown face restorer {name!r}: choose one of {', '.join(KINDS)}")

    def resolve(self, name: str | None) -> str:
        """The kind ``name`` asks for, checked to have a file: A1111's spelling, any case.

        ``None`` picks A1111's default: CodeFormer if present, else the first present kind.
        Raises :class:`FaceRestoreError` saying what to do when it is unknown or absent.
        """
        present = self.names()
        if not present:  # maybe a file was dropped in since the last scan
            self.refresh()
            present = self.names()
        if name is None or not str(name).strip():
            if present:
                return "CodeFormer" if "CodeFormer" in present else present[0]
            raise FaceRestoreError(
                "No face restoration model found: put codeformer-v0.1.0.pth in "
                f"{self.folder_hint('CodeFormer')} or GFPGANv1.4.pth in {self.folder_hint('GFPGAN')}"
            )
        kind = next((k for k in KINDS if k.lower() == str(name).strip().lower()), None)
        if kind is None:
            raise FaceRestoreError(f"Unknown face restorer {name!r}: choose one of {', '.join(KINDS)}")
        if kind not in present:
            self.refresh()
            present = self.names()
        if kind not in present:
            others = ", ".join(present) if present else "none"
            raise FaceRestoreError(
                f"No {kind} model found: put a {kind} file (such as {_EXAMPLE_NAMES[kind]}, or .safetensors) "
                f"in {self.folder_hint(kind)}. Face restorers present: {others}"
            )
        return kind

    # -- loading ---------------------------------------------------------------------------

    def load(self, kind: str) -> spandrel.ImageModelDescriptor:
        """The model of ``kind`` (already :meth:`resolve`-d), loaded once and cached on the CPU or where it last ran."""
        item = self.file_for(kind)
        if item is None:
            raise FaceRestoreError(f"No {kind} model found in {self.folder_hint(kind)}")
        try:
            stat = item.path.stat()
        except FileNotFoundError as exc:
            self.refresh()
            raise FaceRestoreError(f"{item.path}: file not found (removed since the folder was scanned)") from exc
        key = (str(item.path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            descriptor = load_face_model(item.path, expected=kind)
            self._loaded[key] = descriptor
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
            return descriptor

    def offload(self) -> None:
        """Move the loaded models to the CPU (A1111's ``face_restoration_unload``), keeping them loaded."""
        import torch
        with self._lock:
            for descriptor in self._loaded.values():
                descriptor.to(torch.device("cpu"))

    def unload(self) -> None:
        """Forget every loaded model (frees their RAM / VRAM once nothing else holds them)."""
        with self._lock:
            self._loaded.clear()

    # -- restoring -------------------------------------------------------------------------

    def restore(
        self,
        image: Image.Image,
        name: str | None = None,
        codeformer_weight: float = 0.5,
        *,
        visibility: float = 1.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        min_face: int = 24,
    ) -> tuple[Image.Image, int]:
        """``image`` with its faces restored by ``name`` (see :meth:`resolve`), and how many faces that was.

        ``codeformer_weight``: CodeFormer's fidelity, 0..1 (A1111's ``code_former_weight``);
        ignored by the others. ``visibility``: A1111's Extras mix of the result over the
        original, 0..1. ``min_face``: the smallest face side in pixels worth restoring. With no
        face found the image comes back as it is, with 0, no model is loaded and none needs to exist
        (a name that is not installed is only an error when there is a face to restore). The model runs
        on ``device`` in ``dtype`` where it supports it (float32 otherwise; None: float32).
        """
        import torch

        from studio.restore.restorer import blend, face_model, restore_faces
        if not 0.0 <= codeformer_weight <= 1.0:
            raise FaceRestoreError(f"codeformer_weight must be between 0 and 1, not {codeformer_weight}")
        if not 0.0 <= visibility <= 1.0:
            raise FaceRestoreError(f"visibility must be between 0 and 1, not {visibility}")
        if visibility == 0.0:  # A1111's Extras skips the restorer at 0
            return image, 0
        boxes = detect(image, "face", min_size=min_face)
        if not boxes:
            # nothing to restore, so no model is needed: a picture without a face is answered as it
            # is whether or not weights are installed; a face with no weights is the error below
            return image, 0
        kind = self.resolve(name)
        device = torch.device(device)
        dtype = torch.float32 if dtype is None else dtype
        with self._lock:  # one run at a time: the cached model is moved between devices
            descriptor = place_model(self.load(kind), device, dtype)
            restored = restore_faces(image, boxes, face_model(descriptor, codeformer_weight), device, descriptor.dtype)
        return blend(image, restored, visibility), len(boxes)
