"""What the front and a generation worker send each other (pickled by Ray), without Ray.

The front sends a :class:`WorkOrder`: the request it already prepared, the settings it runs with, the
model files it needs. The worker streams :class:`Progress` events while the job runs (the front copies
them into the job's JobState, so /progress, the live preview and the queue view work as for a local
job) and ends with :class:`WorkDone`: the images, infotexts and everything the job would have saved.

Saving is replayed on the front (:func:`replay_saves`): file names carry a counter read from the output
folder, so only the machine that owns ``outputs/`` can choose them, and every image is saved once there
whatever worker made it. A worker's saver (:class:`RecordingSaver`) records the calls instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from studio.cluster.files import FileRef


@dataclass(frozen=True)
class WorkOrder:
    job_id: str
    description: str
    request: Any                    # the prepared Txt2ImgRequest / Img2ImgRequest (pydantic, picklable)
    options: Any                    # the front's StudioOptions (the request's override_settings apply on top)
    model_id: str                   # the checkpoint's title: what Serve's multiplexing routes on
    files: tuple[FileRef, ...] = ()
    attempt: int = 1


@dataclass(frozen=True)
class Progress:
    """The job's JobState fields, as the worker last saw them; ``preview`` only when it changed."""
    step: int
    total: int
    batch: int
    batches: int
    textinfo: str
    preview: Image.Image | None = None
    worker: str = ""


@dataclass(frozen=True)
class ModelSummary:
    """What a result's ``model`` is asked for away from the worker that holds the weights: its catalog
    entry (title, names, hashes), whether it is an inpainting model, and its label."""
    info: Any                       # the worker's CheckpointInfo (a plain dataclass)
    variant: str | None
    label: str

    @property
    def probe(self) -> Any:
        return _Probe(self.variant)


@dataclass(frozen=True)
class _Probe:
    variant: str | None


@dataclass(frozen=True)
class VaeSummary:
    filename: str
    shorthash: str | None


@dataclass(frozen=True)
class SaveCall:
    """One call a job made on its saver: ``method`` of :class:`RecordingSaver` with its arguments."""
    method: str                     # "save" | "save_grid" | "save_finished_grid"
    args: tuple
    kwargs: dict[str, Any]
    target: str = "result"          # "result": a path of result.paths; "grid": result.grid_path; "none"


@dataclass(frozen=True)
class SaverSpec:
    """How the job's saver was made (OutputSaver.from_options' arguments besides options and data dir)."""
    kind: str
    model_name: str = ""
    model_hash: str = ""
    vae_filename: str = ""
    styles: tuple[tuple[str, str], ...] = ()


@dataclass
class WorkDone:
    result: Any                     # GenerationResult with model -> ModelSummary, vae -> VaeSummary, no paths
    saves: list[tuple[SaverSpec, list[SaveCall]]] = field(default_factory=list)
    worker: str = ""


class RecordingSaver:
    """A worker's stand-in for OutputSaver: the same calls, recorded for the front to replay. Returns
    None where OutputSaver returns a path (the front fills in the real paths)."""

    def __init__(self, spec: SaverSpec, grid_image: Callable[[Sequence[Image.Image], Any], Image.Image]):
        self.spec = spec
        self.calls: list[SaveCall] = []
        self._grid_image = grid_image

    def save(self, image: Image.Image, infotext: str | None, seed: int, request: Any,
             index: int | None = None) -> None:
        self.calls.append(SaveCall("save", (image, infotext, seed, request), {"index": index}))

    def save_grid(self, images: Sequence[Image.Image], infotext: str | None, request: Any) -> None:
        self.calls.append(SaveCall("save_grid", (list(images), infotext, request), {}, target="grid"))

    def save_finished_grid(self, grid: Image.Image, infotext: str | None, request: Any,
                           basename: str = "grid") -> None:
        self.calls.append(SaveCall("save_finished_grid", (grid, infotext, request), {"basename": basename},
                                   target="none"))

    def grid_image(self, images: Sequence[Image.Image], request: Any) -> Image.Image:
        return self._grid_image(images, request)


class SaverRecorder:
    """The worker engine's saver factory: each saver it makes records into this job's list."""

    def __init__(self, make_real: Callable[..., Any]):
        self._make_real = make_real      # OutputSaver.from_options, for grid layout only
        self.savers: list[RecordingSaver] = []

    def __call__(self, options: Mapping[str, Any], data_dir: Path, kind: str, model_name: str = "",
                 model_hash: str = "", vae_filename: str = "",
                 styles: Mapping[str, str] | None = None) -> RecordingSaver:
        spec = SaverSpec(kind, model_name or "", model_hash or "", vae_filename or "", tuple((styles or {}).items()))
        real = self._make_real(options, data_dir, kind, model_name=model_name, model_hash=model_hash,
                               vae_filename=vae_filename, styles=styles)
        saver = RecordingSaver(spec, real.grid_image)
        self.savers.append(saver)
        return saver

    def recorded(self) -> list[tuple[SaverSpec, list[SaveCall]]]:
        return [(s.spec, list(s.calls)) for s in self.savers if s.calls]


def replay_saves(saves: Sequence[tuple[SaverSpec, Sequence[SaveCall]]],
                 make_saver: Callable[[SaverSpec], Any]) -> tuple[list[Path | None], Path | None]:
    """Save on the front what a worker's job saved, in the same order through real OutputSavers (one per
    recorded saver, as the job had). Returns the paths of the job's images and its grid."""
    paths: list[Path | None] = []
    grid: Path | None = None
    for spec, calls in saves:
        saver = make_saver(spec)
        for call in calls:
            out = getattr(saver, call.method)(*call.args, **call.kwargs)
            if call.target == "result":
                paths.append(out)
            elif call.target == "grid":
                grid = out
    return paths, grid


def progress_of(state: Any, preview_seen: int, worker: str) -> tuple[Progress, int]:
    """The Progress event for a JobState; the preview rides along only when it is new."""
    preview = state.preview if state.preview is not None and state.preview_id != preview_seen else None
    event = Progress(state.step, state.total, state.batch, state.batches, state.textinfo or "", preview, worker)
    return event, state.preview_id


def apply_progress(state: Any, event: Progress) -> None:
    """Copy a worker's Progress into the front's JobState (what /progress and the UI read)."""
    state.total, state.step = event.total, event.step
    state.batch, state.batches = event.batch, event.batches
    state.textinfo = event.textinfo
    if event.preview is not None:
        state.preview = event.preview
        state.preview_id += 1
