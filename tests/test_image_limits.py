"""Decompression bombs and oversized pictures: every reader refuses them from the size in the header, before
a pixel is decoded, with a message naming the size; every API route that takes an image answers 400."""

from __future__ import annotations

import base64
import io
import struct
import warnings
import zlib

import pytest
import requests
from PIL import Image, PngImagePlugin

from studio.generation import imageops
from studio.generation.imageops import ImageTooLargeError, open_unloaded
from studio.generation.outputs import ImageReadError, open_image, read_infotext


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int, text: str | None = None) -> bytes:
    """A real one-colour 1-bit PNG of ``width`` x ``height``, compressed row block by row block so that
    making it never holds the picture: 30000x30000 is ~110 KB that decodes to 900 MP."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    rows_per_block = 1000
    data = b"".join(packer.compress(row * min(rows_per_block, height - y)) for y in range(0, height, rows_per_block))
    data += packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header)]
    if text is not None:
        chunks.append(_chunk(b"tEXt", b"parameters\0" + text.encode("latin-1")))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return bomb_png(30000, 30000)


def test_the_bomb_is_small_and_really_that_big(bomb):
    assert len(bomb) < 200_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # Pillow itself refuses it outright (it is past twice its own limit)
        with pytest.raises(Image.DecompressionBombError):
            Image.open(io.BytesIO(bomb))


# ------------------------------------------------------------------------------------------------------
# open_unloaded / open_image / read_infotext


def test_open_image_refuses_a_bomb_naming_its_size(bomb):
    with pytest.raises(ImageReadError, match=r"30000x30000 \(900 MP\); the limit is 67\.1 MP \(8192x8192\)"):
        open_image(bomb)


@pytest.mark.parametrize("size", [(10000, 10000), (9000, 9000), (imageops.MAX_SIDE + 1, 64)])
def test_open_image_refuses_every_size_over_the_limit(size):
    # 100 MP: Pillow only warns; 81 MP and the long side: Pillow says nothing; ours refuses all three
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageReadError, match=f"{size[0]}x{size[1]}"):
            open_image(bomb_png(*size))


def test_a_jpeg_declaring_a_huge_size_is_refused_too():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")  # baseline frame header: length, precision, then height and width
    data[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 30000)
    with pytest.raises(ImageReadError, match=r"30000x30000 \(900 MP\)"):
        open_image(bytes(data))


def test_pillows_bomb_warning_as_an_error_still_names_the_size():
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError, match="10000x10000"):
            open_unloaded(bomb_png(10000, 10000))


def test_the_size_is_refused_before_any_pixel_is_decoded(monkeypatch, bomb):
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    with pytest.raises(ImageTooLargeError, match="9000x9000"):
        open_unloaded(bomb_png(9000, 9000))
    with pytest.raises(ImageReadError, match="30000x30000"):
        open_image(bomb)
    with pytest.raises(ImageReadError, match="9000x9000"):
        read_infotext(Image.open(io.BytesIO(bomb_png(9000, 9000))))


def test_images_at_the_limit_still_open_and_keep_their_text():
    data = bomb_png(8192, 8192, text="a big castle\nSteps: 3")
    image = open_image(data)
    assert image.size == (8192, 8192)
    assert read_infotext(image) == "a big castle\nSteps: 3"
    # a lazily opened one too: the text chunk comes from the header
    assert read_infotext(Image.open(io.BytesIO(data))) == "a big castle\nSteps: 3"


def test_garbage_is_still_not_a_readable_image():
    with pytest.raises(ImageReadError, match="not a readable image"):
        open_image(b"not an image at all")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).save(buf, "PNG")
    with pytest.raises(ImageReadError, match="not a readable image"):
        open_image(buf.getvalue()[: len(buf.getvalue()) // 2])  # the header is fine, the pixels are cut


# ------------------------------------------------------------------------------------------------------
# every API route that takes an image


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def small_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 150)).save(buf, "PNG")
    return b64(buf.getvalue())


def assert_refused_naming_the_size(r: requests.Response) -> None:
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "30000x30000" in detail and "900 MP" in detail and "limit" in detail


def routes(bomb64: str) -> dict[str, tuple[str, dict]]:
    img2img = {"prompt": "a castle", "steps": 2, "width": 64, "height": 64, "denoising_strength": 0.5}
    return {
        "img2img init image": ("/sdapi/v1/img2img", {**img2img, "init_images": [bomb64]}),
        "img2img mask": ("/sdapi/v1/img2img", {**img2img, "init_images": [small_png()], "mask": bomb64}),
        "img2img data URI": ("/sdapi/v1/img2img", {**img2img, "init_images": ["data:image/png;base64," + bomb64]}),
        "png-info": ("/sdapi/v1/png-info", {"image": bomb64}),
        "extra-single-image": ("/sdapi/v1/extra-single-image", {"image": bomb64, "upscaling_resize": 2}),
        "extra-batch-images": ("/sdapi/v1/extra-batch-images",
                               {"imageList": [{"data": small_png(), "name": "ok.png"},
                                              {"data": bomb64, "name": "bomb.png"}], "upscaling_resize": 2}),
        "controlnet detect": ("/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [bomb64]}),
    }


@pytest.mark.parametrize("route", ["img2img init image", "img2img mask", "img2img data URI", "png-info",
                                   "extra-single-image", "extra-batch-images", "controlnet detect"])
def test_every_route_answers_400_naming_the_size(server, bomb, route):
    path, body = routes(b64(bomb))[route]
    assert_refused_naming_the_size(requests.post(server.url + path, json=body, timeout=120))


def test_png_info_reads_a_big_but_allowed_image(server):
    data = bomb_png(8192, 8192, text="a big castle\nSteps: 3, Seed: 7, Size: 8192x8192")
    r = requests.post(server.url + "/sdapi/v1/png-info", json={"image": b64(data)}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["info"] == "a big castle\nSteps: 3, Seed: 7, Size: 8192x8192"
    assert r.json()["parameters"]["Seed"] == "7"
