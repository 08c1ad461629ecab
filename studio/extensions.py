"""Extensions: plugin folders in ``extensions/<name>/`` loaded at start-up.

An extension is a folder with an ``extension.py`` (or ``__init__.py``) defining
``register(api)``. ``api`` is an :class:`ExtensionAPI`; today it can add ControlNet
preprocessors, with sliders the UI draws::

    # extensions/posterize/extension.py
    from PIL import ImageOps

    def register(api):
        api.add_preprocessor(
            "posterize", lambda image, resolution, levels, _unused, **ctx: ImageOps.posterize(image, int(levels)),
            label="Posterize", slider_1=api.slider("Bits", 1, 8, 3))

A broken extension (an import error, an exception in ``register``, a name clash) is reported
with its error in the Extensions list and never stops start-up or the other extensions.
Disabled extensions (A1111's ``disabled_extensions`` setting) are listed but not imported.
Installing extensions from a URL is not offered yet; when it is, it stays off with --listen or
--share unless --enable-insecure-extension-access is given, as in A1111.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.controlnet.preprocessors import Preprocessor, PreprocessorRegistry, Slider

log = logging.getLogger(__name__)

ENTRY_POINTS = ("extension.py", "__init__.py")


@dataclass
class ExtensionInfo:
    name: str
    path: Path
    enabled: bool = True
    status: str = "not loaded"        # "loaded" | "disabled" | "error" | "not loaded"
    error: str | None = None
    preprocessors: list[str] = field(default_factory=list)

    def api_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "enabled": self.enabled, "status": self.status,
                "error": self.error, "preprocessors": list(self.preprocessors)}


class ExtensionAPI:
    """What ``register(api)`` receives: the documented, stable surface for extensions."""

    def __init__(self, info: ExtensionInfo, registry: PreprocessorRegistry):
        self._info = info
        self._registry = registry

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
        self._registry.register(Preprocessor(name=name, label=label or name, run=run, slider_1=slider_1,
                                             slider_2=slider_2, source=self._info.name, model_free=True, **kwargs))
        self._info.preprocessors.append(name)


class ExtensionManager:
    def __init__(self, folders: list[Path], registry: PreprocessorRegistry, disabled: Callable[[], list[str]]):
        self.folders = folders
        self.registry = registry
        self._disabled = disabled
        self.extensions: list[ExtensionInfo] = []

    def discover(self) -> list[ExtensionInfo]:
        found: dict[str, ExtensionInfo] = {}
        for folder in self.folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
                if path.is_dir() and not path.name.startswith((".", "_")) and _entry(path) is not None:
                    found.setdefault(path.name, ExtensionInfo(path.name, path))  # first folder wins a name
        return list(found.values())

    def load_all(self) -> list[ExtensionInfo]:
        disabled = set(self._disabled() or [])
        self.extensions = self.discover()
        for info in self.extensions:
            if info.name in disabled:
                info.enabled, info.status = False, "disabled"
                continue
            self._load(info)
        return self.extensions

    def _load(self, info: ExtensionInfo) -> None:
        entry = _entry(info.path)
        module_name = f"studio_extension_{info.name.replace('-', '_')}"
        before = set(self.registry.names())
        try:
            spec = importlib.util.spec_from_file_location(module_name, entry,
                                                          submodule_search_locations=[str(info.path)])
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import {entry}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
            register = getattr(module, "register", None)
            if not callable(register):
                raise AttributeError(f"{entry.name} defines no register(api) function")
            register(ExtensionAPI(info, self.registry))
            info.status = "loaded"
            log.info("Extension %s loaded (%s)", info.name, ", ".join(info.preprocessors) or "nothing registered")
        except Exception as e:  # noqa: BLE001 - any failure of third-party code is reported, not fatal
            sys.modules.pop(module_name, None)
            for name in set(self.registry.names()) - before:
                self.registry.unregister(name)  # a half-registered extension leaves nothing behind
            info.preprocessors.clear()
            info.status = "error"
            info.error = f"{type(e).__name__}: {e}"
            log.error("Extension %s failed to load: %s\n%s", info.name, info.error, traceback.format_exc(limit=3))


def _entry(path: Path) -> Path | None:
    for name in ENTRY_POINTS:
        if (path / name).is_file():
            return path / name
    return None
