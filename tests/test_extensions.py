"""Extensions: plugin folders that add ControlNet preprocessors; broken ones never stop the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from studio.controlnet.preprocessors import PreprocessorRegistry
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
