"""The CLI and the built-in demo model.

One smoke test runs ``python -m studio`` in a subprocess, as a user runs it; the others call
``studio.cli.main`` in-process (the same code after the interpreter starts), which saves a Python
start and a torch import per command."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
from PIL import Image

from studio.cli import main
from studio.config import Flags
from studio.core import Studio
from studio.generation.infotext import parse_infotext
from studio.generation.request import Txt2ImgRequest
from tests.helpers import REPO, make_models_dir


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys):
    """``python -m studio ARGS`` in-process: exit status, stdout and stderr."""
    def run(*args: str) -> CliRun:
        capsys.readouterr()  # only this command's output
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors exit as they would in a shell
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return CliRun(code, captured.out, captured.err)
    return run


@pytest.mark.slow  # heavy (a server, a browser or a training run): the CI's slow step
def test_python_m_studio_generates_in_a_subprocess(tmp_path):
    """The one real subprocess: the package's __main__, the exit status and the files, as a user sees them."""
    make_models_dir(tmp_path)
    out = tmp_path / "cli-out"
    gen = subprocess.run(
        [sys.executable, "-m", "studio", "generate", "--data-dir", str(tmp_path), "-p", "a small boat, at sea",
         "--steps", "2", "--width", "64", "--height", "64", "--seed", "11", "--batch-size", "2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert gen.returncode == 0, gen.stderr
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-11.png", "00001-12.png"]
    assert gen.stdout.split() == [str(f) for f in files]
    info = parse_infotext(Image.open(files[1]).info["parameters"])
    assert info["Prompt"] == "a small boat, at sea" and info["Seed"] == "12"


def test_demo_model_offered_when_no_checkpoint(tmp_path):
    studio = Studio.create(Flags(data_dir=str(tmp_path)))
    items = studio.checkpoints()
    assert len(items) == 1 and items[0].is_demo
    model = studio.select_checkpoint(None)
    assert model.info.is_demo and model.family == "sd1"
    result = studio.txt2img(Txt2ImgRequest(prompt="anything", steps=2, width=64, height=64, seed=3))
    assert result.images[0].size == (64, 64)
    # once real checkpoints exist the demo is no longer offered
    make_models_dir(tmp_path)
    assert all(not c.is_demo for c in studio.refresh_checkpoints())


def test_cli_generate_models_and_pnginfo(tmp_path, run_cli):
    make_models_dir(tmp_path)
    listing = run_cli("models", "--data-dir", str(tmp_path))
    assert listing.returncode == 0 and "tiny-sd1.safetensors" in listing.stdout
    out = tmp_path / "cli-out"
    gen = run_cli("generate", "--data-dir", str(tmp_path), "-p", "a small boat, at sea", "--steps", "2",
                  "--width", "64", "--height", "64", "--seed", "11", "--batch-size", "2", "--out", str(out))
    assert gen.returncode == 0, gen.stderr
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-11.png", "00001-12.png"]
    info = parse_infotext(Image.open(files[1]).info["parameters"])
    assert info["Prompt"] == "a small boat, at sea" and info["Seed"] == "12"
    shown = run_cli("pnginfo", str(files[0]))
    assert shown.returncode == 0 and "Seed: 11," in shown.stdout


def test_cli_styles_and_embeddings(tmp_path, run_cli):
    from studio.testing.embeddings import random_vectors, write_a1111_pt

    make_models_dir(tmp_path)
    write_a1111_pt(tmp_path / "embeddings" / "clitoken.pt", random_vectors(1, 32, seed=2))
    (tmp_path / "styles.csv").write_text("name,prompt,negative_prompt\nsea,\"{prompt} by the sea\",fog\n")
    out = tmp_path / "o"
    gen = run_cli("generate", "--data-dir", str(tmp_path), "-p", "clitoken boat", "--style", "sea", "--steps", "2",
                  "--width", "64", "--height", "64", "--seed", "1", "--out", str(out))
    assert gen.returncode == 0, gen.stderr
    info = parse_infotext(Image.open(next(out.glob("*.png"))).info["parameters"])
    assert info["Prompt"] == "clitoken boat by the sea" and info["Negative prompt"] == "fog"
    assert info["TI hashes"].startswith("clitoken: ")


def test_cli_reports_bad_input(tmp_path, run_cli):
    make_models_dir(tmp_path)
    bad = run_cli("generate", "--data-dir", str(tmp_path), "-p", "x", "--sampler", "Nope")
    assert bad.returncode == 2 and "Valid samplers" in bad.stderr
    missing = run_cli("pnginfo", str(tmp_path / "none.png"))
    assert missing.returncode == 2 and "error" in missing.stderr


def test_cli_lora_hypernet_and_vae(tmp_path, run_cli):
    from studio.testing import make_vae, tiny_components
    from studio.testing.hypernetworks import tiny_widths, write_hypernetwork
    from studio.testing.loras import write_kohya_lora

    make_models_dir(tmp_path)
    write_kohya_lora(tmp_path / "models" / "Lora" / "clilora.safetensors", tiny_components("sd1", seed=1), "sd1")
    write_hypernetwork(tmp_path / "models" / "hypernetworks" / "clihn.pt", widths=tiny_widths("sd1"))
    make_vae(tmp_path / "models" / "VAE" / "clivae.safetensors", "sd1", seed=5)
    listing = run_cli("models", "--data-dir", str(tmp_path))
    assert listing.returncode == 0, listing.stderr
    for expected in ("# lora", "clilora\tsd1", "# hypernetworks", "clihn", "# vae", "clivae.safetensors"):
        assert expected in listing.stdout
    out = tmp_path / "o"
    gen = run_cli("generate", "--data-dir", str(tmp_path), "-p", "boat <lora:clilora:0.5> <hypernet:clihn:0.3>",
                  "--vae", "clivae.safetensors", "--steps", "2", "--width", "64", "--height", "64", "--out", str(out))
    assert gen.returncode == 0, gen.stderr
    info = parse_infotext(Image.open(next(out.glob("*.png"))).info["parameters"])
    assert info["Lora hashes"].startswith("clilora: ") and info["VAE"] == "clivae.safetensors"
    bad = run_cli("generate", "--data-dir", str(tmp_path), "-p", "x", "--vae", "nope.pt", "--steps", "1",
                  "--width", "64", "--height", "64")
    assert bad.returncode == 2 and "nope.pt" in bad.stderr


def test_cli_img2img_inpaint_hires_and_upscale(tmp_path, run_cli):
    import numpy as np

    make_models_dir(tmp_path)
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (16, 16, 48, 48))
    m.save(mask)
    out = tmp_path / "o"
    gen = run_cli("generate", "--data-dir", str(tmp_path), "-p", "a door", "--init-image", str(init), "--mask",
                  str(mask), "--mask-blur", "0", "--denoising-strength", "0.9", "--steps", "2", "--width", "64",
                  "--height", "64", "--out", str(out))
    assert gen.returncode == 0, gen.stderr
    result = Image.open(next(out.glob("*.png")))
    info = parse_infotext(result.info["parameters"])
    assert info["Denoising strength"] == "0.9" and info["Mask blur"] == "0"
    keep = np.asarray(m) == 0
    assert (np.asarray(result.convert("RGB"))[keep] == np.asarray(Image.open(init))[keep]).all()
    hr = tmp_path / "hr"
    gen = run_cli("generate", "--data-dir", str(tmp_path), "-p", "a door", "--hires", "--hr-scale", "1.5",
                  "--hr-upscaler", "Lanczos", "--steps", "2", "--width", "64", "--height", "64", "--out", str(hr))
    assert gen.returncode == 0, gen.stderr
    assert Image.open(next(hr.glob("*.png"))).size == (96, 96)
    ups = tmp_path / "ups"
    up = run_cli("upscale", "--data-dir", str(tmp_path), str(init), "--upscaler", "Nearest", "--scale", "2",
                 "--out", str(ups))
    assert up.returncode == 0, up.stderr
    assert Image.open(next(ups.glob("*.png"))).size == (128, 128)
    bad = run_cli("upscale", "--data-dir", str(tmp_path), str(init), "--upscaler", "Nope")
    assert bad.returncode == 2 and "Nope" in bad.stderr


def test_img2img_batch_folder(tmp_path):
    import numpy as np

    make_models_dir(tmp_path)
    folder_in, folder_out = tmp_path / "in", tmp_path / "out"
    folder_in.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            folder_in / f"{i}.png")
    (folder_in / "notes.txt").write_text("not an image")
    (folder_in / "broken.png").write_bytes(b"not a png")
    studio = Studio.create(Flags(data_dir=str(tmp_path), no_half=True))
    fields = dict(prompt="a field", steps=2, width=64, height=64, seed=1, denoising_strength=0.5)
    paths = studio.img2img_folder(fields, folder_in, folder_out)
    assert sorted(p.parent for p in paths) == [folder_out, folder_out] and len(paths) == 2
    assert "Denoising strength: 0.5" in Image.open(paths[0]).info["parameters"]
    import pytest

    from studio.generation.request import RequestError
    with pytest.raises(RequestError, match="does not exist"):
        studio.img2img_folder(fields, tmp_path / "missing", None)
    studio.queue.shutdown()
