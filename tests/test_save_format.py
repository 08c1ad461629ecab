"""A1111's samples_format: generations are saved as png, jpg or webp with the infotext readable back."""

from __future__ import annotations

import pytest

from studio.config import Flags
from studio.core import Studio
from studio.generation.outputs import SaveFormat, open_image, read_infotext
from studio.generation.request import Txt2ImgRequest
from tests.helpers import make_models_dir


def test_save_format_from_settings():
    assert SaveFormat.from_settings({}) == SaveFormat("png", 80, False)
    assert SaveFormat.from_settings({"samples_format": "JPEG", "jpeg_quality": "95"}) == SaveFormat("jpg", 95, False)
    assert SaveFormat.from_settings({"samples_format": "webp", "webp_lossless": True}).lossless
    assert SaveFormat.from_settings({"samples_format": "tiff", "jpeg_quality": "x"}) == SaveFormat("png", 80, False)


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_generations_are_saved_in_the_format(tmp_path, fmt):
    make_models_dir(tmp_path)
    studio = Studio.create(Flags(data_dir=str(tmp_path), no_half=True))
    try:
        studio.settings.update({"samples_format": fmt}, persist=False)
        result = studio.txt2img(Txt2ImgRequest(prompt="a red door", steps=2, width=64, height=64, seed=3,
                                               sampler_name="Euler", checkpoint="tiny-sd1.safetensors",
                                               save_images=True))
        path = result.paths[0]
        assert path.suffix == f".{fmt}" and path.parent.parent == tmp_path / "outputs" / "txt2img-images"
        image = open_image(path.read_bytes())
        assert image.format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt]
        assert read_infotext(image) == result.infotexts[0]
    finally:
        studio.queue.shutdown()
