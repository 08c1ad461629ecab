"""A1111's saving options (samples_save, outdir_*, samples_filename_pattern, save_txt, grid_*)
as OutputSaver applies them. Expected names are worked out by hand from A1111's rules."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image

from studio.generation.grids import grid_rows
from studio.generation.outputs import next_number, open_image, read_infotext, save_image, write_new_file
from studio.generation.request import Img2ImgRequest, Txt2ImgRequest
from studio.generation.saving import OutputSaver

NOW = datetime(2024, 5, 6, 7, 8, 9)
DAY = "2024-05-06"
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def picture(color=(200, 30, 30), size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


def request(**changes) -> Txt2ImgRequest:
    base = {"prompt": "a red boat, (sunset:1.2) <lora:tiny:0.5>", "negative_prompt": "blurry sky",
            "steps": 20, "cfg_scale": 7.0, "width": 64, "height": 64, "seed": 1000, "batch_size": 2,
            "n_iter": 2, "sampler_name": "DPM++ 2M", "scheduler": "Automatic", "clip_skip": 2,
            "save_images": True}
    return Txt2ImgRequest(**(base | changes))


def saver(tmp_path: Path, kind: str = "txt2img", **options) -> OutputSaver:
    made = OutputSaver.from_options(options, tmp_path, kind, model_name="tiny model", model_hash="0123456789",
                                    vae_filename="vae-ft-mse.safetensors",
                                    styles={"Framed": "masterpiece, {prompt}, 4k"})
    made.now = lambda: NOW
    made.job_timestamp = "20240506070000"
    return made


def only_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- the default layout ---------------------------------------------------------------------------

def test_default_layout_is_the_dated_numbered_seed_name(tmp_path):
    # the settings as the studio holds them: empty folder options mean the defaults
    s = saver(tmp_path, samples_format="png", outdir_txt2img_samples="", save_txt=False, enable_pnginfo=True)
    req = request(batch_size=1, n_iter=2)
    first = s.save(picture(), "a red boat\nSteps: 20", 1000, req)
    second = s.save(picture(), "info two", 1001, req)
    folder = tmp_path / "outputs" / "txt2img-images" / DAY
    assert first == folder / "00000-1000.png" and second == folder / "00001-1001.png"
    assert only_files(folder) == ["00000-1000.png", "00001-1001.png"]   # no .txt, no staging files left
    assert read_infotext(open_image(first.read_bytes())) == "a red boat\nSteps: 20"


def test_default_layout_matches_save_image(tmp_path):
    """The saver and the older save_image (CLI, training, extras) name a first image alike."""
    from_saver = OutputSaver.from_options({}, tmp_path / "a", "txt2img").save(picture(), "x", 77, request())
    legacy = save_image(picture(), "x", tmp_path / "b" / "outputs" / "txt2img-images", 77)
    assert from_saver.relative_to(tmp_path / "a") == legacy.relative_to(tmp_path / "b")


def test_img2img_goes_to_its_own_folders(tmp_path):
    s = saver(tmp_path, kind="img2img")
    req = Img2ImgRequest(prompt="x", seed=5, batch_size=2, denoising_strength=0.6, save_images=True)
    assert s.save(picture(), "x", 5, req).parent == tmp_path / "outputs" / "img2img-images" / DAY
    assert s.save_grid([picture()] * 2, "x", req).parent == tmp_path / "outputs" / "img2img-grids" / DAY


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError):
        OutputSaver.from_options({}, tmp_path, "extras")


# -- whether to save ------------------------------------------------------------------------------

def test_samples_save_off_writes_nothing(tmp_path):
    s = saver(tmp_path, samples_save=False)
    assert s.save(picture(), "x", 1, request()) is None
    assert not (tmp_path / "outputs").exists()


def test_request_that_does_not_save_writes_nothing(tmp_path):
    s = saver(tmp_path)
    req = request(save_images=False)
    assert s.save(picture(), "x", 1, req) is None and s.save_grid([picture()] * 4, "x", req) is None
    assert not (tmp_path / "outputs").exists()


def test_do_not_save_samples_and_grid_are_separate(tmp_path):
    s = saver(tmp_path)
    no_samples, no_grid = request(do_not_save_samples=True), request(do_not_save_grid=True)
    assert s.save(picture(), "x", 1, no_samples) is None and s.save_grid([picture()] * 2, "x", no_samples)
    assert s.save(picture(), "x", 1, no_grid) and s.save_grid([picture()] * 2, "x", no_grid) is None


# -- folders --------------------------------------------------------------------------------------

def test_outdir_samples_takes_every_mode(tmp_path):
    for kind in ("txt2img", "img2img"):
        path = saver(tmp_path, kind=kind, outdir_samples="mine").save(picture(), "x", 3, request())
        assert path.parent == tmp_path / "mine" / DAY


def test_mode_folders_relative_absolute_and_empty(tmp_path):
    elsewhere = tmp_path / "abs"
    s = saver(tmp_path, outdir_txt2img_samples="pics/t2i", outdir_txt2img_grids=str(elsewhere))
    assert s.save(picture(), "x", 3, request()).parent == tmp_path / "pics" / "t2i" / DAY
    assert s.save_grid([picture()] * 2, "x", request()).parent == elsewhere / DAY
    empty = saver(tmp_path, outdir_img2img_samples="", kind="img2img")
    assert empty.save(picture(), "x", 3, request()).parent == tmp_path / "outputs" / "img2img-images" / DAY


def test_outdir_grids_takes_every_mode(tmp_path):
    for kind in ("txt2img", "img2img"):
        path = saver(tmp_path, kind=kind, outdir_grids="all-grids").save_grid([picture()] * 2, "x", request())
        assert path.parent == tmp_path / "all-grids" / DAY


def test_without_subfolders_the_prompt_joins_the_default_name(tmp_path):
    s = saver(tmp_path, save_to_dirs=False)
    path = s.save(picture(), "x", 1000, request())
    assert path == tmp_path / "outputs" / "txt2img-images" / "00000-1000-a red boat, (sunset_1.2).png"


def test_directory_pattern(tmp_path):
    s = saver(tmp_path, directories_filename_pattern="[steps]-[sampler]")
    assert s.save(picture(), "x", 1, request()).parent.name == "20-DPM++ 2M"
    emptied = saver(tmp_path, directories_filename_pattern="", directories_max_prompt_words=3)
    # A1111: an emptied pattern means [prompt_words]
    assert emptied.save(picture(), "x", 1, request()).parent.name == "a red boat"


# -- file names -----------------------------------------------------------------------------------

# (pattern, index of the image in the job, expected name); request(): seed 1000, batch 2 x 2
PATTERNS = [
    ("[seed]", 1, "1001"),
    ("[seed_first]-[seed_last]", 1, "1000-1003"),
    ("[steps]-[cfg]-[width]x[height]", 0, "20-7.0-64x48"),
    ("[sampler]-[scheduler]", 0, "DPM++ 2M-Karras"),
    ("[sampler_scheduler]", 0, "DPM++ 2M Karras"),
    ("[model_name]-[model_hash]", 0, "tiny model-0123456789"),
    ("[prompt]", 0, "a_red_boat,_(sunset_1.2)_"),
    ("[prompt_spaces]", 0, "a red boat, (sunset_1.2)"),
    ("[prompt_words]", 0, "a red boat sunset 1 2"),
    ("[negative_prompt]", 0, "blurry_sky"),
    ("b[batch_number]-g[generation_number]", 1, "b2-g2"),
    ("b[batch_number]-g[generation_number]", 2, "b1-g3"),
    ("[batch_size]", 0, "2"),
    ("[date]_[datetime]", 0, f"{DAY}_20240506070809"),
    ("[datetime<%Y_%m>]-[DATETIME<%H:%M>]", 0, "2024_05-07_08"),
    ("[datetime<%Y%H><UTC>]", 0, NOW.astimezone(timezone.utc).strftime("%Y%H")),
    ("[job_timestamp]", 0, "20240506070000"),
    ("[clip_skip]", 0, "2"),
    ("[seed]-d[denoising]", 0, "1000"),         # txt2img without hires. fix: the tag and "-d" vanish
    ("[vae_filename]", 0, "vae-ft-mse"),
    ("[styles]", 0, "Framed"),
    ("[hasprompt<boat|noboat><dog|nodog>]", 0, "boatnodog"),
    ("[prompt_hash<4>]", 0, hashlib.sha256(b"a red boat, (sunset:1.2) ").hexdigest()[:4]),
    ("kept-[foo<1>]-[Seed]", 0, "kept-[foo]-1000"),   # unknown tags stay; tag names ignore case
    ("[prompt_hash<many>]", 0, "[prompt_hash]"),       # a tag that cannot be filled stays too
    ("[datetime<%Y><Not/A_Zone>]", 0, "2024"),         # an unknown time zone means local time
]


@pytest.mark.parametrize(("pattern", "index", "expected"), PATTERNS)
def test_filename_pattern(tmp_path, pattern, index, expected):
    s = saver(tmp_path, samples_filename_pattern=pattern, save_images_add_number=False)
    path = s.save(picture(), "x", 1000 + index, request(), index=index)
    assert path.name == f"{expected}.png"


def test_index_defaults_to_the_order_of_saves(tmp_path):
    s = saver(tmp_path, samples_filename_pattern="[generation_number]-[batch_number]")
    names = [s.save(picture(), "x", 1000 + i, request()).name for i in range(4)]
    assert names == ["00000-1-1.png", "00001-2-2.png", "00002-3-1.png", "00003-4-2.png"]


def test_single_image_drops_batch_tags_and_seed_first_is_its_seed(tmp_path):
    pattern = "[seed_first]_[seed_last]-b[batch_number]-g[generation_number]"
    s = saver(tmp_path, samples_filename_pattern=pattern)
    assert s.save(picture(), "x", 1000, request(batch_size=1, n_iter=1)).name == "00000-1000.png"


def test_img2img_denoising_and_prompt_without_styles(tmp_path):
    s = saver(tmp_path, kind="img2img", samples_filename_pattern="[prompt_no_styles]-d[denoising]",
              save_images_add_number=False)
    req = Img2ImgRequest(prompt="masterpiece, a cat, 4k", seed=1, denoising_strength=0.6, save_images=True)
    assert s.save(picture(), "x", 1, req).name == "a cat-d0.6.png"


def test_none_pattern_leaves_only_the_number(tmp_path):
    s = saver(tmp_path, samples_filename_pattern="[none]", save_images_add_number=False)
    assert [s.save(picture(), "x", 1, request()).name for _ in range(2)] == ["00000.png", "00001.png"]


def test_sanitising_a_prompt_with_illegal_characters(tmp_path):
    req = request(prompt='  a/b:c*d?e"f<g>h|i#j\\k.. ')
    s = saver(tmp_path, samples_filename_pattern="[prompt]=[prompt_spaces]", save_images_add_number=False)
    # [prompt] turns the spaces into "_" first, so its leading/trailing ones stay (as in A1111)
    assert s.save(picture(), "x", 1, req).name == "__a_b_c_d_e_f_g_h_i_j_k.._=a_b_c_d_e_f_g_h_i_j_k.png"


def test_long_prompts_are_cut(tmp_path):
    word = "lighthouse "
    req = request(prompt=word * 40)                     # 440 characters
    s = saver(tmp_path, samples_filename_pattern="[prompt_spaces]", save_images_add_number=False)
    assert s.save(picture(), "x", 1, req).name == (word * 40)[:128].rstrip(" ") + ".png"
    long = saver(tmp_path, samples_filename_pattern="[prompt]-[prompt_spaces]-[prompt]")
    path = long.save(picture(), "x", 1, req)
    limit = os.statvfs(path.parent).f_namemax
    expected = ("00000-" + "-".join([(word * 40)[:128].replace(" ", "_"), (word * 40)[:128].rstrip(" "),
                                      (word * 40)[:128].replace(" ", "_")]))[:limit - 4] + ".png"
    assert path.name == expected and len(path.name) <= limit


# -- numbering and never overwriting --------------------------------------------------------------

def test_numbering_continues_after_existing_files(tmp_path):
    folder = tmp_path / "outputs" / "txt2img-images" / DAY
    folder.mkdir(parents=True)
    (folder / "00007-5-old.png").write_bytes(b"old")
    (folder / "00009.jpg").write_bytes(b"old")               # A1111 counts a bare number too
    (folder / "notes.txt").write_text("not numbered")
    assert next_number(folder) == 10
    assert saver(tmp_path).save(picture(), "x", 1000, request()).name == "00010-1000.png"


def test_grid_numbering_counts_only_grids(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    for name in ("grid-0003.png", "00020-1.png", "grid-x.png"):
        (folder / name).write_bytes(b"")
    assert next_number(folder, "grid") == 4 and next_number(folder) == 21


def test_without_numbers_a_taken_name_gets_a_suffix(tmp_path):
    s = saver(tmp_path, samples_filename_pattern="[seed]", save_images_add_number=False)
    first = s.save(picture((1, 2, 3)), "x", 5, request())
    second = s.save(picture((9, 9, 9)), "x", 5, request())
    assert (first.name, second.name) == ("5.png", "5-1.png")
    assert open_image(first.read_bytes()).getpixel((0, 0)) == (1, 2, 3)   # the first file is untouched


def test_write_new_file_never_replaces(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"mine")
    path = write_new_file(tmp_path, ["a.bin", "b.bin"], b"new")
    assert path.name == "b.bin" and (tmp_path / "a.bin").read_bytes() == b"mine"
    with pytest.raises(FileExistsError):
        write_new_file(tmp_path, ["a.bin"], b"new")
    assert only_files(tmp_path) == ["a.bin", "b.bin"]                  # no staging file left


# -- formats, embedded infotext and .txt ----------------------------------------------------------

def test_samples_format_and_save_txt(tmp_path):
    s = saver(tmp_path, samples_format="jpg", jpeg_quality=90, save_txt=True)
    path = s.save(picture(), "a red boat\nSteps: 20", 1000, request())
    assert path.suffix == ".jpg" and open_image(path.read_bytes()).format == "JPEG"
    assert read_infotext(open_image(path.read_bytes())) == "a red boat\nSteps: 20"
    assert path.with_suffix(".txt").read_text(encoding="utf-8") == "a red boat\nSteps: 20\n"


def test_save_txt_skips_a_name_whose_txt_exists(tmp_path):
    folder = tmp_path / "outputs" / "txt2img-images" / DAY
    folder.mkdir(parents=True)
    (folder / "1000.txt").write_text("someone's notes")
    s = saver(tmp_path, save_txt=True, samples_filename_pattern="[seed]", save_images_add_number=False)
    path = s.save(picture(), "info", 1000, request())
    assert path.name == "1000-1.png" and path.with_suffix(".txt").read_text() == "info\n"
    assert (folder / "1000.txt").read_text() == "someone's notes"


def test_enable_pnginfo_off_keeps_the_infotext_out_of_the_file(tmp_path):
    path = saver(tmp_path, enable_pnginfo=False, save_txt=True).save(picture(), "secret", 1, request())
    assert read_infotext(open_image(path.read_bytes())) is None
    assert path.with_suffix(".txt").read_text() == "secret\n"


def test_too_large_for_webp_is_saved_as_png(tmp_path):
    path = saver(tmp_path, samples_format="webp").save(picture(size=(16384, 8)), "x", 1, request())
    assert path.suffix == ".png"


# -- grids ----------------------------------------------------------------------------------------

def test_grid_of_four_is_two_by_two(tmp_path):
    s = saver(tmp_path)
    images = [picture(c) for c in COLORS[:4]]
    path = s.save_grid(images, "first image's infotext", request())
    assert path == tmp_path / "outputs" / "txt2img-grids" / DAY / "grid-0000.png"
    grid = open_image(path.read_bytes())
    assert grid.size == (128, 96)
    assert [grid.getpixel((x, y)) for y in (10, 58) for x in (10, 74)] == COLORS[:4]
    assert read_infotext(grid) == "first image's infotext"
    assert s.save_grid(images, "x", request()).name == "grid-0001.png"


def test_grid_options(tmp_path):
    assert saver(tmp_path, grid_save=False).save_grid([picture()] * 4, "x", request()) is None
    assert saver(tmp_path).save_grid([picture()], "x", request()) is None            # grid_only_if_multiple
    single = saver(tmp_path / "one", grid_only_if_multiple=False).save_grid([picture()], "x", request())
    assert single.name == "grid-0000.png"
    extended = saver(tmp_path / "ext", grid_extended_filename=True, grid_format="webp")
    path = extended.save_grid([picture()] * 2, "x", request())
    assert path.name == "grid-0000-1000.webp" and open_image(path.read_bytes()).format == "WEBP"
    flat = saver(tmp_path / "flat", grid_save_to_dirs=False).save_grid([picture()] * 2, "x", request())
    assert flat == tmp_path / "flat" / "outputs" / "txt2img-grids" / "grid-0000.png"


@pytest.mark.parametrize(("count", "batch_size", "n_rows", "prevent", "rows"), [
    (4, 1, -1, False, 2), (3, 1, -1, False, 2), (6, 1, -1, False, 2), (2, 1, -1, False, 1),
    (5, 1, -1, True, 1), (6, 1, -1, True, 2), (6, 3, 0, False, 3), (2, 1, 3, False, 2), (8, 1, 4, False, 4),
])
def test_grid_rows(count, batch_size, n_rows, prevent, rows):
    assert grid_rows(count, batch_size, n_rows, prevent) == rows


def test_grid_layout_options_shape_the_saved_grid(tmp_path):
    s = saver(tmp_path, n_rows=1, grid_background_color="#000000")
    path = s.save_grid([picture(size=(64, 48)), picture(size=(32, 16))], "x", request())
    grid = open_image(path.read_bytes())
    assert grid.size == (128, 48)
    # the small image is centred in its cell, on the background colour
    assert grid.getpixel((66, 2)) == (0, 0, 0) and grid.getpixel((96, 24)) == (200, 30, 30)
