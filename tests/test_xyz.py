"""X/Y/Z plot: A1111's value syntax, axis lists, loop order, grids and infotext, with a fake
ScriptRun whose images encode their request; then the script through the real engine."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.controlnet.units import ControlNetUnitRequest
from studio.errors import RequestError
from studio.generation.infotext import parse_infotext
from studio.generation.request import Txt2ImgRequest
from studio.generation.runner import GenerationResult
from studio.jobs import JobState
from studio.scripts import ranges
from studio.scripts.grid_labels import GridAnnotation, draw_grid_annotations, draw_prompt_matrix
from studio.scripts.xyz import XyzPlot, add_infotext_params, processing_order, varied_seed
from studio.scripts.xyz_axes import axes_for, resolve_axis

SAMPLERS = ["Euler", "Euler a", "DPM++ 2M"]
CHECKPOINTS = ["alpha.safetensors [1111111111]", "beta.safetensors [2222222222]"]


class FakeEnv:
    def __init__(self, **options):
        self.options = options

    def sampler_names(self):
        return list(SAMPLERS)

    def schedule_names(self):
        return ["Automatic", "Karras", "Exponential"]

    def upscaler_names(self):
        return ["None", "Lanczos", "Nearest"]

    def checkpoint_titles(self):
        return list(CHECKPOINTS)

    def find_checkpoint(self, name):
        for title in CHECKPOINTS:
            if name in (title, title.split(" [")[0], title.split(".")[0]):
                return title
        return None

    def vae_names(self):
        return ["tinyvae.safetensors"]

    def option(self, key):
        return self.options.get(key)


class FakeRun:
    """Generations whose single-colour images encode steps, seed and sampler; records every request."""

    def __init__(self, env=None, stop_after=None):
        self.env = env or FakeEnv()
        self.state = JobState("job", "x/y/z")
        self.requests: list[Txt2ImgRequest] = []
        self.saved: list[tuple[str, str]] = []
        self.stop_after = stop_after

    def generate(self, req):
        assert req.script_name is None and req.script_args == []
        self.requests.append(req)
        if self.stop_after is not None and len(self.requests) >= self.stop_after:
            self.state.interrupted = True
        images, seeds, infos = [], [], []
        for i in range(req.batch_size * req.n_iter):
            seed = req.seed + i
            colour = (req.steps * 10 % 256, seed % 256, SAMPLERS.index(req.sampler_name or "Euler") * 80)
            images.append(Image.new("RGB", (req.width, req.height), colour))
            seeds.append(seed)
            infos.append(f"{req.prompt}\nNegative prompt: {req.negative_prompt}\nSteps: {req.steps}, "
                         f"Sampler: {req.sampler_name}, Seed: {seed}, Version: test")
        return GenerationResult(images, seeds, infos, [], req, model=None, subseeds=[req.subseed] * len(seeds))

    def save_grid(self, image, infotext, req, basename):
        self.saved.append((basename, infotext))
        return Path(f"/grids/{basename}-{len(self.saved):04d}.png")

    def upscale(self, image, upscaler, size):
        raise AssertionError("not used")

    def save_image(self, image, infotext, seed, req):
        raise AssertionError("not used")


def request(**kw) -> Txt2ImgRequest:
    base = dict(prompt="a red cube", negative_prompt="blurry", steps=3, width=64, height=64, seed=100,
                sampler_name="Euler")
    base.update(kw)
    return Txt2ImgRequest(**base)


def args(x=("Nothing", ""), y=("Nothing", ""), z=("Nothing", ""), **flags):
    """script_args in A1111's order; an axis is (type, text) or (type, text, dropdown)."""
    values = []
    for axis in (x, y, z):
        values += [axis[0], axis[1], list(axis[2]) if len(axis) > 2 else []]
    defaults = dict(draw_legend=True, include_lone_images=False, include_sub_grids=False, no_fixed_seeds=False,
                    vary_seeds_x=False, vary_seeds_y=False, vary_seeds_z=False, margin_size=0, csv_mode=False)
    defaults.update(flags)
    return values + list(defaults.values())


