"""A1111's built-in scripts other than X/Y/Z: prompt matrix, prompts from file, SD upscale, the two
outpaintings and loopback. Most tests run the scripts on a fake ScriptRun (its generations are
coloured squares or the init image with the mask painted, and it records what it was asked);
the last ones run them through the engine with a tiny SD1 model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from PIL import Image

from studio.errors import RequestError
from studio.generation.request import Img2ImgRequest, Txt2ImgRequest, validate_img2img, validate_txt2img
from studio.generation.runner import GenerationResult
from studio.generation.samplers import SAMPLER_NAMES, SCHEDULE_LABELS
from studio.jobs import JobState
from studio.scripts.loopback import Loopback, denoising_strengths
from studio.scripts.outpainting import PoorMansOutpainting, expansion, parse_directions
from studio.scripts.outpainting_mk2 import OutpaintingMk2, matched_noise
from studio.scripts.prompt_matrix import PromptMatrix, matrix_prompts
from studio.scripts.prompts_from_file import PromptsFromFile, parse_line
from studio.scripts.sd_upscale import SDUpscale, upscaled_size
from studio.scripts.tiles import append_params, combine_grid, split_grid

PAINT = (255, 0, 255)


# --------------------------------------------------------------------------------------------------------
# A fake engine side


@dataclass
class FakeEnv:
    options: dict[str, Any] = field(default_factory=lambda: {"grid_save": True})

    def sampler_names(self) -> list[str]:
        return list(SAMPLER_NAMES)

    def schedule_names(self) -> list[str]:
        return list(SCHEDULE_LABELS)

    def upscaler_names(self) -> list[str]:
        return ["None", "Lanczos", "Nearest"]

    def checkpoint_titles(self) -> list[str]:
        return ["tiny.safetensors [0123456789]"]

    def find_checkpoint(self, name: str) -> str | None:
        return "tiny.safetensors [0123456789]" if name in ("tiny", "tiny.safetensors") else None

    def vae_names(self) -> list[str]:
        return []

    def option(self, key: str) -> Any:
        return self.options.get(key)


def solid(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, (seed % 256, (seed * 7) % 256, (seed * 13) % 256))


class FakeRun:
    """txt2img: one solid square per image, its colour from the seed. img2img: the init image at the
    generation size with the area where the mask is white painted magenta (the mask as sent, blur not
    applied)."""

    def __init__(self, env: FakeEnv | None = None, interrupt_after: int | None = None) -> None:
        self.state = JobState("job", "test")
        self.env = env or FakeEnv()
        self.requests: list[Txt2ImgRequest] = []
        self.grids: list[tuple[Image.Image, str, str]] = []
        self.saved: list[tuple[Image.Image, int]] = []
        self.upscales: list[tuple[str, tuple[int, int]]] = []
        self.interrupt_after = interrupt_after

    def generate(self, req: Txt2ImgRequest) -> GenerationResult:
        assert not req.script_name and not req.script_args
        req = validate_img2img(req) if req.kind == "img2img" else validate_txt2img(req)
        self.requests.append(req)
        count = req.batch_size * req.n_iter
        seeds = [req.seed + i for i in range(count)]
        if req.kind == "img2img":
            images = [self._img2img(req, i) for i in range(count)]
        else:
            images = [solid(s, (req.width, req.height)) for s in seeds]
        if self.interrupt_after is not None and len(self.requests) >= self.interrupt_after:
            self.state.interrupted = True
        return GenerationResult(images=images, seeds=seeds, subseeds=[req.subseed] * count, paths=[], request=req,
                                model=None, infotexts=[f"{req.prompt}\nSteps: {req.steps}, Seed: {s}" for s in seeds])

    @staticmethod
    def _img2img(req: Img2ImgRequest, index: int) -> Image.Image:
        init = req.init_images[index % len(req.init_images)].convert("RGB")
        out = init.resize((req.width, req.height)) if init.size != (req.width, req.height) else init.copy()
        if req.mask is not None:
            mask = req.mask.convert("L").resize(out.size)
            out.paste(Image.new("RGB", out.size, PAINT), mask=mask.point(lambda v: 255 if v > 0 else 0))
        return out

    def upscale(self, image: Image.Image, upscaler: str, size: tuple[int, int]) -> Image.Image:
        self.upscales.append((upscaler, size))
        return image.resize(size, Image.Resampling.LANCZOS)

    def save_grid(self, image: Image.Image, infotext: str, req: Txt2ImgRequest, basename: str) -> None:
        self.grids.append((image, infotext, basename))
        return None

    def save_image(self, image: Image.Image, infotext: str, seed: int, req: Txt2ImgRequest) -> None:
        self.saved.append((image, seed))
        return None


def txt(**kw: Any) -> Txt2ImgRequest:
    base = dict(prompt="a cat", negative_prompt="blurry", steps=3, width=64, height=64, seed=100)
    return validate_txt2img(Txt2ImgRequest(**{**base, **kw}))


def noise_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def gradient_image(size: tuple[int, int]) -> Image.Image:
    w, h = size
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=2).astype(np.uint8), "RGB")


def img(image: Image.Image | None = None, **kw: Any) -> Img2ImgRequest:
    base = dict(prompt="a cat", steps=3, width=64, height=64, seed=100, denoising_strength=0.6,
                init_images=[image or gradient_image((64, 64))])
    return validate_img2img(Img2ImgRequest(**{**base, **kw}))


def run(script: Any, req: Txt2ImgRequest, args: list[Any], ctx: FakeRun | None = None) -> tuple[GenerationResult,
                                                                                                  FakeRun]:
    ctx = ctx or FakeRun()
    params = script.parse(args, req, ctx.env)
    return script.run(ctx, req, params), ctx


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


# --------------------------------------------------------------------------------------------------------
# Script info: A1111's positional arguments


@pytest.mark.parametrize("script,labels", [
    (PromptMatrix(), ["Put variable parts at start of prompt", "Use different seed for each picture", "Select prompt",
                      "Select joining char", "Grid margins (px)"]),
    (PromptsFromFile(), ["Iterate seed every line", "Use same random seed for all lines", "Insert prompts at the",
                         "List of prompt inputs", "Make a combined image containing all outputs (if more than one)"]),
    (SDUpscale(), ["", "Tile overlap", "Upscaler", "Scale Factor"]),
    (OutpaintingMk2(), ["", "Pixels to expand", "Mask blur", "Outpainting direction",
                        "Fall-off exponent (lower=higher detail)", "Color variation"]),
    (PoorMansOutpainting(), ["Pixels to expand", "Mask blur", "Masked content", "Outpainting direction"]),
    (Loopback(), ["Loops", "Final denoising strength", "Denoising strength curve",
                  "Append interrogated prompt at each iteration"]),
])
def test_script_info_lists_a1111_arguments_in_order(script, labels):
    tab = "img2img"
    info = script.info(FakeEnv(), tab)
    assert [a["label"] for a in info["args"]] == labels
    assert info["name"] == script.title.lower() and info["is_img2img"]


def test_script_info_values_and_ranges():
    env = FakeEnv()
    up = SDUpscale().info(env, "img2img")["args"]
    assert (up[1]["value"], up[1]["minimum"], up[1]["maximum"], up[1]["step"]) == (64, 0, 256, 16)
    assert up[2]["choices"] == env.upscaler_names() and up[2]["value"] == "None"
    assert (up[3]["value"], up[3]["minimum"], up[3]["maximum"]) == (2.0, 1.0, 4.0)
    mk2 = OutpaintingMk2().info(env, "img2img")["args"]
    assert [mk2[i]["value"] for i in (1, 2, 4, 5)] == [128, 8, 1.0, 0.05]
    assert list(mk2[3]["value"]) == ["left", "right", "up", "down"]
    assert PoorMansOutpainting().info(env, "img2img")["args"][1]["value"] == 4
    assert SDUpscale.tabs == OutpaintingMk2.tabs == PoorMansOutpainting.tabs == Loopback.tabs == ("img2img",)
    assert set(PromptMatrix.tabs) == set(PromptsFromFile.tabs) == {"txt2img", "img2img"}


# --------------------------------------------------------------------------------------------------------
# Tiles


@pytest.mark.parametrize("size,tile,overlap", [((200, 150), (64, 64), 16), ((128, 128), (64, 64), 8),
                                               ((130, 70), (64, 64), 0), ((64, 64), (64, 64), 32),
                                               ((50, 40), (64, 64), 8)])
def test_tiles_round_trip_exactly(size, tile, overlap):
    image = noise_image(size)
    grid = split_grid(image, *tile, overlap)
    assert all(t.size == tile for t in grid.images())
    assert same(combine_grid(grid), image)


def test_tile_positions_follow_a1111():
    grid = split_grid(noise_image((128, 100)), 64, 64, 8)
    # cols = ceil((128 - 8) / 56) = 3 spread evenly: dx = 32; rows = ceil(92 / 56) = 2, the last flush
    assert [x for x, _, _, _ in grid.positions()][:3] == [0, 32, 64]
    assert sorted({y for _, y, _, _ in grid.positions()}) == [0, 36]


def test_combine_feathers_changed_tiles():
    grid = split_grid(Image.new("RGB", (96, 64), (0, 0, 0)), 64, 64, 32)
    white = [Image.new("RGB", (64, 64), (0, 0, 0)), Image.new("RGB", (64, 64), (255, 255, 255))]
    out = np.asarray(combine_grid(grid.with_images(white)))[0, :, 0]
    assert out[31] == 0 and out[32] == 0 and out[63] > 240 and out[95] == 255
    assert np.all(np.diff(out[32:64].astype(int)) >= 0)   # a ramp across the overlap


def test_tile_not_larger_than_overlap_is_refused():
    with pytest.raises(ValueError, match="larger than the overlap"):
        split_grid(noise_image((200, 64)), 64, 64, 64)


def test_append_params_quotes():
    assert append_params("p\nSteps: 3", {"A": 1, "B": "x, y"}) == 'p\nSteps: 3, A: 1, B: "x, y"'


# --------------------------------------------------------------------------------------------------------
# Prompt matrix


def test_matrix_prompts_order_and_joining():
    assert matrix_prompts("a cat|red|hat") == ["a cat", "a cat, red", "a cat, hat", "a cat, red, hat"]
    assert matrix_prompts("a cat|red|hat", put_at_start=True, delimiter=" ") == ["a cat", "red a cat", "hat a cat",
                                                                                  "red hat a cat"]
    assert matrix_prompts("plain") == ["plain"]
    assert matrix_prompts("x| red, |blue") == ["x", "x, red", "x, blue", "x, red, blue"]


def test_prompt_matrix_makes_grid_then_cells_with_their_prompts():
    req = txt(prompt="a cat|red|hat|tall")
    result, ctx = run(PromptMatrix(), req, [])
    prompts = matrix_prompts("a cat|red|hat|tall")
    assert len(result.images) == 1 + 8
    assert [r.prompt for r in ctx.requests] == prompts
    assert result.prompts == [req.prompt, *prompts]
    assert all(r.seed == 100 and r.batch_size == 1 and r.n_iter == 1 for r in ctx.requests)
    grid = result.images[0]
    # 3 parts: 2 rows (2 ** (3 // 2)) of 4 columns, with label strips on top and left
    assert grid.width > 4 * 64 and grid.height > 2 * 64
    assert ctx.grids[0][2] == "prompt_matrix" and result.seeds == [100] * 9
    assert all(same(cell, solid(100, (64, 64))) for cell in result.images[1:])


def test_prompt_matrix_options():
    req = txt(prompt="a dog", negative_prompt="ugly|dark")
    result, ctx = run(PromptMatrix(), req, [True, True, "negative", "space", 10])
    assert [r.negative_prompt for r in ctx.requests] == ["ugly", "dark ugly"]
    assert [r.prompt for r in ctx.requests] == ["a dog", "a dog"]
    assert [r.seed for r in ctx.requests] == [100, 101] and result.seeds[1:] == [100, 101]
    assert result.negative_prompts[1:] == ["ugly", "dark ugly"]
    # one part: one row of two columns, the margin between them
    assert result.images[0].width >= 2 * 64 + 10


def test_prompt_matrix_interrupted_returns_cells_without_grid():
    result, ctx = run(PromptMatrix(), txt(prompt="a|b|c"), [], FakeRun(interrupt_after=2))
    assert len(result.images) == 2 and result.interrupted and not ctx.grids


@pytest.mark.parametrize("args,label", [([False, False, "neutral"], "Select prompt"),
                                        ([False, False, "positive", "tab"], "Select joining char"),
                                        (["maybe"], "Put variable parts at start of prompt"),
                                        ([False, False, "positive", "comma", 501], "Grid margins (px)")])
def test_prompt_matrix_bad_args_name_the_argument(args, label):
    with pytest.raises(RequestError, match=label.replace("(", r"\(").replace(")", r"\)")):
        PromptMatrix().parse(args, txt(prompt="a|b"), FakeEnv())


def test_prompt_matrix_too_many_parts():
    with pytest.raises(RequestError, match="variable parts"):
        PromptMatrix().parse([], txt(prompt="a" + "|x" * 11), FakeEnv())


# --------------------------------------------------------------------------------------------------------
# Prompts from file or textbox


def test_parse_line_types_and_quoting():
    line = ('--prompt "a cat, sitting" on a mat --negative_prompt ugly --steps 10 --seed 5 --cfg_scale 7.5 '
            '--sampler_name "Euler a" --tiling true --do_not_save_grid false --subseed_strength 0.25')
    assert parse_line(line) == {"prompt": "a cat, sitting on a mat", "negative_prompt": "ugly", "steps": 10,
                                "seed": 5, "cfg_scale": 7.5, "sampler_name": "Euler a", "tiling": True,
                                "do_not_save_grid": False, "subseed_strength": 0.25}
    assert parse_line("--restore_faces TRUE") == {"restore_faces": False}   # only "true" is true, as A1111


@pytest.mark.parametrize("line,message", [
    ("--bogus 3", "unknown commandline option: --bogus"),
    ("--steps ten", "--steps must be a whole number"),
    ("--cfg_scale high", "--cfg_scale must be a number"),
    ("--steps", "missing argument"),
    ('--prompt "open', "can't split"),
    ("--steps 4 extra", 'must start with "--": extra'),
])
def test_prompts_from_file_errors_name_the_line(line, message):
    text = f"a plain prompt\n\n{line}"
    with pytest.raises(RequestError) as e:
        PromptsFromFile().parse([False, False, "start", text], txt(), FakeEnv())
    assert "line 3" in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("line,message", [
    ("--steps 1000", "steps"), ("--sampler_name Nope", "Unknown sampler"), ("--sd_model other", "unknown checkpoint"),
    ("--styles mine", "--styles is not supported"), ("--outpath_samples /tmp", "not supported"),
    ("--sampler_index 99", "--sampler_index"), ("--width 4000", "width"),
])
def test_prompts_from_file_refuses_bad_values_before_queueing(line, message):
    with pytest.raises(RequestError) as e:
        PromptsFromFile().parse([False, False, "start", line], txt(), FakeEnv())
    assert "line 1" in str(e.value) and message in str(e.value)


def test_prompts_from_file_runs_each_line():
    text = ("red apple\n"
            "--prompt 'green pear' --negative_prompt bad --steps 5 --seed 7 --batch_size 2\n"
            "  \n"
            "a cat -- with dashes\n"
            "--steps 4 --sampler_index 1 --sd_model tiny --width 128")
    req = txt(prompt="still life", negative_prompt="blurry")
    result, ctx = run(PromptsFromFile(), req, [False, False, "start", text])
    r = ctx.requests
    assert [x.prompt for x in r] == ["red apple still life", "green pear still life", "a cat -- with dashes still life",
                                     "still life"]
    assert r[1].negative_prompt == "bad blurry" and r[0].negative_prompt == "blurry"
    assert (r[1].steps, r[1].seed, r[1].batch_size) == (5, 7, 2)
    assert [x.seed for x in (r[0], r[2], r[3])] == [100, 100, 100]
    assert r[3].sampler_name == SAMPLER_NAMES[1] and r[3].checkpoint == "tiny.safetensors [0123456789]"
    assert r[3].width == 128 and all(x.do_not_save_grid for x in r)
    assert len(result.images) == 5 and result.seeds == [100, 7, 8, 100, 100]
    assert result.prompts == ["red apple still life", "green pear still life", "green pear still life",
                              "a cat -- with dashes still life", "still life"]
    assert result.request is req


def test_prompts_from_file_end_position_and_iterate_seed():
    req = txt(prompt="base", batch_size=2, n_iter=2)
    result, ctx = run(PromptsFromFile(), req, [True, False, "end", "one\ntwo\n--prompt '' --steps 2"])
    assert [x.prompt for x in ctx.requests] == ["base one", "base two", ""]
    assert [x.seed for x in ctx.requests] == [100, 104, 108]
    assert len(result.images) == 12


def test_prompts_from_file_combined_image():
    result, ctx = run(PromptsFromFile(), txt(), [False, False, "start", "one\ntwo\nthree", True])
    assert len(result.images) == 4 and result.images[0].size == (128, 128)   # round(sqrt(3)) = 2 rows
    assert result.infotexts[0] == "\n".join(result.infotexts[1:])
    assert result.prompts[0] == "one\ntwo\nthree" and ctx.grids[0][2] == ""


def test_prompts_from_file_empty_text_is_refused():
    with pytest.raises(RequestError, match="List of prompt inputs"):
        PromptsFromFile().parse([False, False, "start", "\n  \n"], txt(), FakeEnv())


# --------------------------------------------------------------------------------------------------------
# SD upscale


def test_sd_upscale_doubles_with_api_style_args():
    init = gradient_image((64, 64))
    req = img(init)
    result, ctx = run(SDUpscale(), req, ["", 8, "Lanczos", 2.0])
    assert [im.size for im in result.images] == [(128, 128)]
    assert ctx.upscales == [("Lanczos", (128, 128))]
    # 3 x 3 tiles of 64 overlapping by 8, one generation each, seed + 1 from batch to batch
    assert len(ctx.requests) == 9 and [r.seed for r in ctx.requests] == list(range(100, 109))
    assert all(r.init_images[0].size == (64, 64) and r.width == 64 and not r.save_images for r in ctx.requests)
    # the fake img2img hands the tiles back unchanged: the picture is the upscaled image itself
    assert same(result.images[0], init.resize((128, 128), Image.Resampling.LANCZOS))
    assert "SD upscale overlap: 8, SD upscale upscaler: Lanczos" in result.infotexts[0]
    assert ctx.saved[0][1] == 100 and result.seeds == [100]


def test_sd_upscale_batches_and_iterations():
    req = img(batch_size=4, n_iter=2)
    result, ctx = run(SDUpscale(), req, ["", 16, 1, 2])   # upscaler by index
    assert len(result.images) == 2 and result.seeds == [100, 101]
    # 9 tiles in batches of 4, 4, 1; each batch at the previous batch's first seed + 1
    assert [(r.seed, r.batch_size) for r in ctx.requests] == [(100, 4), (101, 4), (102, 1),
                                                              (101, 4), (102, 4), (103, 1)]


def test_sd_upscale_sizes():
    assert upscaled_size((100, 60), 2.5) == (248, 144)
    result, ctx = run(SDUpscale(), img(gradient_image((100, 60)), width=64, height=64), ["", 16, "nearest", 2.5])
    assert result.images[0].size == (248, 144) and ctx.upscales == [("Nearest", (248, 144))]
    result, ctx = run(SDUpscale(), img(width=128, height=128), ["", 16, "None", 3])
    assert result.images[0].size == (64, 64) and not ctx.upscales   # "None" does not resize, as A1111
    # a tile larger than the enlarged image is shrunk to it
    result, ctx = run(SDUpscale(), img(width=512, height=512), ["", 64, "Lanczos", 2])
    assert result.images[0].size == (128, 128) and [r.width for r in ctx.requests] == [128]


@pytest.mark.parametrize("args,label", [(["", 8, "Bogus", 2.0], "Upscaler"), (["", 8, 7, 2.0], "Upscaler"),
                                        (["", 300, "Lanczos", 2.0], "Tile overlap"),
                                        (["", 8, "Lanczos", 5], "Scale Factor"),
                                        (["", 64, "Lanczos", 4], "tile overlap")])
def test_sd_upscale_bad_args(args, label):
    with pytest.raises(RequestError, match=label):
        SDUpscale().parse(args, img(), FakeEnv())


# --------------------------------------------------------------------------------------------------------
# Outpainting


def test_expansion_rounds_canvas_to_64():
    assert expansion((64, 64), 64, ["right"]) == expansion((64, 64), 64, ("right",))
    e = expansion((100, 100), 64, ["left", "right"])
    assert (e.left, e.right, e.width, e.height, e.result_size) == (78, 78, 256, 128, (256, 100))
    e = expansion((64, 64), 32, ["up", "down", "left"])
    assert (e.left, e.right, e.up, e.down, e.width, e.height) == (64, 0, 32, 32, 128, 128)
    assert parse_directions("right, up") == ("right", "up")
    with pytest.raises(RequestError, match="Outpainting direction"):
        parse_directions(["sideways"])
    with pytest.raises(RequestError, match="at least one"):
        parse_directions([])


def test_matched_noise_keeps_the_image_and_follows_its_colours():
    image = Image.new("RGB", (128, 64), (200, 40, 40))
    image.paste(gradient_image((64, 64)).point(lambda v: v // 4 + 150), (0, 0))
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (64, 0, 128, 64))
    out = matched_noise(image, mask)
    a, src = np.asarray(out).astype(int), np.asarray(image).astype(int)
    assert np.array_equal(a[:, :64], src[:, :64])
    filled = a[:, 64:]
    assert filled.std() > 1 and abs(filled.mean() - src[:, :64].mean()) < 20
    assert same(out, matched_noise(image, mask))   # seeded


def test_outpainting_mk2_extends_and_keeps_the_original():
    init = noise_image((64, 64), seed=3)
    req = img(init, width=128, height=64)
    result, ctx = run(OutpaintingMk2(), req, ["", 64, 0, ["right"], 1.0, 0.05])
    assert [im.size for im in result.images] == [(128, 64)]
    out = np.asarray(result.images[0])
    assert np.array_equal(out[:, :64], np.asarray(init)) and (out[:, 64:] == PAINT).all()
    (sub,) = ctx.requests
    assert (sub.width, sub.height, sub.inpainting_fill, sub.inpaint_full_res) == (128, 64, 1, False)
    assert (sub.mask_blur_x, sub.mask_blur_y, sub.seed) == (0, 0, 100)


def test_outpainting_mk2_blur_window_and_directions():
    init = noise_image((64, 64), seed=4)
    result, ctx = run(OutpaintingMk2(), img(init, width=64, height=64, batch_size=2),
                      ["", 64, 8, ["left", "down"], 1.0, 0.05])
    pictures = [im for im in result.images if im.size == (128, 128)]
    assert len(pictures) == 2 and len(result.images) == 3   # a grid of the two first
    left, down = ctx.requests
    # a 64 wide window at the left edge, blur 4x the slider along the axis that grew (both grew)
    assert (left.width, left.height, left.mask_blur_x, left.mask_blur_y, left.batch_size) == (64, 64, 32, 32, 2)
    assert (down.width, down.height) == (128, 64)
    out = np.asarray(pictures[0])
    # the original sits at (64, 0); the mask reaches mask-blur pixels into it on the grown sides
    assert np.array_equal(out[:56, 72:], np.asarray(init)[:56, 8:])
    assert result.seeds == [100, 100, 101]


def test_outpainting_mk2_large_blur_is_applied_to_the_mask():
    result, ctx = run(OutpaintingMk2(), img(width=128, height=64), ["", 64, 20, ["right"], 1.0, 0.05])
    (sub,) = ctx.requests
    assert (sub.mask_blur_x, sub.mask_blur_y) == (0, 0)
    assert 0 < np.asarray(sub.mask)[0, 30] < 255   # blurred here by 80


def test_poor_mans_outpainting_tiles_the_new_area():
    init = noise_image((64, 64), seed=5)
    req = img(init, width=64, height=64)
    result, ctx = run(PoorMansOutpainting(), req, [32, 4, "original", ["right"]])
    assert [im.size for im in result.images] == [(128, 64)]
    # canvas 128 wide (32 rounded up to 64 more), tiles at x = 0, 32, 64: the first lies in the original
    assert len(ctx.requests) == 2 and [r.seed for r in ctx.requests] == [100, 101]
    assert all(r.inpainting_fill == 1 and r.mask_blur_x == 8 for r in ctx.requests)
    out = np.asarray(result.images[0])
    assert np.array_equal(out[:, :56], np.asarray(init)[:, :56])   # the mask starts 2 * blur into the image
    assert (out[:, 64:] == PAINT).all()
    # a side that did not grow keeps the image's size (the canvas is rounded up to 64)
    result, _ = run(PoorMansOutpainting(), img(gradient_image((64, 40)), width=64, height=64),
                    [32, 4, "fill", ["right"]])
    assert result.images[0].size == (128, 40)


def test_poor_mans_outpainting_needs_tiles_larger_than_the_overlap():
    with pytest.raises(RequestError, match="larger than the pixels to expand"):
        PoorMansOutpainting().parse([64, 4, 0, ["right"]], img(), FakeEnv())


# --------------------------------------------------------------------------------------------------------
# Loopback


def test_loopback_strength_curves():
    assert denoising_strengths(0.75, 0.5, 1) == [0.75]
    assert denoising_strengths(0.75, 0.5, 4) == pytest.approx([0.75, 0.75 - 0.25 / 3, 0.75 - 0.5 / 3, 0.5])
    aggressive = denoising_strengths(0.2, 0.8, 4, "Aggressive")
    lazy = denoising_strengths(0.2, 0.8, 4, "Lazy")
    assert aggressive[1] == pytest.approx(0.2 + 0.6 * math.sin(math.pi / 6))
    assert lazy[1] == pytest.approx(0.2 + 0.6 * (1 - math.cos(math.pi / 6)))
    assert aggressive[0] == lazy[0] == 0.2 and aggressive[-1] == pytest.approx(0.8) == lazy[-1]


def test_loopback_feeds_each_picture_back():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 8, 8))
    req = img(mask=mask, inpainting_fill=0, denoising_strength=0.8, batch_size=3)
    result, ctx = run(Loopback(), req, [3, 0.4, "Linear", "None"])
    r = ctx.requests
    assert [x.denoising_strength for x in r] == pytest.approx([0.8, 0.6, 0.4])
    assert [x.seed for x in r] == [100, 101, 102] and all(x.batch_size == 1 for x in r)
    assert [x.inpainting_fill for x in r] == [0, 1, 1]
    assert same(r[1].init_images[0], result.images[1]) and same(r[2].init_images[0], result.images[2])
    assert len(result.images) == 4 and result.images[0].size == (3 * 64, 64)   # one-row grid first
    assert "Final denoising strength: 0.4, Denoising curve: Linear" in result.infotexts[1]


def test_loopback_batches_keep_their_last_picture():
    result, ctx = run(Loopback(), img(n_iter=2), [2, 0.5, "Lazy", "None"])
    assert [x.seed for x in ctx.requests] == [100, 101, 102, 103]
    assert same(ctx.requests[2].init_images[0], img().init_images[0])   # each batch starts from the init image
    assert len(result.images) == 3 and result.seeds[1:] == [101, 103]


def test_loopback_refuses_interrogation():
    with pytest.raises(RequestError, match="Append interrogated prompt at each iteration"):
        Loopback().parse([4, 0.5, "Linear", "CLIP"], img(), FakeEnv())
    with pytest.raises(RequestError, match="Loops"):
        Loopback().parse([0], img(), FakeEnv())
    with pytest.raises(RequestError, match="Denoising strength curve"):
        Loopback().parse([2, 0.5, "Steep"], img(), FakeEnv())


def test_too_many_args_is_refused():
    with pytest.raises(RequestError, match="at most 4 script_args"):
        Loopback().parse([1, 0.5, "Linear", "None", "extra"], img(), FakeEnv())


# --------------------------------------------------------------------------------------------------------
# Through the engine, with a tiny SD1 model


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from studio.config import Flags
    from studio.core import Studio
    from tests.helpers import make_models_dir

    root = tmp_path_factory.mktemp("scripts_builtin")
    make_models_dir(root, (("sd1", ".safetensors"),))
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    for script in (PromptMatrix(), PromptsFromFile(), SDUpscale(), OutpaintingMk2(), PoorMansOutpainting(),
                   Loopback()):
        if not any(x.title == script.title for tab in script.tabs for x in s.engine.scripts.for_tab(tab)):
            s.engine.scripts.add(script)
    yield s
    s.queue.shutdown()


def engine_txt(**kw: Any) -> Txt2ImgRequest:
    base = dict(prompt="a cat", steps=2, width=64, height=64, seed=11, sampler_name="Euler a", save_images=False)
    return Txt2ImgRequest(**{**base, **kw})


def engine_img(**kw: Any) -> Img2ImgRequest:
    base = dict(prompt="a cat", steps=2, width=64, height=64, seed=11, sampler_name="Euler", save_images=False,
                denoising_strength=0.5, init_images=[noise_image((64, 64), seed=9)])
    return Img2ImgRequest(**{**base, **kw})


def test_engine_prompt_matrix_cells_equal_single_generations(studio):
    result = studio.txt2img(engine_txt(prompt="a cat|red", script_name="prompt matrix",
                                       script_args=[False, True, "positive", "comma", 0]))
    assert len(result.images) == 3 and result.prompts[1:] == ["a cat", "a cat, red"]
    for i, (prompt, cell) in enumerate(zip(["a cat", "a cat, red"], result.images[1:])):
        single = studio.txt2img(engine_txt(prompt=prompt, seed=11 + i))
        assert same(cell, single.images[0])
    assert result.seeds[1:] == [11, 12]


def test_engine_sd_upscale_api_args_double_the_size(studio):
    result = studio.img2img(engine_img(script_name="SD upscale", script_args=["", 8, "Lanczos", 2.0]))
    assert [im.size for im in result.images] == [(128, 128)]
    assert "SD upscale upscaler: Lanczos" in result.infotexts[0]


def test_engine_outpainting_mk2_keeps_the_original(studio):
    init = noise_image((64, 64), seed=9)
    result = studio.img2img(engine_img(width=128, height=64, init_images=[init], script_name="outpainting mk2",
                                       script_args=["", 64, 1, ["right"], 1.0, 0.05]))
    assert [im.size for im in result.images] == [(128, 64)]
    out, src = np.asarray(result.images[0]), np.asarray(init)
    # the mask starts one pixel into the image, blurred by 4 (a Gaussian reaching ~10 pixels)
    assert np.array_equal(out[:, :48], src[:, :48])
    assert not np.array_equal(out[:, 64:], np.zeros_like(out[:, 64:]))


def test_engine_unknown_script_args_are_400s(studio):
    with pytest.raises(RequestError, match="Upscaler"):
        studio.img2img(engine_img(script_name="sd upscale", script_args=["", 8, "Bogus", 2.0]))
    with pytest.raises(RequestError, match="line 1"):
        studio.txt2img(engine_txt(script_name="prompts from file or textbox",
                                  script_args=[False, False, "start", "--steps many"]))
