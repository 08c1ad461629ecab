"""Extensions: plugin folders that add ControlNet preprocessors; broken ones never stop the rest."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.controlnet.preprocessors import PreprocessorError, PreprocessorRegistry
from studio.extensions import ExtensionManager

GOOD = '''
from PIL import ImageOps

def register(api):
    api.add_preprocessor("mirror", lambda image, resolution, a, b, **ctx: ImageOps.mirror(image),
                         label="Mirror", slider_1=api.slider("Unused", 0, 1, 0.5, 0.1), uses_resolution=False)
'''
HALF_BROKEN = '''
def register(api):
    api.add_preprocessor("half_done", lambda image, *a, **k: image)
    raise RuntimeError("boom after registering")
'''


def write(folder: Path, name: str, code: str) -> None:
    (folder / name).mkdir(parents=True)
    (folder / name / "extension.py").write_text(code)


def manager(tmp_path: Path, disabled=()) -> ExtensionManager:
    registry = PreprocessorRegistry.with_builtins(tmp_path / "annotators")
    m = ExtensionManager([tmp_path / "extensions"], registry, lambda: list(disabled))
    m.load_all()
    return m


def test_extension_registers_a_preprocessor_that_runs(tmp_path):
    write(tmp_path / "extensions", "mirror", GOOD)
    m = manager(tmp_path)
    [info] = m.extensions
    assert info.status == "loaded" and info.preprocessors == ["mirror"]
    assert "mirror" in m.registry.names()
    detail = m.registry.api_module_detail()["module_detail"]["mirror"]
    assert detail["sliders"][0]["name"] == "Unused"
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    out = m.registry.run("mirror", image)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image)[:, ::-1])


def test_broken_extensions_are_reported_and_the_rest_loads(tmp_path):
    ext = tmp_path / "extensions"
    write(ext, "a_syntax", "def register(api):\n    return (\n")
    write(ext, "b_half", HALF_BROKEN)
    write(ext, "c_clash", 'def register(api):\n    api.add_preprocessor("canny", lambda *a, **k: None)\n')
    write(ext, "d_noregister", "X = 1\n")
    write(ext, "e_good", GOOD)
    m = manager(tmp_path)
    status = {e.name: (e.status, e.error) for e in m.extensions}
    assert status["a_syntax"][0] == "error" and "SyntaxError" in status["a_syntax"][1]
    assert status["b_half"][0] == "error" and "boom" in status["b_half"][1]
    assert status["c_clash"][0] == "error" and "already registered" in status["c_clash"][1]
    assert status["d_noregister"][0] == "error" and "register" in status["d_noregister"][1]
    assert status["e_good"] == ("loaded", None)
    names = m.registry.names()
    assert "mirror" in names and "half_done" not in names  # a failed extension leaves nothing behind
    assert m.registry.get("canny").source == "built-in"


def test_disabled_extension_is_listed_not_loaded(tmp_path):
    write(tmp_path / "extensions", "mirror", GOOD)
    m = manager(tmp_path, disabled=["mirror"])
    assert [(e.name, e.status, e.enabled) for e in m.extensions] == [("mirror", "disabled", False)]
    assert "mirror" not in m.registry.names()


def test_shipped_example_extension_loads_with_the_studio(tmp_path):
    from studio.config import Flags
    from studio.core import Studio

    studio = Studio.create(Flags(data_dir=str(tmp_path), no_demo=True))
    try:
        example = next(e for e in studio.extensions.extensions if e.name == "posterize")
        assert example.status == "loaded"
        image = Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8))
        out = studio.preprocessors.run("posterize", image, slider_1=1)
        assert set(np.unique(np.asarray(out))) <= {0, 128}
    finally:
        studio.queue.shutdown()


HANGS_UNTIL_RELEASED = '''
import time
from pathlib import Path

RELEASE = Path({release!r})
while not RELEASE.exists():  # stands in for an import that never returns
    time.sleep(0.02)

def register(api):
    api.add_preprocessor("too_late", lambda image, *a, **k: image)
'''
RAISES_AT_RUN = '''
def register(api):
    api.add_preprocessor("divide", lambda image, *a, **k: 1 / 0)
    api.add_preprocessor("not_an_image", lambda image, *a, **k: None, uses_resolution=False)
'''


def test_hanging_extension_times_out_and_the_rest_loads(tmp_path):
    from studio.ui.extensions_tab import table_value  # imports gradio: only this test needs it

    release = tmp_path / "release"
    ext = tmp_path / "extensions"
    write(ext, "a_hangs", HANGS_UNTIL_RELEASED.format(release=str(release)))
    write(ext, "b_good", GOOD)
    registry = PreprocessorRegistry.with_builtins(tmp_path / "annotators")
    m = ExtensionManager([ext], registry, list, load_timeout_s=0.5)
    m.load_all()
    status = {e.name: (e.status, e.error) for e in m.extensions}
    assert status["a_hangs"][0] == "timed out" and "within 0.5 s" in status["a_hangs"][1]
    assert status["b_good"] == ("loaded", None)
    assert "timed out" in table_value(m) and "ext-timed-out ext-error" in table_value(m)
    assert next(e for e in m.api_list() if e["name"] == "a_hangs")["status"] == "timed out"

    # the abandoned thread finishing later cannot add anything any more
    [thread] = [t for t in threading.enumerate() if t.name == "extension-a_hangs"]
    assert thread.daemon
    release.touch()
    thread.join(10)
    assert not thread.is_alive()
    assert "too_late" not in registry and m.get("a_hangs").preprocessors == []


def test_sys_exit_at_import_is_an_error_not_the_end_of_start_up(tmp_path):
    write(tmp_path / "extensions", "quits", "import sys\nsys.exit(3)\n")
    [info] = manager(tmp_path).extensions
    assert info.status == "error" and info.error == "SystemExit: 3"


def test_extension_preprocessor_failing_at_run_time_is_a_preprocessor_error(tmp_path):
    write(tmp_path / "extensions", "flaky", RAISES_AT_RUN)
    m = manager(tmp_path)
    image = Image.new("RGB", (64, 64))
    with pytest.raises(PreprocessorError, match="preprocessor 'divide' from extension 'flaky' failed: "
                                                "ZeroDivisionError: division by zero"):
        m.registry.run("divide", image)
    with pytest.raises(PreprocessorError, match="preprocessor 'not_an_image' from extension 'flaky' failed"):
        m.registry.run("not_an_image", image)
