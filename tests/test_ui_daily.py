"""The daily loop's pure parts: send-to (which fields travel, A1111's send_seed/send_size), picking a
gallery's picture, Hires. fix restored from an infotext, Save/Zip, and "Size from image"."""

from __future__ import annotations

import csv
import zipfile
from types import SimpleNamespace

from PIL import Image

from studio.generation.outputs import image_bytes, read_infotext
from studio.ui.img2img import size_from_image
from studio.ui.output_actions import save_chosen, zip_gallery
from studio.ui.send_to import PARAM_FIELDS, Receiver, editor_value, gallery_pick
from studio.ui.txt2img import HIRES_FIELDS, hires_updates

INFOTEXT = ("a castle at night\nNegative prompt: blurry\nSteps: 12, Sampler: Euler a, Schedule type: Karras, "
            "CFG scale: 6.5, Seed: 31, Size: 96x64, Model hash: abc, Model: tiny, Denoising strength: 0.55, "
            "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent")


def options(seed=True, size=True):
    return SimpleNamespace(send_seed=seed, send_size=size)


def values(updates):
    return [u.get("value") if isinstance(u, dict) else u for u in updates]


def test_a_receiver_fills_every_parameter_the_infotext_has():
    picture = Image.new("RGB", (8, 8))
    receiver = Receiver("img2img", "img2img", image=object(), params=[object()] * len(PARAM_FIELDS))
    got = values(receiver.updates(picture, INFOTEXT, options()))
    assert got[0] is picture
    fields = dict(zip(PARAM_FIELDS, got[1:]))
    assert fields["prompt"] == "a castle at night" and fields["negative_prompt"] == "blurry"
    assert (fields["steps"], fields["sampler_name"], fields["scheduler"], fields["cfg_scale"]) == (12, "Euler a",
                                                                                                   "Karras", 6.5)
    assert (fields["seed"], fields["width"], fields["height"]) == (31, 96, 64)
    # A1111's send_seed / send_size off: the receiving tab keeps its own
    kept = dict(zip(PARAM_FIELDS, values(receiver.updates(picture, INFOTEXT, options(False, False)))[1:]))
    assert kept["seed"] is None and kept["width"] is None and kept["prompt"] == "a castle at night"


def test_hires_fix_comes_back_from_the_infotext():
    from studio.generation.infotext import infotext_to_fields, parse_infotext

    got = dict(zip((k for k, _ in HIRES_FIELDS), values(hires_updates(infotext_to_fields(parse_infotext(INFOTEXT))))))
    assert got["enable"] is True and got["scale"] == 1.5 and got["steps"] == 2 and got["denoising"] == 0.55
    assert got["sampler"] == "Use same sampler" and got["checkpoint"] == "Use same checkpoint"
    off = values(hires_updates({}))
    assert off[0] is False and all(v is None for v in off[1:])


def test_gallery_pick_reads_every_shape_gradio_gives(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (5, 4), (255, 0, 0)).save(path)
    for value in ([(str(path), "seed 1")], [{"image": {"path": str(path)}, "caption": None}], [str(path)]):
        image, index = gallery_pick(value, 7)
        assert image.size == (5, 4) and index == 0
    assert gallery_pick([], 0) == (None, 0)
    assert editor_value(image)["background"] is image


def test_save_keeps_the_chosen_picture_with_its_infotext_and_a_log_row(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(image_bytes(Image.new("RGB", (8, 8)), "first"))
    b.write_bytes(image_bytes(Image.new("RGB", (8, 8), "white"), INFOTEXT))
    saved = save_chosen(tmp_path / "data", [(str(a), None), (str(b), None)], 1, ["first", INFOTEXT])
    assert saved.parent == tmp_path / "data" / "log" / "images"
    assert read_infotext(Image.open(saved)) == INFOTEXT
    rows = list(csv.reader(open(tmp_path / "data" / "log" / "log.csv", encoding="utf8")))
    assert rows[0][0] == "prompt" and rows[1][0] == "a castle at night" and rows[1][1] == "31"
    archive = zip_gallery(tmp_path / "data", [(str(a), None), (str(b), None)])
    assert sorted(zipfile.ZipFile(archive).namelist()) == ["00000.png", "00001.png"]
    assert save_chosen(tmp_path / "data", [], 0, []) is None


def test_size_from_image_rounds_to_the_sliders_step():
    w, h = size_from_image(Image.new("RGB", (803, 4000)))
    assert (w["value"], h["value"]) == (800, 2048)
