"""The output history: listing the output folders newest first, paged and searched from an index
of infotexts, thumbnails, deleting only inside the output folders; its API routes and its tab."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from studio.errors import RequestError
from studio.generation.history import HistoryFileMissing, OutputHistory, Query
from studio.generation.outputs import SaveFormat, image_bytes
from studio.options import StudioOptions

BASE_TIME = 1_800_000_000  # 2027-01-15: files get mtimes from here, one second apart


def infotext(prompt: str, seed: int, model: str = "tinyModel", model_hash: str = "abcdef1234",
             negative: str = "blurry") -> str:
    return (f"{prompt}\nNegative prompt: {negative}\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: {seed}, "
            f"Size: 64x48, Model hash: {model_hash}, Model: {model}")


def write_image(path: Path, text: str | None, age: int, fmt: str = "png", colour=(200, 30, 30),
                mode: str = "RGB", size=(64, 48)) -> Path:
    """An image file with ``text`` embedded as the saver embeds it; ``age``: its mtime's offset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new(mode, size, colour if mode == "RGB" else (*colour, 128))
    path.write_bytes(image_bytes(image, text, SaveFormat(fmt)))
    os.utime(path, (BASE_TIME + age, BASE_TIME + age))
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    out = tmp_path / "outputs"
    write_image(out / "txt2img-images" / "2026-12-01" / "00000-1.png", infotext("a red fox in snow", 1), 1)
    write_image(out / "txt2img-images" / "2026-12-02" / "00001-2.png",
                infotext("a Blue whale, ocean", 2, model="otherModel", model_hash="99ff00aa11"), 2)
    write_image(out / "img2img-images" / "2026-12-02" / "00000-3.jpg", infotext("a fox at night", 3), 3, "jpg")
    write_image(out / "txt2img-grids" / "2026-12-02" / "grid-0000.webp", infotext("a fox grid", 4), 4, "webp")
    # an image saved without infotext, with A1111's save_txt sidecar
    write_image(out / "extras-images" / "00000-0.png", None, 5)
    (out / "extras-images" / "00000-0.txt").write_text(infotext("sidecar lighthouse", 5) + "\n")
    # an earlier run's folder that no option names any more
    write_image(out / "old-run" / "00007-7.png", infotext("an old castle", 7, negative="ugly, fox"), 0)
    # not listed: a broken file, a text file, a hidden staging file, an image outside the outputs
    (out / "txt2img-images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (out / "txt2img-images" / "notes.txt").write_text("hello")
    write_image(out / "txt2img-images" / ".saving-1234.png", infotext("hidden", 9), 9)
    write_image(tmp_path / "models" / "Stable-diffusion" / "preview.png", infotext("a model preview", 8), 8)
    return tmp_path


@pytest.fixture
def history(data_dir: Path) -> OutputHistory:
    return OutputHistory(data_dir, StudioOptions)


def rels(items) -> list[str]:
    return [item.rel for item in items]


def test_lists_every_output_image_newest_first_with_infotext(history):
    items = history.items()
    assert rels(items) == [
        "outputs/extras-images/00000-0.png",
        "outputs/txt2img-grids/2026-12-02/grid-0000.webp",
        "outputs/img2img-images/2026-12-02/00000-3.jpg",
        "outputs/txt2img-images/2026-12-02/00001-2.png",
        "outputs/txt2img-images/2026-12-01/00000-1.png",
        "outputs/old-run/00007-7.png",
    ]
    by_rel = {item.rel: item for item in items}
    whale = by_rel["outputs/txt2img-images/2026-12-02/00001-2.png"]
    assert whale.prompt == "a Blue whale, ocean" and whale.negative_prompt == "blurry"
    assert (whale.model, whale.model_hash, whale.date) == ("otherModel", "99ff00aa11", "2026-12-02")
    assert (whale.width, whale.height) == (64, 48) and whale.infotext.startswith("a Blue whale, ocean\n")
    assert by_rel["outputs/img2img-images/2026-12-02/00000-3.jpg"].prompt == "a fox at night"  # EXIF
    assert by_rel["outputs/txt2img-grids/2026-12-02/grid-0000.webp"].prompt == "a fox grid"
    assert by_rel["outputs/extras-images/00000-0.png"].prompt == "sidecar lighthouse"  # the .txt
    assert by_rel["outputs/old-run/00007-7.png"].date == time.strftime("%Y-%m-%d", time.localtime(BASE_TIME))


def test_pages_are_clamped_and_counted(history):
    first = history.page(0, 4)
    assert (first.total, first.pages, first.index, len(first.items)) == (6, 2, 0, 4)
    last = history.page(1, 4)
    assert rels(last.items) == ["outputs/txt2img-images/2026-12-01/00000-1.png", "outputs/old-run/00007-7.png"]
    assert history.page(99, 4).index == 1 and history.page(-3, 4).index == 0
    assert history.page(0, 0).size == 1 and history.page(0, 10_000).size == 500


def test_search_by_words_model_date_and_negative(history):
    def found(query: str) -> list[str]:
        return [Path(rel).name for rel in rels(history.items(query))]

    assert found("fox") == ["grid-0000.webp", "00000-3.jpg", "00000-1.png"]
    assert found("FOX Night") == ["00000-3.jpg"]  # every word, any case
    assert found("fox whale") == []
    assert found("blue WHALE") == ["00001-2.png"]
    assert found("model:othermodel") == ["00001-2.png"] == found("model:99FF")
    assert found("fox model:tinyModel date:2026-12-01") == ["00000-1.png"]
    assert found("date:2026-12-02") == ["grid-0000.webp", "00000-3.jpg", "00001-2.png"]
    assert found("date:2026-12") == ["grid-0000.webp", "00000-3.jpg", "00001-2.png", "00000-1.png"]
    assert found("negative:fox") == ["00007-7.png"] == found("neg:FOX castle")
    assert found('"red fox"') == ["00000-1.png"] and found("red fox") == ["00000-1.png"]
    assert found("old-run") == ["00007-7.png"]  # the folder names count as words too
    assert Query.parse('unclosed "quote') == Query(words=("unclosed", '"quote'))
    page = history.page(0, 2, "fox")
    assert (page.total, page.pages) == (3, 2)


def test_index_reads_each_file_once_until_it_changes(history, data_dir, monkeypatch):
    history.items()
    reads: list[Path] = []
    original = history._read
    monkeypatch.setattr(history, "_read", lambda path, stat: reads.append(path) or original(path, stat))
    history.items("fox")
    history.page(1, 2)
    assert reads == []
    path = data_dir / "outputs" / "txt2img-images" / "2026-12-01" / "00000-1.png"
    write_image(path, infotext("a changed prompt", 1), 50)
    assert rels(history.items("changed")) == ["outputs/txt2img-images/2026-12-01/00000-1.png"]
    assert reads == [path]
    # a new image appears, a deleted one goes, with no refresh step
    write_image(data_dir / "outputs" / "txt2img-images" / "2026-12-03" / "00002-5.png", infotext("new", 5), 60)
    path.unlink()
    assert rels(history.items())[0] == "outputs/txt2img-images/2026-12-03/00002-5.png"
    assert "outputs/txt2img-images/2026-12-01/00000-1.png" not in rels(history.items())


def test_folders_follow_the_settings(data_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    write_image(elsewhere / "2026-12-05" / "00000-9.png", infotext("far away", 9), 90)
    options = StudioOptions()
    history = OutputHistory(data_dir, lambda: options)
    assert "far away" not in [i.prompt for i in history.items()]
    options = StudioOptions(outdir_samples=str(elsewhere))  # read on every call
    item = history.items("far")[0]
    assert item.rel == (elsewhere / "2026-12-05" / "00000-9.png").resolve().as_posix()
    assert history.entry(item.rel).prompt == "far away"
    # a mapping works too, and a relative folder is under the data dir
    write_image(data_dir / "renders" / "00000-4.png", infotext("relative folder", 4), 80)
    mapped = OutputHistory(data_dir, lambda: {"outdir_txt2img_samples": "renders"})
    assert rels(mapped.items("relative")) == ["renders/00000-4.png"]
    assert data_dir.resolve() / "renders" in mapped.roots()


def test_entry_and_delete_refuse_paths_outside_the_outputs(history, data_dir):
    outside = data_dir / "models" / "Stable-diffusion" / "preview.png"
    for bad in (str(outside), "models/Stable-diffusion/preview.png",
                "outputs/../models/Stable-diffusion/preview.png", "/etc/passwd"):
        with pytest.raises(RequestError, match="not inside the output folders"):
            history.delete(bad)
    with pytest.raises(RequestError, match="not an image"):
        history.delete("outputs/txt2img-images/notes.txt")
    with pytest.raises(HistoryFileMissing, match="does not exist"):
        history.delete("outputs/txt2img-images/2026-12-01/99999-1.png")
    with pytest.raises(RequestError, match="no path given"):
        history.entry("")
    with pytest.raises(RequestError, match="not a readable image"):
        history.entry("outputs/txt2img-images/broken.png")
    # a link inside the outputs that points outside is refused as well
    link = data_dir / "outputs" / "txt2img-images" / "link.png"
    link.symlink_to(outside)
    with pytest.raises(RequestError, match="not inside the output folders"):
        history.delete("outputs/txt2img-images/link.png")
    assert outside.exists() and (data_dir / "outputs" / "txt2img-images" / "notes.txt").exists()


def test_delete_removes_image_sidecar_and_thumbnail(history, data_dir):
    image = data_dir / "outputs" / "extras-images" / "00000-0.png"
    thumb = history.thumbnail("outputs/extras-images/00000-0.png")
    removed = history.delete("outputs/extras-images/00000-0.png")
    assert removed == [image.resolve(), image.with_suffix(".txt").resolve()]
    assert not image.exists() and not image.with_suffix(".txt").exists() and not thumb.exists()
    assert "outputs/extras-images/00000-0.png" not in rels(history.items())
    # without a sidecar only the image goes; an unrelated .txt of another stem stays
    history.delete("outputs/old-run/00007-7.png")
    assert not (data_dir / "outputs" / "old-run" / "00007-7.png").exists()
    assert (data_dir / "outputs" / "txt2img-images" / "notes.txt").exists()


def test_thumbnails_are_small_cached_and_flattened(history, data_dir):
    big = write_image(data_dir / "outputs" / "txt2img-images" / "big.png", infotext("big", 1), 70,
                      mode="RGBA", size=(640, 320))
    thumb = history.thumbnail("outputs/txt2img-images/big.png")
    assert thumb.is_relative_to(data_dir / "cache" / "thumbs")
    with Image.open(thumb) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (256, 128))
    made = thumb.stat().st_mtime_ns
    assert history.thumbnail(str(big)) == thumb and thumb.stat().st_mtime_ns == made
    write_image(big, infotext("big", 1), 71, size=(100, 400))  # changed: a new thumbnail
    again = history.thumbnail(big)
    with Image.open(again) as image:
        assert again != thumb and image.size == (64, 256)
    # the thumbnails' cache is never listed, even when an output folder is the data dir itself
    whole = OutputHistory(data_dir, lambda: {"outdir_samples": "."})
    assert not any(item.rel.startswith("cache/") for item in whole.items())
    assert "models/Stable-diffusion/preview.png" in rels(whole.items())


def test_three_thousand_images_page_quickly(tmp_path, capsys):
    text = infotext("a cat number {}", 0)
    folder = tmp_path / "outputs" / "txt2img-images" / "2026-12-02"
    folder.mkdir(parents=True)
    tiny = Image.new("RGB", (8, 8), (10, 20, 30))
    for i in range(3000):
        path = folder / f"{i:05d}-{i}.png"
        path.write_bytes(image_bytes(tiny, text.replace("{}", str(i)).replace("Seed: 0", f"Seed: {i}")))
        os.utime(path, (BASE_TIME + i, BASE_TIME + i))
    history = OutputHistory(tmp_path, StudioOptions)
    start = time.perf_counter()
    first = history.page(0, 48)
    indexed = time.perf_counter() - start
    start = time.perf_counter()
    later = history.page(40, 48, '"number 12"')
    paged = time.perf_counter() - start
    start = time.perf_counter()
    for item in first.items:
        history.thumbnail(item.path)
    thumbs = time.perf_counter() - start
    assert (first.total, first.pages, first.items[0].prompt) == (3000, 63, "a cat number 2999")
    assert later.total == len([i for i in range(3000) if str(i).startswith("12")]) and later.index == later.pages - 1
    with capsys.disabled():
        print(f"\n3,000 images: first page (index built) {indexed:.2f} s, a searched page {paged:.3f} s, "
              f"48 thumbnails {thumbs:.2f} s")


# -- the API routes ------------------------------------------------------------------------------


@pytest.fixture
def client(data_dir):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from studio.api.history import build_history_router
    from studio.api.routes import StudioRoute

    studio = SimpleNamespace(paths=SimpleNamespace(data=data_dir), settings=SimpleNamespace(options=StudioOptions()))
    app = FastAPI()
    app.include_router(build_history_router(studio, StudioRoute))
    with TestClient(app) as c:
        yield c


def test_api_lists_pages_and_searches(client):
    body = client.get("/studio/v1/history", params={"size": 4}).json()
    assert (body["total"], body["pages"], body["page"], body["size"]) == (6, 2, 1, 4)
    first = body["items"][0]
    assert first["path"] == "outputs/extras-images/00000-0.png" and first["prompt"] == "sidecar lighthouse"
    assert first["thumbnail"].startswith("/studio/v1/history/thumb?path=outputs%2Fextras-images%2F00000-0.png&v=")
    assert set(first) >= {"mtime", "model", "model_hash", "infotext", "date", "width", "height"}
    body = client.get("/studio/v1/history", params={"q": "fox model:tinymodel", "page": 9, "size": 2}).json()
    assert body["page"] == 2 and [i["path"] for i in body["items"]] == ["outputs/txt2img-images/2026-12-01/00000-1.png"]
    assert client.get("/studio/v1/history", params={"page": 0}).status_code == 422


def test_api_thumbnail_image_and_delete(client, data_dir):
    items = client.get("/studio/v1/history").json()["items"]
    reply = client.get(items[0]["thumbnail"])
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/jpeg"
    reply = client.get("/studio/v1/history/image", params={"path": "outputs/img2img-images/2026-12-02/00000-3.jpg"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/jpeg"
    reply = client.delete("/studio/v1/history", params={"path": "outputs/extras-images/00000-0.png"})
    assert reply.json() == {"deleted": ["outputs/extras-images/00000-0.png", "outputs/extras-images/00000-0.txt"]}
    assert client.get("/studio/v1/history").json()["total"] == 5
    reply = client.delete("/studio/v1/history", params={"path": "models/Stable-diffusion/preview.png"})
    assert reply.status_code == 400 and "not inside the output folders" in reply.json()["detail"]
    reply = client.delete("/studio/v1/history", params={"path": "outputs/extras-images/00000-0.png"})
    assert reply.status_code == 404 and "does not exist" in reply.json()["detail"]
    reply = client.get("/studio/v1/history/thumb", params={"path": "outputs/txt2img-images/broken.png"})
    assert reply.status_code == 400 and "not a readable image" in reply.json()["detail"]
    assert client.get("/studio/v1/history/thumb", params={"path": "../x.png"}).status_code == 400
    assert (data_dir / "models" / "Stable-diffusion" / "preview.png").exists()


# -- the tab ---------------------------------------------------------------------------------------


def test_tab_builds_with_its_ids(data_dir):
    import gradio as gr

    from studio.ui.history import build_history_tab, caption

    studio = SimpleNamespace(paths=SimpleNamespace(data=data_dir), settings=SimpleNamespace(options=StudioOptions()),
                             flags=SimpleNamespace(listen=False, share=False))
    with gr.Blocks() as blocks, gr.Tabs():
        tab = build_history_tab(studio)
    ids = {block.elem_id for block in blocks.blocks.values()}
    assert {"tab_history", "history_search", "history_gallery", "history_info", "history_delete",
            "history_confirm_delete", "history_open_folder", "history_refresh", "history_page"} <= ids
    assert {f"history_send_{key}" for key in ("txt2img", "img2img", "inpaint", "extras", "controlnet")} <= ids
    assert set(tab.send) == {"txt2img", "img2img", "inpaint", "extras", "controlnet"}
    assert caption("  a   long " + "word " * 20, "x.png").endswith("…") and caption("", "x.png") == "x.png"