def plot(script_args, req=None, run=None):
    script, req, run = XyzPlot(), req or request(), run or FakeRun()
    params = script.parse(script_args, req, run.env)
    return script.run(run, req, params), run


def colour(image, xy=(0, 0)):
    return image.convert("RGB").getpixel(xy)


# --------------------------------------------------------------------------- value syntax


@pytest.mark.parametrize("text,expected", [
    ("1-5", [1, 2, 3, 4, 5]),
    ("1-10 (+2)", [1, 3, 5, 7, 9]),
    ("10-1 (-3)", [10, 7, 4]),          # A1111 adds 1 to the end whatever the step's sign
    ("1-10 [5]", [1, 3, 5, 7, 10]),
    ("5, 1-3, 8", [5, 1, 2, 3, 8]),
    ("-5--3", [-5, -4, -3]),
    ("-1", [-1]),
    ("10,,20", [10, 20]),               # empty values are skipped for numbers
])
def test_int_values(text, expected):
    assert ranges.expand_ints(ranges.csv_values(text)) == expected


@pytest.mark.parametrize("text,expected", [
    ("0.5-1.5 (+0.25)", [0.5, 0.75, 1.0, 1.25, 1.5]),
    ("1-2 [4]", [1.0, 4 / 3, 5 / 3, 2.0]),
    ("2-1 (-0.5)", [2.0, 1.5, 1.0]),
    ("7, 7.5", [7.0, 7.5]),
    ("0.5-2.5", [0.5, 1.5, 2.5]),
])
def test_float_values(text, expected):
    assert ranges.expand_floats(ranges.csv_values(text)) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["10-1", "1-10 (2)", "abc", "7.5", "1-5 (+0)", "1-999999999", "1-5 [0]"])
def test_bad_int_values(text):
    with pytest.raises(ValueError):
        ranges.expand_ints(ranges.csv_values(text))


def test_csv_quoting_permutations_and_size():
    assert ranges.csv_values('a, "b, c" ,d\ne') == ["a", "b, c", "d", "e"]
    assert ranges.csv_string(["Euler", "Euler a", "x,y"]) == 'Euler,Euler a,"x,y"'
    assert ranges.permutations_of(["a", "b", "c"])[:2] == [("a", "b", "c"), ("a", "c", "b")]
    assert len(ranges.permutations_of(["a", "b", "c"])) == 6
    assert ranges.parse_size("512x768") == (512, 768)
    with pytest.raises(ValueError):
        ranges.parse_size("512")


# --------------------------------------------------------------------------- axis lists


@pytest.mark.parametrize("tab,label,index", [
    # A1111 1.10's axis_options, as each tab's dropdown numbers them
    ("txt2img", "Nothing", 0), ("txt2img", "Seed", 1), ("txt2img", "Steps", 4), ("txt2img", "Hires steps", 5),
    ("txt2img", "CFG Scale", 6), ("txt2img", "Prompt S/R", 7), ("txt2img", "Sampler", 9),
    ("txt2img", "Checkpoint name", 11), ("txt2img", "VAE", 30), ("txt2img", "Size", 42),
    ("img2img", "Seed", 1), ("img2img", "Steps", 4), ("img2img", "CFG Scale", 5), ("img2img", "Image CFG Scale", 6),
    ("img2img", "Prompt S/R", 7), ("img2img", "Sampler", 9), ("img2img", "Checkpoint name", 10),
    ("img2img", "Denoising", 25), ("img2img", "Size", 41),
])
def test_axis_indices_match_a1111(tab, label, index):
    assert axes_for(tab)[index].label == label


