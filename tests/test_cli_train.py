"""Training on the command line: dataset, create-embedding, create-hypernetwork, train lora / embedding /
hypernetwork. Runs ``studio.cli.main`` in-process (the same code path as ``python -m studio``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import studio.cli as cli_module
from studio.cli import build_parser, main, training_request
from studio.training.base import TEMPLATE_NAMES
from studio.training.dataset import DEFAULT_TEMPLATES
from tests.helpers import make_models_dir

TINY = ("--resolution", "64", "--min-bucket", "64", "--max-bucket", "128", "--mixed-precision", "no")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clitrain")
    make_models_dir(root)
    data = root / "dataset"
    data.mkdir()
    for i, color in enumerate(((220, 200, 40), (40, 200, 220))):
        Image.new("RGB", (96, 96), color).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a square, color {i}", encoding="utf-8")
    Image.new("RGB", (128, 64), (90, 90, 90)).save(data / "00003-a_grey_band.png")
    return root


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_template_names_match_the_engine():
    assert TEMPLATE_NAMES == tuple(DEFAULT_TEMPLATES)


def test_dataset_lists_buckets_and_captions(capsys, root):
    code, out, err = cli(capsys, "dataset", str(root / "dataset"), "--resolution", "96", "--min-bucket", "64",
                         "--max-bucket", "128")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("3 images; 3 steps per epoch at batch size 1; 2 buckets: 64x64 (2), 128x64 (1).")
    assert "1 image had no caption file (.txt)" in lines[0]
    assert lines[1:] == [
        "00003-a_grey_band.png\t128x64 -> 128x64\tx1\ta grey band  [caption from the file name]",
        "img0.png\t96x96 -> 64x64\tx1\ta square, color 0",
        "img1.png\t96x96 -> 64x64\tx1\ta square, color 1",
    ]
    code, out, err = cli(capsys, "dataset", str(root / "dataset"), "--no-bucket", "--resolution", "64",
                         "--limit", "1")
    assert code == 0 and "no bucketing: every image is cropped to 64x64" in out
    assert len(out.splitlines()) == 2 and "and 2 more" in err


def test_dataset_errors(capsys, root):
    code, out, err = cli(capsys, "dataset", str(root / "nowhere"))
    assert code == 2 and out == "" and err.startswith("error: the dataset folder") and "does not exist" in err
    code, out, err = cli(capsys, "dataset", str(root / "dataset"), "--resolution", "64", "--min-bucket", "128")
    assert code == 2 and "min_bucket_reso (128) is above the resolution (64)" in err


def test_create_embedding(capsys, root):
    code, out, err = cli(capsys, "create-embedding", "cli_emb", "--init-text", "a photo", "--vectors", "3",
                         "--data-dir", str(root))
    assert code == 0, err
    path = Path(out.strip())
    assert path == root / "embeddings" / "cli_emb.pt" and path.is_file()
    code, out, err = cli(capsys, "create-embedding", "cli_emb", "--data-dir", str(root))
    assert code == 2 and err.startswith("error: ") and "already exists" in err
    assert cli(capsys, "create-embedding", "cli_emb", "--overwrite", "--data-dir", str(root))[0] == 0


def test_create_hypernetwork(capsys, root):
    code, out, err = cli(capsys, "create-hypernetwork", "cli_hn", "--sizes", "768, 320", "--activation", "relu",
                         "--layer-structure", "1, 1.5, 1", "--data-dir", str(root))
    assert code == 0, err
    assert Path(out.strip()) == root / "models" / "hypernetworks" / "cli_hn.pt" and Path(out.strip()).is_file()
    code, out, err = cli(capsys, "create-hypernetwork", "cli_hn2", "--sizes", "768,big", "--data-dir", str(root))
    assert code == 2 and "module size 'big' is not a whole number" in err


def test_train_lora(capsys, root):
    args = ("train", "lora", "--data-dir", str(root), "--data", str(root / "dataset"), "--name", "cli_lora",
            "--steps", "4", "--rank", "2", "--alpha", "1", *TINY)
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    lines = out.splitlines()
    path = root / "models" / "Lora" / "cli_lora.safetensors"
    assert lines[0] == str(path) and path.is_file()
    assert lines[1].startswith("step 4, loss ") and " -> " in lines[1]
    assert "train lora cli_lora: step 4/4, loss" in err and "note: 1 image had no caption file" in err
    # the same run again: the resume state says it is done
    code, out, err = cli(capsys, *args)
    assert code == 2 and "error: already trained for 4 steps" in err
    # without resume an existing name needs --overwrite
    code, out, err = cli(capsys, *args, "--no-resume")
    assert code == 2 and "error: a LoRA named 'cli_lora' already exists" in err and out == ""


def test_ctrl_c_interrupts_and_saves(capsys, root, monkeypatch):
    progress_line = cli_module._progress_line
    pressed = []

    def press_ctrl_c_after_a_step(state, label):
        if state.step >= 1 and not pressed:
            pressed.append(state.step)
            raise KeyboardInterrupt
        return progress_line(state, label)

    monkeypatch.setattr(cli_module, "_progress_line", press_ctrl_c_after_a_step)
    code, out, err = cli(capsys, "train", "lora", "--data-dir", str(root), "--data", str(root / "dataset"),
                         "--name", "cli_stopped", "--steps", "500", "--rank", "2", *TINY)
    assert code == 130, err
    assert pressed and "interrupting: saving what was learned" in err and "note: Interrupted at step" in err
    path = root / "models" / "Lora" / "cli_stopped.safetensors"
    assert out.splitlines()[0] == str(path) and path.is_file()
    step = int(out.splitlines()[1].split(",")[0].split()[1])
    assert 1 <= step < 500


@pytest.mark.parametrize("args, message", [
    (("lora", "--data", "{root}/missing", "--name", "x"), "the dataset folder"),
    # the schema's words, as the API's 422 says them
    (("lora", "--data", "{root}/dataset", "--name", "x", "--rank", "0"),
     "rank: Input should be greater than or equal to 1 (got 0)"),
    (("lora", "--data", "{root}/dataset", "--name", "x", "--scheduler", "often"),
     "lr_scheduler: Input should be 'constant', 'constant_with_warmup', 'cosine' or 'linear'"),
    (("lora", "--data", "{root}/dataset", "--name", "x", "--steps", "10", "--warmup", "20"),
     "lr_warmup_steps: must be at most steps (10)"),
    (("lora", "--data", "{root}/dataset", "--name", "../x"), "not a valid file name"),
    (("embedding", "--data", "{root}/dataset", "--name", "no_such_emb"), "no embedding named 'no_such_emb'"),
    (("hypernetwork", "--data", "{root}/dataset", "--name", "no_such_hn"), "no hypernetwork named 'no_such_hn'"),
    (("embedding", "--data", "{root}/dataset", "--name", "x", "--template", "fancy"), "unknown template 'fancy'"),
])
def test_bad_training_requests(capsys, root, args, message):
    args = tuple(a.replace("{root}", str(root)) for a in args)
    code, out, err = cli(capsys, "train", *args, "--data-dir", str(root), *TINY)
    assert code == 2 and out == "" and err.startswith("error: ") and message in err, err


def test_embedding_and_hypernetwork_requests(tmp_path):
    template = tmp_path / "t.txt"
    template.write_text("a [name] thing, [filewords]\n", encoding="utf-8")
    ns = build_parser().parse_args(["train", "embedding", "--data", "d", "--name", "e", "--lr", "0.005:10, 1e-4",
                                    "--template", str(template), "--steps", "20", "--shuffle-tags", "--no-resume"])
    req = training_request(ns)
    assert req.kind == "embedding" and req.learn_rate == "0.005:10, 1e-4"
    assert req.settings.template == "a [name] thing, [filewords]\n" and req.settings.steps == 20
    assert req.settings.shuffle_caption and not req.settings.resume
    ns = build_parser().parse_args(["train", "hypernetwork", "--data", "d", "--name", "h"])
    req = training_request(ns)
    assert req.learn_rate == "0.00001" and req.settings.template == "\n".join(DEFAULT_TEMPLATES["style_filewords"])
    ns = build_parser().parse_args(["train", "lora", "--data", "d", "--name", "l", "--text-encoder-only",
                                    "--te-lr", "5e-5", "--conv-rank", "4", "--grad-accum", "2", "--no-bucket"])
    req = training_request(ns)
    assert not req.lora.train_unet and req.lora.train_text_encoder and req.lora.text_encoder_lr == 5e-5
    assert req.lora.conv_rank == 4 and req.settings.gradient_accumulation == 2 and not req.settings.enable_bucket
