"""The shipped T5-XXL and Qwen3 tokenizers: the hub's ids, padding, round trips, the chat template
the Qwen pipelines apply, no network while loading, and files that match their README."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import socket
from pathlib import Path

import pytest

from studio.models import bundled_tokenizers
from studio.models.bundled_tokenizers import TOKENIZERS_DIR, qwen3_tokenizer, t5_tokenizer

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def t5():
    return t5_tokenizer()


@pytest.fixture(scope="module")
def qwen():
    return qwen3_tokenizer()


def test_t5_reference_ids(t5):
    # google/t5-v1_1-xxl: "▁" "a" "▁photo" "▁of" "▁" "a" "▁cat" then </s>
    assert t5(PROMPT).input_ids == [3, 9, 1202, 13, 3, 9, 1712, 1]
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5.model_max_length == 512
    assert len(t5) == 32100


def test_qwen3_reference_ids(qwen):
    assert qwen(PROMPT).input_ids == [64, 6548, 315, 264, 8251]  # plain text gets no special token
    assert qwen.pad_token == "<|endoftext|>" and qwen.pad_token_id == 151643
    assert qwen.eos_token == "<|im_end|>" and qwen.eos_token_id == 151645
    assert qwen.bos_token is None
    assert qwen.model_max_length == 131072
    assert len(qwen) == 151669


@pytest.mark.parametrize("text", ["A photo of a cat, 3 dogs; (masterpiece:1.2) at 50% scale.", "a"])
def test_t5_round_trip(t5, text):
    assert t5.decode(t5(text).input_ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("text", [
    PROMPT, "猫と犬 🐱🐶\n  two spaces, tabs\tand ünïcödé", "<think> is plain here",
])
def test_qwen3_round_trip(qwen, text):
    assert qwen.decode(qwen(text).input_ids, skip_special_tokens=False) == text


def test_qwen3_special_tokens_are_single_ids_and_skippable(qwen):
    ids = qwen("<|im_start|>user\na cat<|im_end|>").input_ids
    assert ids[0] == qwen.convert_tokens_to_ids("<|im_start|>") and ids[-1] == qwen.eos_token_id
    assert qwen.decode(ids, skip_special_tokens=True) == "user\na cat"


@pytest.mark.parametrize("name", ["t5", "qwen"])
def test_padding_to_a_length(request, name):
    tokenizer = request.getfixturevalue(name)
    short = tokenizer(PROMPT).input_ids
    batch = tokenizer([PROMPT, "cat"], padding="max_length", max_length=16, truncation=True)
    assert [len(ids) for ids in batch.input_ids] == [16, 16]
    assert batch.input_ids[0] == short + [tokenizer.pad_token_id] * (16 - len(short))
    assert sum(batch.attention_mask[0]) == len(short)
    assert batch.attention_mask[0] == [1] * len(short) + [0] * (16 - len(short))


def test_t5_truncation_keeps_the_closing_eos(t5):
    ids = t5("one two three four five six seven eight", max_length=4, truncation=True).input_ids
    assert len(ids) == 4 and ids[-1] == t5.eos_token_id


@pytest.mark.parametrize(("thinking", "tail"), [
    (True, "<|im_start|>assistant\n"),                         # Z-Image
    (False, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),  # FLUX.2 Klein
])
def test_qwen3_chat_template_as_the_pipelines_apply_it(qwen, thinking, tail):
    text = qwen.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                    add_generation_prompt=True, enable_thinking=thinking)
    assert text == "<|im_start|>user\na cat<|im_end|>\n" + tail


def test_each_call_builds_its_own_tokenizer():
    first, second = t5_tokenizer(), t5_tokenizer()
    first(PROMPT, padding="max_length", max_length=12)  # a fast tokenizer sets padding on its backend
    first.padding_side = "left"
    assert first.backend_tokenizer is not second.backend_tokenizer
    assert second.padding_side == "right"
    assert second(PROMPT).input_ids == [3, 9, 1202, 13, 3, 9, 1712, 1]
    shared = bundled_tokenizers._parsed_tokenizer(bundled_tokenizers.T5_TOKENIZER_FILE)
    assert shared.padding is None and shared.truncation is None


def test_loading_opens_no_network_connection(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # no reliance on the studio's offline switch
    # Cleared caches: the files are read and parsed while sockets are blocked.
    bundled_tokenizers._parsed_tokenizer.cache_clear()
    bundled_tokenizers._shipped_text.cache_clear()
    assert t5_tokenizer()(PROMPT).input_ids[-1] == 1
    assert qwen3_tokenizer()(PROMPT).input_ids == [64, 6548, 315, 264, 8251]


def readme_hashes() -> dict[str, tuple[int, str]]:
    """``| `path` | bytes | `sha256` |`` rows of the README beside the shipped files."""
    text = (TOKENIZERS_DIR / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([^`]+)` \| ([\d,]+) \| `([0-9a-f]{64})` \|", text, re.MULTILINE)
    return {path: (int(size.replace(",", "")), digest) for path, size, digest in rows}


def shipped_files() -> list[Path]:
    return sorted(p for p in TOKENIZERS_DIR.rglob("*") if p.is_file() and p.name != "README.md")


def test_shipped_files_match_the_readme():
    listed = readme_hashes()
    shipped = {p.relative_to(TOKENIZERS_DIR).as_posix(): p for p in shipped_files()}
    assert sorted(listed) == sorted(shipped)
    for relative, path in shipped.items():
        data = path.read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == listed[relative], relative


def test_package_data_includes_the_shipped_files():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the studio also runs on 3.10
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["studio.models"]
    package_dir = REPO / "studio" / "models"
    included = {path for pattern in patterns for path in package_dir.glob(pattern)}
    wanted = [*shipped_files(), TOKENIZERS_DIR / "README.md"]
    missing = [p.relative_to(package_dir).as_posix() for p in wanted if p not in included]
    assert not missing


def load_derivation_tool():
    path = REPO / "tools" / "derive_tokenizers.py"
    spec = importlib.util.spec_from_file_location("derive_tokenizers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_derivation_decodes_a_c_byte_array():
    tool = load_derivation_tool()
    source = (
        "static const unsigned char other[] = {0x00};\n"
        "static const unsigned char doc[] = {\n"
        + "".join(f"    0x{byte:02x},\n" for byte in b'{"a": 1}')
        + "};\n"
    )
    assert tool.decode_c_byte_array(source, "doc") == b'{"a": 1}'
    assert tool.compact_json(b'{\n  "b": [1, 2],\n  "a": "\xc3\xa9"\n}') == '{"b":[1,2],"a":"é"}'.encode()
    with pytest.raises(ValueError):
        tool.decode_c_byte_array("static const unsigned char doc[] = {0x7b, 123};", "doc")