def test_axis_lists_per_tab():
    assert len(axes_for("txt2img")) == 43 + 11 and len(axes_for("img2img")) == 42 + 11  # + ControlNet's
    assert axes_for("txt2img")[-11].label == "[ControlNet] Enabled"
    assert resolve_axis(9, "txt2img", "X type").label == "Sampler"
    assert resolve_axis("steps", "txt2img", "X type").label == "Steps"       # labels in any case
    assert resolve_axis("4", "img2img", "X type").label == "Steps"
    assert resolve_axis(None, "txt2img", "Y type").label == "Nothing"
    assert resolve_axis("[ControlNet] Guidance Start (T)", "txt2img", "X type").label == "[ControlNet] Guidance Start"
    with pytest.raises(RequestError, match="img2img"):
        resolve_axis("Hires steps", "img2img", "X type")
    with pytest.raises(RequestError, match="out of range"):
        resolve_axis(99, "txt2img", "X type")
    with pytest.raises(RequestError, match="unknown axis"):
        resolve_axis("Steps please", "txt2img", "X type")


@pytest.mark.parametrize("tab,value,label", [
    ("txt2img", 13, "Sigma Churn"), ("txt2img", "Extra noise", "Extra noise"),
    ("img2img", 6, "Image CFG Scale"), ("txt2img", "Initial noise multiplier", "Initial noise multiplier"),
    ("txt2img", 36, "Always discard next-to-last sigma"), ("txt2img", "[ControlNet] Model", "[ControlNet] Model"),
])
def test_unsupported_axes_are_refused_by_name(tab, value, label):
    req = request() if tab == "txt2img" else request().model_copy(update={"kind": "img2img"})
    with pytest.raises(RequestError, match=rf"X type: the X/Y/Z axis '{re.escape(label)}'.*not available"):
        XyzPlot().parse(args(x=(value, "1,2")), req, FakeEnv())


def test_bad_values_are_request_errors_naming_the_axis():
    env, req = FakeEnv(), request()
    with pytest.raises(RequestError, match=r"X values \(Steps\): no values"):
        XyzPlot().parse(args(x=("Steps", "")), req, env)
    with pytest.raises(RequestError, match=r"Y values \(Steps\).*less than or equal to 150"):
        XyzPlot().parse(args(y=("Steps", "10, 200")), req, env)
    with pytest.raises(RequestError, match=r"X values \(Sampler\): unknown sampler 'Heun'"):
        XyzPlot().parse(args(x=("Sampler", "Euler, Heun"), csv_mode=True), req, env)
    with pytest.raises(RequestError, match=r"unknown checkpoint 'gamma'.*models/Stable-diffusion"):
        XyzPlot().parse(args(x=("Checkpoint name", "alpha, gamma"), csv_mode=True), req, env)
    with pytest.raises(RequestError, match="Prompt S/R did not find dog"):
        XyzPlot().parse(args(x=("Prompt S/R", "dog, cat")), req, env)
    with pytest.raises(RequestError, match="too large"):
        XyzPlot().parse(args(x=("Steps", "1-100"), y=("Seed", "1-100")), request(width=512, height=512), env)
    with pytest.raises(RequestError, match="at most 18"):
        XyzPlot().parse([0] * 19, req, env)


# --------------------------------------------------------------------------- the run


def test_steps_by_sampler_grid_cells_and_infotext():
    result, run = plot(args(x=("Steps", "2, 3"), y=("Sampler", "", ["Euler", "Euler a"]), include_lone_images=True))
    assert [(r.steps, r.sampler_name) for r in run.requests] == [(2, "Euler"), (3, "Euler"), (2, "Euler a"),
                                                                  (3, "Euler a")]
    grid, *cells = result.images
    assert len(cells) == 4 and len(result.infotexts) == 5 and len(result.seeds) == 5 and len(result.prompts) == 5
    for cell, r in zip(cells, run.requests):
        assert colour(cell) == (r.steps * 10, 100, SAMPLERS.index(r.sampler_name) * 80)
    grid_params = parse_infotext(result.infotexts[0])
    assert grid_params["Script"] == "X/Y/Z plot"
    assert (grid_params["X Type"], grid_params["X Values"]) == ("Steps", "2, 3")
    assert (grid_params["Y Type"], grid_params["Y Values"]) == ("Sampler", "Euler,Euler a")   # the dropdown's
    assert "Z Type" not in grid_params and grid_params["Version"] == "test"
    assert result.infotexts[0].endswith(', Y Values: "Euler,Euler a", Version: test')
    assert "Script" not in parse_infotext(result.infotexts[1])        # cells keep their own infotext
    assert result.paths == [Path("/grids/xyz_grid-0001.png")] and run.saved[0][0] == "xyz_grid"


