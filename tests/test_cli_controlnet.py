"""ControlNet on the command line: generate --controlnet, detect, preprocessors, models --kind controlnet.

Runs ``studio.cli.main`` in-process (the same code path as ``python -m studio``) for speed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from studio.cli import main, parse_controlnet_spec
from studio.controlnet.units import UnitError
from studio.generation.infotext import parse_infotext
from studio.testing import tiny_components
from studio.testing.controlnets import make_controlnet
from tests.helpers import make_models_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clicn")
    make_models_dir(root)
    make_controlnet(root / "models" / "ControlNet" / "cn-a.safetensors", "sd1", seed=2,
                    components=tiny_components("sd1", seed=1))
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[16:48, 12:52] = 255
    Image.fromarray(arr).save(root / "control.png")
    return root


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def generate(capsys, data_dir, out, *extra: str) -> tuple[int, str, str]:
    return cli(capsys, "generate", "--data-dir", str(data_dir), "-p", "a house", "--steps", "2", "--width", "64",
               "--height", "64", "--seed", "5", "--sampler", "Euler", "--out", str(out), *extra)


def test_generate_with_a_unit_and_its_map(capsys, data_dir, tmp_path):
    spec = f"model=cn-a,module=canny,image={data_dir / 'control.png'},weight=0.8,control_mode=2," \
           "resize_mode=Just Resize,processor_res=64"
    code, out, err = generate(capsys, data_dir, tmp_path / "cn", "--controlnet", spec, "--save-detected-maps")
    assert code == 0, err
    printed = out.split()
    image_path, map_path = tmp_path / "cn" / "00000-5.png", tmp_path / "cn" / "00000-5-controlnet-0.png"
    assert printed == [str(image_path), str(map_path)]
    params = parse_infotext(Image.open(image_path).info["parameters"])
    assert params["ControlNet 0"].startswith('Module: canny, Model: cn-a [')
    assert "Weight: 0.8, Resize Mode: Just Resize, Processor Res: 64" in params["ControlNet 0"]
    assert params["ControlNet 0"].endswith("Control Mode: ControlNet is more important")
    detected = Image.open(map_path)
    assert detected.size == (64, 64) and set(np.unique(np.asarray(detected))) == {0, 255}

    code, out, err = generate(capsys, data_dir, tmp_path / "plain")
    assert code == 0, err
    plain = Image.open(tmp_path / "plain" / "00000-5.png")
    assert "ControlNet 0" not in plain.info["parameters"]
    diff = np.abs(np.asarray(plain, np.int16) - np.asarray(Image.open(image_path), np.int16))
    assert diff.max() > 0


def test_unit_reuses_the_init_image(capsys, data_dir, tmp_path):
    code, out, err = generate(capsys, data_dir, tmp_path, "--init-image", str(data_dir / "control.png"),
                              "--controlnet", "model=cn-a,module=invert")
    assert code == 0, err
    assert "ControlNet 0" in parse_infotext(Image.open(out.split()[0]).info["parameters"])


@pytest.mark.parametrize("spec, message", [
    ("model=cn-a,module=canny,wieght=0.5", "unknown key 'wieght' in --controlnet; valid keys: model, module"),
    ("model=cn-a,weight=0.5,weight=1", "'weight' is given twice"),
    ("cn-a", "expected key=value"),
    ("model=cn-a,pixel_perfect=ture", "pixel_perfect must be true or false"),
    ("model=cn-a,control_mode=loud", "control_mode must be one of"),
    ("model=cn-a,weight=heavy", "weight must be a number"),
])
def test_bad_specs_are_refused_before_anything_runs(capsys, data_dir, tmp_path, spec, message):
    code, out, err = generate(capsys, data_dir, tmp_path, "--controlnet", spec)
    assert code == 2 and out == ""
    assert f"error: ControlNet unit 0: {message}" in err
    assert not tmp_path.joinpath("00000-5.png").exists()


def test_missing_image_file_and_unknown_model(capsys, data_dir, tmp_path):
    missing = tmp_path / "nowhere" / "edges.png"
    code, out, err = generate(capsys, data_dir, tmp_path / "o", "--controlnet", "model=cn-a,module=canny",
                              "--controlnet", f"model=cn-a,module=canny,image={missing}")
    assert code == 2 and f"ControlNet unit 1: image file not found: {missing}" in err
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    code, out, err = generate(capsys, data_dir, tmp_path / "o", "--controlnet", f"model=cn-a,image={not_image}")
    assert code == 2 and str(not_image) in err and "not a readable image" in err
    code, out, err = generate(capsys, data_dir, tmp_path / "o", "--controlnet",
                              f"model=nope,module=canny,image={data_dir / 'control.png'}")
    assert code == 2 and "error: ControlNet unit 0: model 'nope' not found. Available: cn-a [" in err
    # txt2img without an image: the engine's message
    code, out, err = generate(capsys, data_dir, tmp_path / "o", "--controlnet", "model=cn-a,module=canny")
    assert code == 2 and "no control image" in err
    assert not (tmp_path / "o").exists()


def test_spec_parsing_keeps_commas_in_paths_and_takes_enum_indices(tmp_path):
    odd = tmp_path / "a,b.png"
    Image.new("RGB", (8, 8)).save(odd)
    unit = parse_controlnet_spec(f"image={odd}, module = canny ,resize_mode=0,hr_option=Low res only,"
                                 "guidance_end=0.5,pixel_perfect=yes,enabled=false", 0)
    assert unit.image.size == (8, 8) and unit.module == "canny" and unit.resize_mode == "Just Resize"
    assert unit.hr_option == "Low res only" and unit.guidance_end == 0.5 and unit.pixel_perfect
    assert not unit.enabled and unit.model == "None"
    notes: list[str] = []
    assert parse_controlnet_spec("guidance=0.3", 2, notes).guidance_end == 0.3 and notes
    with pytest.raises(UnitError, match="ControlNet unit 2: resize_mode must be one of"):
        parse_controlnet_spec("resize_mode=7", 2)


def test_detect_preprocessors_and_models(capsys, data_dir, tmp_path):
    control = data_dir / "control.png"
    code, out, err = cli(capsys, "detect", "--data-dir", str(data_dir), "--module", "canny", "--processor-res",
                         "64", "--threshold-a", "50", "--out", str(tmp_path / "maps"), str(control))
    assert code == 0, err
    assert out.split() == [str(tmp_path / "maps" / "control-canny.png")]
    edges = Image.open(tmp_path / "maps" / "control-canny.png")
    assert edges.size == (64, 64) and set(np.unique(np.asarray(edges))) == {0, 255}

    code, out, err = cli(capsys, "detect", "--data-dir", str(data_dir), "--module", "sobel", str(control))
    assert code == 2 and "unknown preprocessor 'sobel'" in err
    code, out, err = cli(capsys, "detect", "--data-dir", str(data_dir), "--module", "invert",
                         "--out", str(tmp_path / "m2"), str(tmp_path / "missing.png"), str(control))
    assert code == 2 and "missing.png" in err and out.split() == [str(tmp_path / "m2" / "control-invert.png")]

    code, out, err = cli(capsys, "preprocessors", "--data-dir", str(data_dir))
    assert code == 0, err
    lines = {line.split("\t")[0]: line for line in out.splitlines()}
    assert "Low Threshold 1-255 (default 100)" in lines["canny"] and "no weights needed" in lines["canny"]
    assert "needs ControlNetHED.pth" in lines["softedge_hed"] and "missing" in lines["softedge_hed"]

    code, out, err = cli(capsys, "models", "--data-dir", str(data_dir), "--kind", "controlnet")
    assert code == 0 and out.startswith("cn-a [") and "cn-a.safetensors" in out
    code, out, err = cli(capsys, "models", "--data-dir", str(data_dir))
    assert code == 0 and "# controlnet\ncn-a [" in out


def test_controlnet_dir_flag(capsys, data_dir, tmp_path):
    make_controlnet(tmp_path / "elsewhere" / "cn-b.safetensors", "sd1", seed=4,
                    components=tiny_components("sd1", seed=1))
    code, out, err = cli(capsys, "models", "--data-dir", str(data_dir), "--kind", "controlnet",
                         "--controlnet-dir", str(tmp_path / "elsewhere"))
    assert code == 0 and "cn-b [" in out


def test_model_free_and_masked_units_from_the_command_line(capsys, data_dir, tmp_path):
    """reference_only needs no model; an inpaint unit takes mask=FILE (white = generate)."""
    image = data_dir / "control.png"
    code, _, err = generate(capsys, data_dir, tmp_path / "ref", "--controlnet", f"module=reference_only,image={image}")
    assert code == 0, err
    params = parse_infotext(Image.open(tmp_path / "ref" / "00000-5.png").info["parameters"])
    assert params["ControlNet 0"].startswith("Module: reference_only, Model: None")
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 20:44] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    spec = f"model=cn-a,module=inpaint_only,image={image},mask={tmp_path / 'mask.png'}"
    code, _, err = generate(capsys, data_dir, tmp_path / "inp", "--controlnet", spec)
    assert code == 0, err
    out = np.asarray(Image.open(tmp_path / "inp" / "00000-5.png"), np.int16)
    assert np.array_equal(out[:8], np.asarray(Image.open(image).convert("RGB"), np.int16)[:8])
    code, _, err = generate(capsys, data_dir, tmp_path / "bad", "--controlnet", f"model=cn-a,module=inpaint_only,"
                                                                                f"image={image}")
    assert code != 0 and "needs a mask" in err
