"""Extensions: plugin folders in ``extensions/<name>/`` loaded at start-up.

An extension is a folder with an ``extension.py`` (or ``__init__.py``) defining
``register(api)``. ``api`` is an :class:`ExtensionAPI`: it can add ControlNet preprocessors (with
sliders the UI draws), step callbacks and Detailer detectors (``api.add_detector``)::

    # extensions/posterize/extension.py
    from PIL import ImageOps

    def register(api):
        api.add_preprocessor(
            "posterize", lambda image, resolution, levels, _unused, **ctx: ImageOps.posterize(image, int(levels)),
            label="Posterize", slider_1=api.slider("Bits", 1, 8, 3))

A broken extension (an import error, an exception in ``register``, a name clash, a folder with
no entry point) is reported with its error in the Extensions list and never stops start-up or
the other extensions. Each extension is imported and registered in a daemon thread with a
deadline (:data:`LOAD_TIMEOUT_S`): one that hangs is reported "timed out", whatever it registered
is removed, and start-up goes on (the thread is left behind; anything it registers later is
refused). A preprocessor an extension added that fails when run is a ``PreprocessorError``
naming the extension (a 400 in the API), not a server error. Disabled extensions (A1111's ``disabled_extensions`` setting) are listed
but not imported; :meth:`ExtensionManager.set_enabled` switches one on or off while the server
runs, without a restart.

Extensions can be installed from a git URL (:meth:`ExtensionManager.install_from_url`) into the
data dir's ``extensions/`` folder. As in A1111 that runs foreign code, so it is off with --listen
or --share unless --enable-insecure-extension-access is given (``Flags.extension_install_allowed``).
A1111 extensions themselves (``scripts/`` hooking into its processing) do not work here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from studio.controlnet.preprocessors import Preprocessor, PreprocessorRegistry, Slider

log = logging.getLogger(__name__)

ENTRY_POINTS = ("extension.py", "__init__.py")
URL_PREFIXES = ("http://", "https://", "git@", "ssh://", "file://")
ACCESS_DISABLED = ("extension access disabled because of command line flags (--listen or --share); "
                   "start the studio with --enable-insecure-extension-access to allow installing extensions")
NO_ENTRY_POINT = ("no extension.py or __init__.py with a register(api) function; A1111 extensions "
                  "(a scripts/ folder) do not work in this studio")
CLONE_TIMEOUT_S = 600
GIT_INFO_TIMEOUT_S = 5
# How long one extension's import + register(api) may take before start-up goes on without it.
LOAD_TIMEOUT_S = 10.0
TIMED_OUT = "timed out"


class ExtensionError(ValueError):
    """An extension request that cannot be done: unknown name, refused or failed install."""


@dataclass
class ExtensionInfo:
    name: str
    path: Path
    enabled: bool = True
    status: str = "not loaded"        # "loaded" | "disabled" | "error" | "timed out" | "not loaded"
    error: str | None = None
    preprocessors: list[str] = field(default_factory=list)
    step_callbacks: list[Any] = field(default_factory=list)   # studio.generation.step_callbacks.StepCallback
    detectors: list[str] = field(default_factory=list)        # Detailer detectors it added

    def api_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "enabled": self.enabled, "status": self.status,
                "error": self.error, "preprocessors": list(self.preprocessors), "detectors": list(self.detectors)}


class ExtensionAPI:
    """What ``register(api)`` receives: the documented, stable surface for extensions."""

    def __init__(self, info: ExtensionInfo, registry: PreprocessorRegistry, detectors: Any = None):
        self._info = info
        self._registry = registry
        self._detectors = detectors   # studio.detailer.DetectorRegistry (the Detailer's detectors)
        # The load runs in a thread of its own; once it is abandoned (deadline passed) nothing it
        # registers afterwards may reach the registry. The lock makes "check, then register" atomic.
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        """Refuse every registration from now on (the load of this extension was abandoned)."""
        with self._lock:
            self._closed = True

    @staticmethod
    def slider(label: str, minimum: float, maximum: float, value: float, step: float = 1.0) -> Slider:
        return Slider(label, minimum, maximum, value, step)

    def add_preprocessor(self, name: str, run: Callable[..., Any], label: str | None = None,
                         slider_1: Slider | None = None, slider_2: Slider | None = None,
                         uses_resolution: bool = True) -> None:
        """``run(image, resolution, slider_1, slider_2, **ctx) -> PIL image`` (RGB or L)."""
        if not name or not isinstance(name, str):
            raise ValueError("a preprocessor needs a name")
        kwargs: dict[str, Any] = {} if uses_resolution else {"resolution": None}
        with self._lock:
            if self._closed:
                raise ExtensionError(f"extension {self._info.name!r} missed its loading deadline; "
                                     f"preprocessor {name!r} was not added")
            self._registry.register(Preprocessor(name=name, label=label or name, run=run, slider_1=slider_1,
                                                 slider_2=slider_2, source=self._info.name, model_free=True,
                                                 **kwargs))
            self._info.preprocessors.append(name)

    def add_detector(self, name: str, detect: Callable[..., Any]) -> None:
        """A Detailer (ADetailer) detector: ``detect(image, confidence) -> [Box | (Box, mask) | Detection]``
        (``studio.detailer``); requests name it in ``ad_model``."""
        if self._detectors is None:
            raise ExtensionError("this studio was started without the Detailer")
        with self._lock:
            if self._closed:
                raise ExtensionError(f"extension {self._info.name!r} missed its loading deadline; "
                                     f"detector {name!r} was not added")
            self._detectors.add(name, detect, source=self._info.name)
            self._info.detectors.append(name)

    def add_step_callback(self, callback: Any) -> None:
        """Hook every sampling pass of every generation: ``callback`` is a
        ``studio.generation.step_callbacks.StepCallback`` (or ``OnStepEnd(fn, tensor_inputs)`` for a
        diffusers-style ``fn(step_index, timestep, tensors) -> dict | None``)."""
        from studio.generation.step_callbacks import StepCallback  # torch: only when an extension asks

        if not isinstance(callback, StepCallback):
            raise TypeError("add_step_callback takes a StepCallback (studio.generation.step_callbacks)")
        with self._lock:
            if self._closed:
                raise ExtensionError(f"extension {self._info.name!r} missed its loading deadline; "
                                     "its step callback was not added")
            self._info.step_callbacks.append(callback)


class ExtensionManager:
    def __init__(self, folders: list[Path], registry: PreprocessorRegistry, disabled: Callable[[], list[str]],
                 save_disabled: Callable[[list[str]], None] | None = None, load_timeout_s: float = LOAD_TIMEOUT_S,
                 detectors: Any = None):
        self.folders = folders
        self.detectors = detectors
        self.load_timeout_s = load_timeout_s
        self.registry = registry
        self._disabled = disabled
        self._save_disabled = save_disabled
        self.extensions: list[ExtensionInfo] = []
        # UI and API handlers run on worker threads; one change at a time keeps the registry and
        # the persisted list in step. Re-entrant because apply() calls set_enabled().
        self._lock = threading.RLock()
        self._installing: set[str] = set()

    def discover(self) -> list[ExtensionInfo]:
        found: dict[str, ExtensionInfo] = {}
        for folder in self.folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
                # folders without an entry point are listed too (as errors), so an installed A1111
                # extension shows why it does nothing instead of silently vanishing
                if path.is_dir() and not path.name.startswith((".", "_")):
                    found.setdefault(path.name, ExtensionInfo(path.name, path))  # first folder wins a name
        return list(found.values())

    def load_all(self) -> list[ExtensionInfo]:
        disabled = set(self._disabled() or [])
        with self._lock:
            self.extensions = self.discover()
            for info in self.extensions:
                if info.name in disabled:
                    info.enabled, info.status = False, "disabled"
                    continue
                self._load(info)
            return self.extensions

    def get(self, name: str) -> ExtensionInfo:
        for info in self.extensions:
            if info.name == name:
                return info
        known = ", ".join(e.name for e in self.extensions) or "none"
        raise ExtensionError(f"unknown extension {name!r}; installed: {known}")

    # -- enable / disable --------------------------------------------------------------------

    def set_enabled(self, name: str, enabled: bool) -> ExtensionInfo:
        """Switch one extension on (imported and registered now) or off (its preprocessors are
        unregistered now); the disabled list is persisted through ``save_disabled``."""
        with self._lock:
            info = self._set(self.get(name), bool(enabled))
            self._persist()
            return info

    def apply(self, enabled_names: Iterable[str]) -> list[ExtensionInfo]:
        """The Extensions tab's Apply: exactly ``enabled_names`` are on afterwards, the rest off.

        Only extensions whose state changes are touched (an enabled one that failed is not
        retried; use ``set_enabled`` for that). Unknown names refuse the whole call."""
        wanted = set(enabled_names)
        with self._lock:
            unknown = sorted(wanted - {e.name for e in self.extensions})
            if unknown:
                raise ExtensionError(f"unknown extension(s): {', '.join(unknown)}")
            for info in self.extensions:
                if info.enabled != (info.name in wanted):
                    self._set(info, info.name in wanted)
            self._persist()
            return list(self.extensions)

    def _set(self, info: ExtensionInfo, enabled: bool) -> ExtensionInfo:
        if not enabled:
            if info.enabled or info.status != "disabled":
                self._unload(info)
                info.enabled, info.status, info.error = False, "disabled", None
                log.info("Extension %s disabled", info.name)
        elif info.status != "loaded":  # disabled, or enabled but failed: (re)load it now
            info.enabled = True
            self._unload(info)
            self._load(info)
        return info

    def _unload(self, info: ExtensionInfo) -> None:
        for name in info.preprocessors:
            if name in self.registry and self.registry.get(name).source == info.name:
                self.registry.unregister(name)
        info.preprocessors.clear()
        info.step_callbacks.clear()
        if self.detectors is not None:
            self.detectors.remove_source(info.name)
        info.detectors.clear()
        # forget the module (and its submodules) so enabling again runs the current code
        module_name = _module_name(info.name)
        for key in [k for k in sys.modules if k == module_name or k.startswith(module_name + ".")]:
            sys.modules.pop(key, None)

    def step_callbacks(self) -> list[Any]:
        """The step callbacks of the loaded, enabled extensions, in load order (the engine hands them to
        every sampling pass)."""
        with self._lock:
            return [cb for info in self.extensions if info.status == "loaded" for cb in info.step_callbacks]

    def disabled_names(self) -> list[str]:
        """The list to persist: disabled extensions, plus saved names of extensions not present
        now (a folder moved away for a while keeps its setting, as in A1111)."""
        known = {e.name for e in self.extensions}
        kept = [n for n in (self._disabled() or []) if n not in known]
        return kept + [e.name for e in self.extensions if not e.enabled]

    def _persist(self) -> None:
        if self._save_disabled is None:
            return
        try:
            self._save_disabled(self.disabled_names())
        except OSError as e:
            raise ExtensionError(f"the change applies now but could not be saved for the next start: {e}") from e

    # -- install -------------------------------------------------------------------------------

    def install_from_url(self, url: str, allowed: bool, dirname: str | None = None,
                         branch: str | None = None) -> ExtensionInfo:
        """Clone ``url`` into the last of ``folders`` (the data dir's ``extensions/``) and load it.

        ``allowed`` is ``Flags.extension_install_allowed``. The clone goes to a hidden temporary
        folder first and is renamed into place, so a failed clone leaves nothing behind."""
        if not allowed:
            raise ExtensionError(ACCESS_DISABLED)
        url = (url or "").strip()
        _check_url(url)
        name = (dirname or "").strip() or name_from_url(url)
        _check_dirname(name)
        branch = (branch or "").strip() or None
        if branch is not None and (branch.startswith("-") or any(c.isspace() for c in branch)):
            raise ExtensionError(f"invalid branch name {branch!r}")
        folder = self.folders[-1]
        target = folder / name
        with self._lock:
            if target.exists() or name in self._installing or any(e.name == name for e in self.extensions):
                raise ExtensionError(f"extension {name!r} is already installed")
            self._installing.add(name)
        try:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".installing-{name}-", dir=folder))
            except OSError as e:
                raise ExtensionError(f"cannot write to {folder}: {e}") from e
            try:
                _clone(url, tmp, branch)
                with self._lock:
                    if target.exists():
                        raise ExtensionError(f"extension {name!r} is already installed")
                    tmp.rename(target)
            except OSError as e:
                raise ExtensionError(f"cannot move the clone to {target}: {e}") from e
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            with self._lock:
                info = ExtensionInfo(name, target)
                self.extensions.append(info)
                self._load(info)
                if name in (self._disabled() or []):
                    self._persist()  # a fresh install is enabled, whatever an old setting said
            log.info("Extension %s installed from %s into %s (%s)", name, url, target, info.status)
            return info
        finally:
            with self._lock:
                self._installing.discard(name)

    # -- listing -------------------------------------------------------------------------------

    def api_list(self) -> list[dict[str, Any]]:
        """GET /sdapi/v1/extensions: A1111's keys (git fields are None for a folder that is not a
        repository of its own), plus ``status``, ``error`` and ``preprocessors``."""
        with self._lock:
            infos = list(self.extensions)
        out = []
        for info in infos:
            git = git_info(info.path)
            out.append({"name": info.name, **git, "enabled": info.enabled, "status": info.status,
                        "error": info.error, "preprocessors": list(info.preprocessors)})
        return out

    def _load(self, info: ExtensionInfo) -> None:
        info.error = None
        entry = _entry(info.path)
        if entry is None:
            info.preprocessors.clear()
            info.status, info.error = "error", NO_ENTRY_POINT
            log.error("Extension %s: %s", info.name, NO_ENTRY_POINT)
            return
        module_name = _module_name(info.name)
        before = set(self.registry.names())
        api = ExtensionAPI(info, self.registry, self.detectors)
        finished, error = _call_with_deadline(lambda: _import_and_register(module_name, entry, info.path, api),
                                              self.load_timeout_s, f"extension-{info.name}")
        if finished and error is None:
            info.status = "loaded"
            log.info("Extension %s loaded (%s)", info.name, ", ".join(info.preprocessors) or "nothing registered")
            return
        if not finished:
            api.close()  # the thread goes on; whatever it registers from now on is refused
        sys.modules.pop(module_name, None)
        for name in set(self.registry.names()) - before:
            self.registry.unregister(name)  # a half-registered extension leaves nothing behind
        info.preprocessors.clear()
        info.step_callbacks.clear()
        if finished:
            info.status, info.error = "error", f"{type(error).__name__}: {error}"
            trace = "".join(traceback.format_exception(error, limit=3))
            log.error("Extension %s failed to load: %s\n%s", info.name, info.error, trace)
        else:
            info.status = TIMED_OUT
            info.error = (f"import and register(api) did not finish within {self.load_timeout_s:g} s; "
                          "skipped (it may still be running in the background until the studio restarts)")
            log.error("Extension %s: %s", info.name, info.error)


def _import_and_register(module_name: str, entry: Path, folder: Path, api: ExtensionAPI) -> None:
    spec = importlib.util.spec_from_file_location(module_name, entry, submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {entry}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    register = getattr(module, "register", None)
    if not callable(register):
        raise AttributeError(f"{entry.name} defines no register(api) function")
    register(api)


def _call_with_deadline(fn: Callable[[], None], timeout_s: float, thread_name: str
                        ) -> tuple[bool, BaseException | None]:
    """Run ``fn`` in a daemon thread and wait at most ``timeout_s``: (finished, what it raised).

    A thread cannot be killed, so one that misses the deadline is left running; daemon, so it never
    keeps the process alive. BaseException is caught too: an extension calling ``sys.exit()`` at
    import must not end start-up."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - any failure of third-party code is reported, not fatal
            raised.append(e)

    thread = threading.Thread(target=target, name=thread_name, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return False, None
    return True, (raised[0] if raised else None)


def _entry(path: Path) -> Path | None:
    for name in ENTRY_POINTS:
        if (path / name).is_file():
            return path / name
    return None


def _module_name(name: str) -> str:
    return f"studio_extension_{name.replace('-', '_').replace('.', '_')}"


def name_from_url(url: str) -> str:
    """A1111's folder name: the URL's last path part without ``.git``."""
    path = urlsplit(url).path if "://" in url else url.partition(":")[2]
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return last[:-4] if last.endswith(".git") else last


def _check_url(url: str) -> None:
    if not url:
        raise ExtensionError("no URL given")
    if not url.startswith(URL_PREFIXES) or any(c.isspace() for c in url):
        raise ExtensionError(f"not a git URL: {url!r} (expected http(s)://, ssh://, git@host:path or file://)")


def _check_dirname(name: str) -> None:
    if not name:
        raise ExtensionError("cannot tell a folder name from the URL; give one")
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    # a leading "_" or "." folder is skipped by discovery, so it would install but never show up
    if any(s in name for s in seps) or name.startswith((".", "_")) or "\0" in name:
        raise ExtensionError(f"invalid folder name {name!r}: no path separators, and it cannot start "
                             "with '.' or '_'")


def _git_env() -> dict[str, str]:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    # an ssh password or host-key prompt would hang the request until the timeout
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    return env


def _clone(url: str, dest: Path, branch: str | None) -> None:
    args = ["git", "clone", "--depth", "1", *(["--branch", branch] if branch else []), "--", url, str(dest)]
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=CLONE_TIMEOUT_S, env=_git_env(),
                                stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ExtensionError("git is not installed; it is needed to install extensions") from None
    except subprocess.TimeoutExpired:
        raise ExtensionError(f"git clone timed out after {CLONE_TIMEOUT_S} s") from None
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-5:])
        raise ExtensionError(f"git clone failed: {tail or f'exit status {result.returncode}'}")


def _git(path: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                                timeout=GIT_INFO_TIMEOUT_S, env=_git_env(), stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_info(path: Path) -> dict[str, Any]:
    """``remote``, ``branch``, ``commit_hash``, ``commit_date`` and ``version`` of a folder that is
    its own git repository (two git calls); None (version "") otherwise. Never raises."""
    info: dict[str, Any] = {"remote": None, "branch": None, "commit_hash": None, "commit_date": None,
                            "version": ""}
    # only the folder's own .git counts: a shipped extension inside the studio's checkout
    # must not report the studio's repository as its remote
    if not (path / ".git").exists():
        return info
    log_line = _git(path, "log", "-1", "--format=%H%x00%ct%x00%D")
    if log_line:
        commit, _, rest = log_line.partition("\0")
        date, _, refs = rest.partition("\0")
        info["commit_hash"], info["version"] = commit, commit[:8]
        info["commit_date"] = date or None  # A1111 serves the Unix time as a string
        head = next((r for r in refs.split(", ") if r.startswith("HEAD -> ")), None)
        info["branch"] = head[len("HEAD -> "):] if head else None
    info["remote"] = _git(path, "config", "--get", "remote.origin.url") or None
    return info