def test_dropdown_is_used_for_choice_axes_unless_csv_mode():
    _, run = plot(args(x=("Sampler", "Euler", ["DPM++ 2M"])))
    assert [r.sampler_name for r in run.requests] == ["DPM++ 2M"]
    _, run = plot(args(x=("Sampler", "euler a", ["DPM++ 2M"]), csv_mode=True))
    assert [r.sampler_name for r in run.requests] == ["Euler a"]     # the listed name, any case


def test_checkpoint_axis_is_outermost_so_each_model_loads_once():
    _, run = plot(args(x=("Steps", "2, 3, 4"), y=("Checkpoint name", "", CHECKPOINTS), z=("CFG Scale", "5, 7")))
    loaded = [r.checkpoint for r in run.requests]
    changes = sum(1 for a, b in zip(loaded, loaded[1:]) if a != b)
    assert len(loaded) == 12 and changes == 1 and loaded[0] == CHECKPOINTS[0]
    assert {r.checkpoint for r in run.requests[:6]} == {CHECKPOINTS[0]}


def test_processing_order():
    assert processing_order((2, 2, 1), (0, 0, 0)) == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    assert processing_order((2, 2, 1), (1.0, 0, 0))[:2] == [(0, 0, 0), (0, 1, 0)]        # X outermost
    assert processing_order((2, 2, 2), (0, 1.0, 0.7))[:4] == [(0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1)]


def test_vary_seeds_and_fixed_seed_axis():
    assert [varied_seed(10, (ix, iy, 0), (3, 2, 1), (True, True, False)) for iy in range(2) for ix in range(3)] \
        == [10, 11, 12, 13, 14, 15]
    assert varied_seed(10, (2, 1, 1), (3, 2, 2), (False, True, True)) == 10 + 1 + 1 * 2
    _, run = plot(args(x=("Steps", "2, 3"), y=("CFG Scale", "5, 6"), vary_seeds_y=True))
    assert [r.seed for r in run.requests] == [100, 100, 101, 101]
    result, run = plot(args(x=("Seed", "-1, 5, -1")))
    seeds = [r.seed for r in run.requests]
    assert seeds[1] == 5 and seeds[0] != -1 and seeds[2] != -1
    grid_params = parse_infotext(result.infotexts[0])
    assert grid_params["X Values"] == "-1, 5, -1"
    assert grid_params["Fixed X Values"] == ", ".join(map(str, seeds))
    result, run = plot(args(x=("Seed", "-1, 5"), no_fixed_seeds=True), req=request(seed=-1))
    assert [r.seed for r in run.requests] == [-1, 5] and "Fixed X Values" not in result.infotexts[0]
    _, run = plot(args(x=("Steps", "2, 3")), req=request(seed=-1))
    assert run.requests[0].seed == run.requests[1].seed != -1          # fixed once for every cell


