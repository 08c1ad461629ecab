"""Extensions hook the sampling loop through the same step callbacks ControlNet and token merging
use: ``api.add_step_callback`` in ``register(api)``; disabling the extension takes the hook out."""

from __future__ import annotations

import numpy as np
import pytest

from studio.config import Flags
from studio.core import Studio
from studio.generation.request import Txt2ImgRequest
from tests.helpers import make_models_dir

EXTENSION = '''
from studio.generation.step_callbacks import OnStepEnd

SEEN = []

def darken(step_index, timestep, tensors):
    SEEN.append(step_index)
    if step_index == 0:
        return {"latents": tensors["latents"] * 0.5}
    return None

def register(api):
    api.add_step_callback(OnStepEnd(darken, ("latents",)))
'''

REQ = dict(prompt="a lamp", steps=3, width=64, height=64, seed=4, sampler_name="Euler", save_images=False,
           checkpoint="tiny-sd1.safetensors")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("stepext")
    make_models_dir(root)
    (root / "extensions" / "halve_latents").mkdir(parents=True)
    (root / "extensions" / "halve_latents" / "extension.py").write_text(EXTENSION, encoding="utf-8")
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def test_an_extensions_step_callback_sees_every_step_and_changes_the_image(studio):
    import sys

    info = next(e for e in studio.extensions.extensions if e.name == "halve_latents")
    assert info.status == "loaded" and len(info.step_callbacks) == 1
    module = next(m for name, m in sys.modules.items() if name.endswith("halve_latents"))
    hooked = np.asarray(studio.txt2img(Txt2ImgRequest(**REQ)).images[0], dtype=np.int16)
    assert module.SEEN == [0, 1, 2]
    studio.extensions.set_enabled("halve_latents", False)
    try:
        assert studio.extensions.step_callbacks() == []
        plain = np.asarray(studio.txt2img(Txt2ImgRequest(**REQ)).images[0], dtype=np.int16)
    finally:
        studio.extensions.set_enabled("halve_latents", True)
    assert np.abs(hooked - plain).max() > 10


def test_only_step_callbacks_are_accepted(studio):
    from studio.extensions import ExtensionAPI, ExtensionInfo

    api = ExtensionAPI(ExtensionInfo("x", studio.paths.data), studio.preprocessors)
    with pytest.raises(TypeError, match="StepCallback"):
        api.add_step_callback(lambda step, t, tensors: None)
