"""The scripts the studio has, looked up as A1111 looks them up: ``script_name`` against the
lower-cased titles of the request's tab. An unknown name is A1111's 422 "Script '…' not found"."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from studio.errors import UnknownScriptError
from studio.scripts.base import Script, ScriptEnv
from studio.scripts.loopback import Loopback
from studio.scripts.outpainting import PoorMansOutpainting
from studio.scripts.outpainting_mk2 import OutpaintingMk2
from studio.scripts.prompt_matrix import PromptMatrix
from studio.scripts.prompts_from_file import PromptsFromFile
from studio.scripts.sd_upscale import SDUpscale
from studio.scripts.xyz import XyzPlot

NO_SCRIPT = ("", "none")


class ScriptRegistry:
    def __init__(self, scripts: Iterable[Script] = ()) -> None:
        self._scripts: list[Script] = []
        for script in scripts:
            self.add(script)

    def add(self, script: Script) -> None:
        if any(s.name == script.name for s in self._scripts):
            raise ValueError(f"a script called {script.title!r} is already registered")
        self._scripts.append(script)

    def for_tab(self, tab: str) -> list[Script]:
        return [s for s in self._scripts if tab in s.tabs]

    def titles(self, tab: str) -> list[str]:
        return [s.title for s in self.for_tab(tab)]

    def find(self, tab: str, name: str | None) -> Script | None:
        """The script ``name`` names on ``tab``; None for no script ("None" or empty);
        UnknownScriptError when the tab has no such script."""
        wanted = (name or "").strip().lower()
        if wanted in NO_SCRIPT:
            return None
        for script in self.for_tab(tab):
            if script.name == wanted:
                return script
        raise UnknownScriptError(f"Script '{name}' not found")

    def api_names(self) -> dict[str, list[str]]:
        """A1111's ``/sdapi/v1/scripts`` selectable part: lower-cased titles per tab."""
        return {tab: [s.name for s in self.for_tab(tab)] for tab in ("txt2img", "img2img")}

    def api_info(self, env: ScriptEnv) -> list[dict[str, Any]]:
        return [s.info(env, tab) for tab in ("txt2img", "img2img") for s in self.for_tab(tab)]


def builtin_scripts() -> list[Script]:
    """A1111's built-in scripts, in its dropdown order."""
    return [PromptMatrix(), PromptsFromFile(), XyzPlot(), Loopback(), OutpaintingMk2(), PoorMansOutpainting(),
            SDUpscale()]