def test_prompt_search_replace_and_order():
    result, run = plot(args(x=("Prompt S/R", "red, blue, green"), include_lone_images=True),
                       req=request(prompt="a red cube", negative_prompt="red light"))
    assert [(r.prompt, r.negative_prompt) for r in run.requests] == [
        ("a red cube", "red light"), ("a blue cube", "blue light"), ("a green cube", "green light")]
    assert result.prompts == ["a red cube", "a red cube", "a blue cube", "a green cube"]
    assert result.negative_prompts[2] == "blue light"
    _, run = plot(args(x=("Prompt order", "cat, dog, bird")), req=request(prompt="a cat, a dog and a bird"))
    assert run.requests[1].prompt == "a cat, a bird and a dog" and len(run.requests) == 6


def test_field_setting_and_engine_axes():
    env = FakeEnv()
    _, run = plot(args(x=("Negative Guidance minimum sigma", "0, 2.5"), y=("VAE", "auto, tinyvae.safetensors"),
                       z=("Size", "64x64, 128x64")), run=FakeRun(env))
    assert run.requests[0].override_settings == {"s_min_uncond": 0.0}
    assert {r.vae for r in run.requests} == {"Automatic", "tinyvae.safetensors"}
    assert {(r.width, r.height) for r in run.requests} == {(64, 64), (128, 64)}
    hires = request(enable_hr=True).model_copy(update={"hr_denoising_strength": 0.7})
    _, run = plot(args(x=("Denoising", "0.2, 0.4")), req=hires)
    assert [(r.denoising_strength, r.hr_denoising_strength, r.hires_denoising) for r in run.requests] == [
        (0.2, None, 0.2), (0.4, None, 0.4)]
    flux_like = request().model_copy(update={"preset_fields": ("steps", "cfg_scale")})
    _, run = plot(args(x=("Steps", "2, 3")), req=flux_like)
    assert run.requests[0].preset_fields == ("cfg_scale",)    # a plotted value is never a family preset


def test_controlnet_axes_change_enabled_units():
    units = (ControlNetUnitRequest(enabled=True, weight=1.0), ControlNetUnitRequest(enabled=False, weight=1.0))
    req = request().model_copy(update={"controlnet_units": units})
    _, run = plot(args(x=("[ControlNet] Weight", "0.5, 1.5"), y=(47, "0.6, 1")), req=req)
    assert [(r.controlnet_units[0].weight, r.controlnet_units[0].guidance_end) for r in run.requests] == [
        (0.5, 0.6), (1.5, 0.6), (0.5, 1.0), (1.5, 1.0)]
    assert all(r.controlnet_units[1].weight == 1.0 for r in run.requests)      # a disabled unit is left alone
    with pytest.raises(RequestError, match="no ControlNet unit is enabled"):
        XyzPlot().parse(args(x=("[ControlNet] Weight", "0.5")), request(), FakeEnv())
    with pytest.raises(RequestError, match="guidance_start"):
        XyzPlot().parse(args(x=("[ControlNet] Guidance Start", "0.2, 0.9")),
                        request().model_copy(update={"controlnet_units": (
                            ControlNetUnitRequest(guidance_end=0.5),)}), FakeEnv())


def test_images_order_with_z_sub_grids_and_lone_images():
    result, run = plot(args(x=("Steps", "2, 3"), y=("CFG Scale", "5, 6, 7"), z=("Seed", "1, 2"),
                            include_sub_grids=True, include_lone_images=True))
    assert len(run.requests) == 12 and len(result.images) == 1 + 2 + 12
    main, sub1, sub2 = result.images[:3]
    assert main.width >= sub1.width + sub2.width and main.height > sub1.height      # Z titles above
    main_params, sub_params = parse_infotext(result.infotexts[0]), parse_infotext(result.infotexts[2])
    assert main_params["Z Type"] == "Seed" and main_params["Fixed Z Values"] == "1, 2"
    assert "Z Type" not in sub_params and sub_params["Seed"] == "2" and sub_params["X Type"] == "Steps"
    assert result.seeds[:3] == [1, 1, 2]
    assert [s for s in result.seeds[3:]] == [1] * 6 + [2] * 6                         # cells: X, then Y, then Z
    assert [n for n, _ in run.saved] == ["xyz_grid"] * 3                             # main + both Z grids
    result, run = plot(args(x=("Steps", "2, 3"), z=("Seed", "1, 2")))
    assert len(result.images) == 1 and len(run.saved) == 1
    result, _ = plot(args(x=("Steps", "2, 3"), include_sub_grids=True))
    assert len(result.images) == 2      # A1111 returns the one X/Y grid twice then


