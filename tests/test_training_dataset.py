"""The training dataset: kohya buckets and folders, A1111 captions and templates, batches and pixels."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio.training.base import TrainingError, TrainSettings
from studio.training.dataset import (
    DEFAULT_TEMPLATES,
    TrainDataset,
    TrainItem,
    caption_from_filename,
    make_bucket_resolutions,
    select_bucket,
    summary,
)


def image(path: Path, w: int, h: int, seed: int = 0, mode: str = "RGB", fmt: str | None = None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    a = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    Image.fromarray(a, mode).save(path, format=fmt, **save)
    return path


def settings(root: Path, **kw) -> TrainSettings:
    return TrainSettings(data_dir=str(root), output_name="thing", **kw)


def small(root: Path, **kw) -> TrainSettings:
    """Small buckets so that test images can be small."""
    kw = {"resolution": 128, "min_bucket_reso": 64, "max_bucket_reso": 256, **kw}
    return settings(root, **kw)


# --------------------------------------------------------------------------------------------------------
# buckets


def test_bucket_resolutions_512():
    buckets = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert buckets == sorted(buckets)
    assert len(buckets) == len(set(buckets))
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= 512 * 512
        assert (h, w) in buckets                                   # symmetric
    # for every width the tallest height is there: one step more would break a bound
    for w in range(256, 1025, 64):
        h = max(h for bw, h in buckets if bw == w)
        assert h + 64 > 1024 or w * (h + 64) > 512 * 512
    for expected in [(512, 512), (384, 640), (640, 384), (448, 576), (576, 448), (256, 1024), (1024, 256)]:
        assert expected in buckets
    # what kohya's rule gives for 512 (the mirrored pairs add a few shorter sides)
    assert buckets == [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
                       (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
                       (896, 256), (960, 256), (1024, 256)]


def test_bucket_resolutions_square_and_bounds():
    buckets = make_bucket_resolutions((768, 512), 256, 1024, 64)
    assert (576, 576) in buckets                                   # sqrt(768*512)=627 -> 576
    assert all(w * h <= 768 * 512 for w, h in buckets)
    sdxl = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert (1024, 1024) in sdxl and (832, 1216) in sdxl and (1216, 832) in sdxl
    assert all(256 <= s <= 2048 and s % 64 == 0 for b in sdxl for s in b)
    with pytest.raises(ValueError):
        make_bucket_resolutions((64, 64), 256, 1024, 64)


def test_select_bucket():
    buckets = make_bucket_resolutions((512, 512))
    assert select_bucket(512, 512, buckets) == (512, 512)
    assert select_bucket(3000, 3000, buckets) == (512, 512)
    wide = select_bucket(1000, 500, buckets)
    assert wide == (704, 320)                                       # ar 2.2 beats 1.67 and 2.4
    best = min(abs(w / h - 2.0) for w, h in buckets)
    assert abs(wide[0] / wide[1] - 2.0) == best
    tall = select_bucket(400, 600, buckets)
    assert tall[1] > tall[0]
    assert tall == (448, 576) or abs(tall[0] / tall[1] - 400 / 600) <= abs(448 / 576 - 400 / 600)
    assert select_bucket(500, 2000, buckets) == (256, 1024)
    # ties go to the larger bucket
    assert select_bucket(100, 100, [(64, 64), (128, 128), (128, 64)]) == (128, 128)


# --------------------------------------------------------------------------------------------------------
# scanning


def test_kohya_folders_and_repeats(tmp_path):
    image(tmp_path / "a.png", 128, 128, 1)
    image(tmp_path / "b.jpg", 192, 128, 2)
    for i in range(3):
        image(tmp_path / "10_cat" / f"cat{i}.png", 128, 128, 10 + i)
    image(tmp_path / "misc" / "x.png", 128, 128, 20)               # not a <repeats>_<name> folder
    image(tmp_path / ".thumbs" / "y.png", 128, 128, 21)             # hidden folder
    image(tmp_path / ".hidden.png", 128, 128, 22)                   # hidden file
    (tmp_path / "notes.md").write_text("not an image")

    ds = TrainDataset.from_settings(small(tmp_path))
    by_name = {item.path.name: item for item in ds.items}
    assert set(by_name) == {"a.png", "b.jpg", "cat0.png", "cat1.png", "cat2.png"}
    assert by_name["a.png"].repeats == 1 and by_name["b.jpg"].repeats == 1
    assert all(by_name[f"cat{i}.png"].repeats == 10 for i in range(3))
    assert len(ds) == 2 + 30
    assert any("misc" in n and "ignored" in n for n in ds.notes)
    assert not any(".thumbs" in n for n in ds.notes)
    assert by_name["b.jpg"].size == (192, 128)


def test_uppercase_extensions_and_formats(tmp_path):
    image(tmp_path / "A.PNG", 128, 128)
    image(tmp_path / "b.JPEG", 128, 128, fmt="JPEG")
    image(tmp_path / "c.webp", 128, 128, fmt="WEBP")
    image(tmp_path / "d.bmp", 128, 128, fmt="BMP")
    (tmp_path / "A.TXT").write_text("upper")
    ds = TrainDataset.from_settings(small(tmp_path))
    assert sorted(i.path.name for i in ds.items) == ["A.PNG", "b.JPEG", "c.webp", "d.bmp"]
    assert next(i for i in ds.items if i.path.name == "A.PNG").caption == "upper"


def test_captions_from_files_and_filename(tmp_path):
    image(tmp_path / "one.png", 128, 128)
    (tmp_path / "one.txt").write_text("a cat,  sitting\non a mat\n", encoding="utf-8")
    image(tmp_path / "two.png", 128, 128)
    (tmp_path / "two.caption").write_text("a dog")
    image(tmp_path / "00012-a_red_car.png", 128, 128)
    image(tmp_path / "5_dogs" / "0001 - big_blue  boat.png", 128, 128)

    ds = TrainDataset.from_settings(small(tmp_path))
    got = {i.path.name: (i.caption, i.caption_source) for i in ds.items}
    assert got["one.png"] == ("a cat, sitting on a mat", "file")
    assert got["two.png"] == ("a dog", "file")
    assert got["00012-a_red_car.png"] == ("a red car", "filename")
    assert got["0001 - big_blue  boat.png"] == ("big blue boat", "filename")
    notes = [n for n in ds.notes if "no caption file" in n]
    assert len(notes) == 1 and notes[0].startswith("2 images") and "file name" in notes[0]


def test_configured_caption_extension_wins(tmp_path):
    image(tmp_path / "one.png", 128, 128)
    (tmp_path / "one.txt").write_text("from txt")
    (tmp_path / "one.caption").write_text("from caption")
    assert TrainDataset.from_settings(small(tmp_path)).items[0].caption == "from txt"
    ds = TrainDataset.from_settings(small(tmp_path, caption_extension=".caption"))
    assert ds.items[0].caption == "from caption"
    assert not any("no caption" in n for n in ds.notes)


def test_caption_from_filename_rule():
    assert caption_from_filename(Path("00012-a_red_car.png")) == "a red car"
    assert caption_from_filename(Path("12345.png")) == ""
    assert caption_from_filename(Path("portrait of anna.jpg")) == "portrait of anna"


def test_unreadable_images_are_skipped_with_a_note(tmp_path):
    image(tmp_path / "good.png", 128, 128)
    (tmp_path / "garbage.png").write_bytes(b"definitely not an image")
    data = image(tmp_path / "full.png", 128, 128, 3).read_bytes()
    (tmp_path / "full.png").unlink()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])     # truncated PNG
    jpg = image(tmp_path / "full.jpg", 256, 256, 4, fmt="JPEG").read_bytes()
    (tmp_path / "full.jpg").unlink()
    (tmp_path / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])       # truncated JPEG

    ds = TrainDataset.from_settings(small(tmp_path))
    assert [i.path.name for i in ds.items] == ["good.png"]
    for name in ("garbage.png", "cut.png", "cut.jpg"):
        assert any(name in n and "skipped" in n for n in ds.notes), (name, ds.notes)


def test_tiny_images_are_skipped_with_a_note(tmp_path):
    image(tmp_path / "big.png", 256, 320)
    image(tmp_path / "tiny.png", 300, 100)                         # one side below min_bucket_reso
    ds = TrainDataset.from_settings(settings(tmp_path))
    assert [i.path.name for i in ds.items] == ["big.png"]
    note = next(n for n in ds.notes if "tiny.png" in n)
    assert "too small" in note and "at least 256 px on each side" in note
    # without bucketing nothing is too small: everything is cropped to the resolution
    ds = TrainDataset.from_settings(settings(tmp_path, enable_bucket=False))
    assert len(ds.items) == 2
    assert all(i.bucket == (512, 512) for i in ds.items)
    assert ds.buckets() == {(512, 512): 2}


def test_errors(tmp_path):
    with pytest.raises(TrainingError, match="does not exist"):
        TrainDataset.from_settings(settings(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(TrainingError, match="not a folder"):
        TrainDataset.from_settings(settings(tmp_path / "file.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainingError, match="no images in"):
        TrainDataset.from_settings(settings(empty))
    (empty / "caption.txt").write_text("only text")
    (empty / "misc").mkdir()
    image(empty / "misc" / "x.png", 300, 300)                      # in an ignored folder
    with pytest.raises(TrainingError, match="no images in"):
        TrainDataset.from_settings(settings(empty))
    with pytest.raises(TrainingError):
        TrainDataset.from_settings(settings(""))


def test_all_images_bad(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    image(tmp_path / "b.png", 64, 64)
    with pytest.raises(TrainingError) as e:
        TrainDataset.from_settings(settings(tmp_path))
    msg = str(e.value)
    assert "all 2 images" in msg and "1 unreadable" in msg and "smaller than 256" in msg
    assert "a.png" in msg and "b.png" in msg


def test_bad_bucket_settings(tmp_path):
    image(tmp_path / "a.png", 300, 300)
    with pytest.raises(TrainingError, match="min_bucket_reso"):
        TrainDataset.from_settings(settings(tmp_path, resolution=128))
    with pytest.raises(TrainingError, match="max_bucket_reso"):
        TrainDataset.from_settings(settings(tmp_path, resolution=1024, max_bucket_reso=768))


def test_exif_rotation_is_the_upright_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6                                                # rotate 90: stored 192x128, shown 128x192
    image(tmp_path / "rot.jpg", 192, 128, fmt="JPEG", exif=exif.tobytes())
    ds = TrainDataset.from_settings(small(tmp_path))
    item = ds.items[0]
    assert item.size == (128, 192)
    assert item.bucket[1] > item.bucket[0]
    px, orig, _ = ds.load(item)
    assert orig == (192, 128)
    assert tuple(px.shape) == (3, item.bucket[1], item.bucket[0])


# --------------------------------------------------------------------------------------------------------
# batches


def _mixed(tmp_path) -> TrainDataset:
    for i in range(5):
        image(tmp_path / f"sq{i}.png", 128, 128, i)
    for i in range(3):
        image(tmp_path / "3_wide" / f"w{i}.png", 256, 96, 10 + i)
    for i in range(2):
        image(tmp_path / f"tall{i}.png", 96, 240, 20 + i)
    return TrainDataset.from_settings(small(tmp_path))


def test_batches(tmp_path):
    ds = _mixed(tmp_path)
    assert len(ds.buckets()) == 3
    assert sum(ds.buckets().values()) == 10
    assert len(ds) == 5 + 9 + 2

    def plan(epoch, seed=7, bs=2):
        return [[i.path.name for i in b] for b in ds.batches(bs, epoch=epoch, seed=seed)]

    batches = list(ds.batches(2, epoch=0, seed=7))
    for b in batches:
        assert 1 <= len(b) <= 2
        assert len({i.bucket for i in b}) == 1                     # never mixes buckets
    counts = Counter(i.path.name for b in batches for i in b)
    assert counts == Counter({i.path.name: i.repeats for i in ds.items})
    # per bucket: ceil(samples / batch size) batches, the last one may be short
    assert len(batches) == 3 + 5 + 1
    assert plan(0) == plan(0)
    assert plan(0) != plan(1)
    assert plan(0, seed=1) != plan(0, seed=2)
    assert sum(len(b) for b in plan(3, bs=4)) == len(ds)
    with pytest.raises(TrainingError):
        next(ds.batches(0, 0, 0))


# --------------------------------------------------------------------------------------------------------
# captions


def _item(caption: str) -> TrainItem:
    return TrainItem(Path("x.png"), caption, 1, (64, 64), (64, 64), "file")


def _ds(tmp_path, **kw) -> TrainDataset:
    return TrainDataset([_item("x")], small(tmp_path, **kw))


def test_caption_unchanged_by_default(tmp_path):
    ds = _ds(tmp_path)
    assert ds.caption(_item("a  b,c , d"), random.Random(0)) == "a  b,c , d"


def test_shuffle_keeps_first_tokens(tmp_path):
    tags = [f"t{i}" for i in range(8)]
    item = _item(", ".join(tags))
    ds = _ds(tmp_path, shuffle_caption=True, keep_tokens=1)
    rng = random.Random(3)
    seen = set()
    for _ in range(20):
        out = ds.caption(item, rng).split(", ")
        assert out[0] == "t0"
        assert sorted(out) == sorted(tags)
        seen.add(tuple(out))
    assert len(seen) > 5                                           # it does shuffle
    ds2 = _ds(tmp_path, shuffle_caption=True, keep_tokens=2)
    assert all(ds2.caption(item, rng).split(", ")[:2] == ["t0", "t1"] for _ in range(10))
    # same rng seed, same caption
    assert ds.caption(item, random.Random(5)) == ds.caption(item, random.Random(5))


def test_tag_and_caption_dropout(tmp_path):
    item = _item("keep, a, b, c, d, e, f, g, h, i")
    rng = random.Random(0)
    assert _ds(tmp_path, caption_dropout=1.0).caption(item, rng) == ""
    assert _ds(tmp_path, tag_dropout=1.0, keep_tokens=1).caption(item, rng) == "keep"
    half = _ds(tmp_path, tag_dropout=0.5, keep_tokens=1)
    lengths = [len(half.caption(item, rng).split(", ")) for _ in range(200)]
    assert all(out >= 1 for out in lengths)
    assert 3 < sum(lengths) / len(lengths) - 1 < 6                 # about half of the 9 others
    outs = [half.caption(item, rng) for _ in range(50)]
    assert all(o.startswith("keep") for o in outs)
    # dropped tags keep their order when not shuffling
    for o in outs:
        rest = o.split(", ")[1:]
        assert rest == sorted(rest)
    some = _ds(tmp_path, caption_dropout=0.3)
    empties = sum(some.caption(item, rng) == "" for _ in range(1000))
    assert 200 < empties < 400


def test_templates(tmp_path):
    item = _item("red hat, smiling")
    ds = TrainDataset([item], small(tmp_path, template="a photo of [name], [filewords]"), name="myemb")
    assert ds.caption(item, random.Random(0)) == "a photo of myemb, red hat, smiling"

    lines = "art by [name]\n\na portrait of [filewords], by [name]\n"
    ds = TrainDataset([item], small(tmp_path, template=lines), name="zz")
    outs = {ds.caption(item, random.Random(s)) for s in range(40)}
    assert outs == {"art by zz", "a portrait of red hat, smiling, by zz"}

    # name defaults to the output name; an empty [filewords] leaves no dangling comma
    ds = TrainDataset([item], small(tmp_path, template="a photo of a [name], [filewords]", caption_dropout=1.0))
    assert ds.caption(item, random.Random(0)) == "a photo of a thing"

    # a built-in template by name
    ds = TrainDataset([item], small(tmp_path, template="subject"), name="qq")
    outs = {ds.caption(item, random.Random(s)) for s in range(50)}
    assert len(outs) > 3 and all("qq" in o and "[" not in o for o in outs)
    assert outs <= {line.replace("[name]", "qq") for line in DEFAULT_TEMPLATES["subject"]}
    for key in ("subject", "style"):
        assert DEFAULT_TEMPLATES[key] and all("[name]" in line for line in DEFAULT_TEMPLATES[key])


def test_template_from_settings_name(tmp_path):
    image(tmp_path / "00001-blue_sky.png", 128, 128)
    ds = TrainDataset.from_settings(small(tmp_path, template="[name] photo, [filewords]"), name="emb")
    assert ds.caption(ds.items[0], random.Random(0)) == "emb photo, blue sky"


# --------------------------------------------------------------------------------------------------------
# pixels


def test_load_wide_image(tmp_path):
    # a gradient left to right so that the crop can be checked against the source
    w, h = 400, 128
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.float64).round().astype(np.uint8)[None, :]
    a[..., 1] = 90
    Image.fromarray(a).save(tmp_path / "wide.png")
    ds = TrainDataset.from_settings(small(tmp_path))
    item = ds.items[0]
    bw, bh = item.bucket
    assert bw > bh
    px, orig, (top, left) = ds.load(item)
    assert px.dtype == torch.float32 and tuple(px.shape) == (3, bh, bw)
    assert px.min() >= -1.0 and px.max() <= 1.0
    assert orig == (h, w)
    # scaled to cover the bucket height, then centre-cropped in width
    scale = bh / h
    sw = round(w * scale)
    assert top == 0 and left == (sw - bw) // 2
    # column x of the crop is column (x + left) of the scaled image: red = 255 * (x+left) / (sw-1)
    red = (px[0, bh // 2].numpy() + 1) * 127.5
    expected = 255 * (np.arange(bw) + left) / (sw - 1)
    assert np.abs(red[4:-4] - expected[4:-4]).max() < 4
    assert torch.allclose(px[1], torch.full_like(px[1], 90 / 127.5 - 1), atol=0.02)


def test_load_tall_no_bucket_and_alpha(tmp_path):
    a = np.zeros((300, 100, 4), dtype=np.uint8)                    # fully transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "clear.png")
    ds = TrainDataset.from_settings(settings(tmp_path, resolution=128, enable_bucket=False))
    item = ds.items[0]
    px, orig, (top, left) = ds.load(item)
    assert tuple(px.shape) == (3, 128, 128)
    assert orig == (300, 100)
    assert left == 0 and top == (round(300 * 128 / 100) - 128) // 2
    assert torch.allclose(px, torch.ones_like(px))                 # flattened on white


def test_make_batch(tmp_path):
    ds = _mixed(tmp_path)
    batch_items = next(b for b in ds.batches(2, 0, 0) if len(b) == 2)
    batch = ds.make_batch(batch_items, random.Random(0))
    bw, bh = batch_items[0].bucket
    assert tuple(batch.pixels.shape) == (2, 3, bh, bw)
    assert batch.captions == [i.caption for i in batch_items]
    assert len(batch.original_sizes) == 2 and len(batch.crops) == 2
    assert batch.original_sizes[0] == (batch_items[0].size[1], batch_items[0].size[0])
    mixed = [next(i for i in ds.items if i.bucket == b) for b in list(ds.buckets())[:2]]
    with pytest.raises(ValueError):
        ds.make_batch(mixed, random.Random(0))


def test_load_reports_a_file_gone_bad(tmp_path):
    image(tmp_path / "d" / "a.png", 128, 128)
    ds = TrainDataset.from_settings(small(tmp_path / "d"))
    (tmp_path / "d" / "a.png").write_bytes(b"broken later")
    with pytest.raises(TrainingError, match="a.png"):
        ds.load(ds.items[0])


# --------------------------------------------------------------------------------------------------------
# UI


def test_preview_and_summary(tmp_path):
    ds = _mixed(tmp_path)
    rows = ds.preview()
    assert len(rows) == 10
    assert set(rows[0]) >= {"path", "caption", "bucket", "repeats", "caption_source"}
    wide = next(r for r in rows if r["path"].startswith("3_wide/"))
    assert wide["repeats"] == 3 and wide["caption_source"] == "filename"
    assert Counter(r["bucket"] for r in rows) == Counter({f"{w}x{h}": c for (w, h), c in ds.buckets().items()})
    assert len(ds.preview(limit=4)) == 4
    text = summary(ds)
    assert "10 images" in text and "16 steps per epoch" in text
    for (w, h), c in ds.buckets().items():
        assert f"{w}x{h} ({c})" in text
    assert "no caption file" in text
