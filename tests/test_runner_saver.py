"""The runner saves through the caller's saver object (``save`` per image, ``save_grid`` once)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from studio.config import Flags
from studio.core import Studio
from studio.generation.request import Txt2ImgRequest
from studio.generation.runner import run_generation
from tests.helpers import make_models_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("saver")
    make_models_dir(root)
    studio = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield studio, studio.select_checkpoint("tiny-sd1.safetensors")
    studio.queue.shutdown()


class FakeSaver:
    def __init__(self, grid_answer: str | None = "grid.png"):
        self.saved, self.grids, self.grid_answer = [], [], grid_answer

    def save(self, image, infotext, seed, request):
        self.saved.append((np.asarray(image).copy(), infotext, seed, request))
        return Path(f"{len(self.saved):05d}-{seed}.png")

    def save_grid(self, images, infotext, request):
        self.grids.append(([np.asarray(i).copy() for i in images], infotext, request))
        return Path(self.grid_answer) if self.grid_answer else None


class ImagesOnly:
    def __init__(self):
        self.count = 0

    def save(self, image, infotext, seed, request):
        self.count += 1
        return Path(f"{seed}.png")


def request(**changes) -> Txt2ImgRequest:
    base = {"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 30,
            "sampler_name": "Euler", "save_images": True}
    return Txt2ImgRequest(**{**base, **changes})


def generate(setup, req, saver):
    studio, model = setup
    req = studio.engine.prepare(req).request     # as the engine hands it to the runner
    return studio.queue.run(lambda state: run_generation(model, req, state, saver))


def test_every_image_goes_through_the_saver_and_the_grid_once(setup):
    saver = FakeSaver()
    result = generate(setup, request(batch_size=2, n_iter=2), saver)
    assert [seed for _, _, seed, _ in saver.saved] == result.seeds == [30, 31, 32, 33]
    assert [text for _, text, _, _ in saver.saved] == result.infotexts
    assert all(np.array_equal(arr, np.asarray(image)) for (arr, *_), image in zip(saver.saved, result.images))
    assert result.paths == [Path(f"{i:05d}-{30 + i - 1}.png") for i in range(1, 5)]
    assert saver.saved[0][3].prompt == "a red cube"
    [(images, infotext, req)] = saver.grids
    assert len(images) == 4 and infotext == result.infotexts[0] and req.seed == 30
    assert result.grid_path == Path("grid.png")


def test_one_image_makes_no_grid_and_a_saver_may_have_no_grid(setup):
    saver = FakeSaver()
    result = generate(setup, request(), saver)
    assert len(saver.saved) == 1 and saver.grids == [] and result.grid_path is None
    plain = ImagesOnly()
    result = generate(setup, request(batch_size=2), plain)
    assert plain.count == 2 and result.grid_path is None and len(result.paths) == 2
    declined = FakeSaver(grid_answer=None)
    result = generate(setup, request(batch_size=2), declined)
    assert len(declined.grids) == 1 and result.grid_path is None


def test_nothing_is_saved_without_save_images_or_a_saver(setup):
    saver = FakeSaver()
    result = generate(setup, request(save_images=False, batch_size=2), saver)
    assert saver.saved == [] and saver.grids == [] and result.paths == [] and result.grid_path is None
    result = generate(setup, request(batch_size=2), None)
    assert result.paths == [] and len(result.images) == 2