def test_grid_geometry_legend_and_margins():
    base = dict(x=("Steps", "2, 3, 4"), y=("Sampler", "", ["Euler", "Euler a"]))
    plain, _ = plot(args(**base, draw_legend=False, margin_size=10))
    assert plain.images[0].size == (3 * 64, 2 * 64)     # A1111 leaves margins to the legend drawing
    labelled, run = plot(args(**base, margin_size=10, include_lone_images=True))
    grid = labelled.images[0]
    pad_left = 64 * 3 // 4
    assert grid.width == pad_left + 3 * 64 + 2 * 10
    pad_top = grid.height - (2 * 64 + 10)
    assert pad_top > 0
    for n, cell in enumerate(labelled.images[1:]):
        col, row = n % 3, n // 3
        x, y = pad_left + (64 + 10) * col, pad_top + (64 + 10) * row
        assert np.array_equal(np.asarray(grid.crop((x, y, x + 64, y + 64))), np.asarray(cell))
    top_strip = np.asarray(grid.crop((pad_left, 0, grid.width, pad_top)))
    assert (top_strip < 128).any()                       # labels were drawn
    assert grid.getpixel((pad_left + 64 + 5, pad_top + 5)) == (255, 255, 255)   # margin is background


def test_batches_make_cell_grids_and_interrupt_stops():
    result, run = plot(args(x=("Steps", "2, 3"), include_lone_images=True), req=request(batch_size=2, n_iter=2))
    assert len(run.requests) == 2 and result.images[1].size == (128, 128)       # a cell is its batch's grid
    result, run = plot(args(x=("Steps", "2, 3, 4"), draw_legend=False, include_lone_images=True),
                       run=FakeRun(stop_after=1))
    assert len(run.requests) == 1 and result.interrupted
    assert result.images[0].size == (192, 64) and len(result.images) == 2
    assert colour(result.images[0], (100, 10)) == (0, 0, 0)                       # cells never made are black


def test_infotext_params_go_before_version():
    text = "p\nNegative prompt: n\nSteps: 2, Seed: 1, Version: v1"
    assert add_infotext_params(text, {"Script": "X/Y/Z plot", "X Values": "1,2"}) == \
        'p\nNegative prompt: n\nSteps: 2, Seed: 1, Script: X/Y/Z plot, X Values: "1,2", Version: v1'
    assert add_infotext_params("p\nSteps: 2, Seed: 1, CFG scale: 7", {"Script": "s"}).endswith("7, Script: s")


def test_args_and_labels():
    script_args = XyzPlot().args(FakeEnv(), "txt2img")
    assert [a.label for a in script_args][9:] == [
        "Draw legend", "Include Sub Images", "Include Sub Grids", "Keep -1 for seeds", "Vary seeds for X",
        "Vary seeds for Y", "Vary seeds for Z", "Grid margins (px)", "Use text inputs instead of dropdowns"]
    assert script_args[0].value == "Seed" and script_args[3].value == "Nothing"
    params = XyzPlot().parse(args(x=("CFG Scale", "7"), y=("Sampler", "", ["Euler a"]),
                                  z=("Checkpoint name", "", [CHECKPOINTS[1]])), request(), FakeEnv())
    assert params.x.labels() == ["CFG Scale: 7.0"] and params.y.labels() == ["Euler a"]
    assert params.z.labels() == [CHECKPOINTS[1]]          # A1111: the file name without its folder


def test_draw_grid_annotations_inactive_and_prompt_matrix():
    im = Image.new("RGB", (128, 128), (50, 50, 50))
    out = draw_grid_annotations(im, 64, 64, [[GridAnnotation("on")], [GridAnnotation("off", False)]],
                                [[GridAnnotation()], [GridAnnotation()]])
    assert out.width == 128 and out.height > 128                      # no row labels: no left strip
    matrix = draw_prompt_matrix(Image.new("RGB", (128, 128)), 64, 64, ["base", "a", "b"])
    assert matrix.width == 128 + 48 and matrix.height > 128
    with pytest.raises(ValueError, match="horizontal texts"):
        draw_grid_annotations(im, 64, 64, [[GridAnnotation("x")]], [[GridAnnotation()], [GridAnnotation()]])


def test_result_fields_align():
    result, run = plot(args(x=("Var. seed", "7, 8"), y=("Var. strength", "0.1, 0.2"), include_lone_images=True))
    assert len(result.subseeds) == len(result.images) == 5
    assert result.subseeds[1:] == [r.subseed for r in run.requests]


# --------------------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from studio.config import Flags
    from studio.core import Studio
    from studio.testing import make_checkpoint
    from tests.helpers import make_models_dir

    root = tmp_path_factory.mktemp("xyz")
    folder = make_models_dir(root)
    make_checkpoint(folder / "tiny-sd1b.safetensors", "sd1", seed=2)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    if not any(script.title == XyzPlot.title for script in s.engine.scripts.for_tab("txt2img")):
        s.engine.scripts.add(XyzPlot())
    yield s
    s.queue.shutdown()


def engine_request(**kw) -> Txt2ImgRequest:
    base = dict(prompt="a red cube", negative_prompt="blurry", steps=2, width=64, height=64, seed=1234,
                sampler_name="Euler", save_images=False,
                override_settings={"sd_model_checkpoint": "tiny-sd1.safetensors"})
    base.update(kw)
    return Txt2ImgRequest(**base)


def test_engine_cells_equal_single_generations(studio):
    result = studio.txt2img(engine_request(script_name="x/y/z plot", script_args=args(
        x=(4, "2, 3"), y=(9, "", ["Euler", "Euler a"]), include_lone_images=True)))
    assert len(result.images) == 5
    grid, *cells = result.images
    assert grid.size == (64 * 3 // 4 + 2 * 64, grid.height) and grid.height > 2 * 64
    for cell, (sampler, steps) in zip(cells, [("Euler", 2), ("Euler", 3), ("Euler a", 2), ("Euler a", 3)]):
        single = studio.txt2img(engine_request(steps=steps, sampler_name=sampler))
        assert np.array_equal(np.asarray(cell), np.asarray(single.images[0])), (sampler, steps)
    params = parse_infotext(result.infotexts[0])
    assert (params["Script"], params["X Type"], params["Y Type"]) == ("X/Y/Z plot", "Steps", "Sampler")
    assert parse_infotext(result.infotexts[4])["Sampler"] == "Euler a"
    assert result.paths and result.paths[0].name.startswith("xyz_grid-")           # grid_save is on by default


def test_engine_checkpoint_axis_loads_each_model_once(studio):
    studio.select_checkpoint("tiny-sd1b.safetensors")     # so both plotted models must be loaded
    before = studio.models.disk_loads
    titles = sorted(c.title for c in studio.models.checkpoints())
    result = studio.txt2img(engine_request(script_name="x/y/z plot", script_args=args(
        x=(11, "", titles), y=(4, "2, 3"), draw_legend=False, include_lone_images=True)))
    # X (the checkpoint) varies fastest in the grid, but its loop is outermost: 2 loads, not 4
    assert studio.models.disk_loads - before == 2
    assert len(result.images) == 5 and result.images[0].size == (128, 128)
    models = [parse_infotext(text)["Model"] for text in result.infotexts[1:]]
    assert models == ["tiny-sd1", "tiny-sd1b", "tiny-sd1", "tiny-sd1b"]
