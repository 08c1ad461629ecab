"""External VAE files: the catalog, A1111's selection rules, reading every layout, and
swapping weights into a model loaded through the real loader."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from studio.devices import resolve_policy
from studio.models.catalog import CheckpointInfo, HashCache
from studio.models.ldm_keys import vae_to_ldm
from studio.models.loader import load_checkpoint
from studio.models.state_dict import ModelFileError
from studio.models.vae import (
    VaeCatalog,
    VaeInfo,
    VaeNotFoundError,
    VaeSwapper,
    is_diffusers_vae,
    read_vae_state_dict,
)
from studio.testing import make_checkpoint, make_vae, tiny_components
from studio.testing.factory import vae_config

POLICY = resolve_policy(device="cpu", no_half=True)


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _catalog(root: Path) -> VaeCatalog:
    cat = VaeCatalog(root / "models" / "VAE", (root / "models" / "Stable-diffusion",),
                     HashCache(root / "cache.json"))
    cat.refresh()
    return cat


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


# --------------------------------------------------------------------------- catalog


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    vae_dir = tmp_path / "models" / "VAE"
    ckpt_dir = tmp_path / "models" / "Stable-diffusion"
    _touch(vae_dir / "kl-f8-anime.safetensors")
    _touch(vae_dir / "sub" / "orange.pt")
    _touch(vae_dir / "vae10.ckpt")
    _touch(vae_dir / "vae2.ckpt")
    _touch(vae_dir / "readme.txt")
    _touch(vae_dir / ".cache" / "hidden.safetensors")
    _touch(ckpt_dir / "model.safetensors")
    _touch(ckpt_dir / "deep" / "er" / "other.vae.safetensors")
    _touch(ckpt_dir / "plain.pt")  # beside checkpoints only *.vae.* files count
    return tmp_path


def test_scan_both_locations(tree: Path) -> None:
    cat = _catalog(tree)
    by_name = {v.name: v for v in cat.items()}
    assert set(by_name) == {
        "kl-f8-anime.safetensors", "sub/orange.pt", "vae10.ckpt", "vae2.ckpt", "other.vae.safetensors",
    }
    assert by_name["other.vae.safetensors"].path == tree / "models/Stable-diffusion/deep/er/other.vae.safetensors"
    assert cat.choices()[:2] == ["Automatic", "None"]
    assert sorted(cat.choices()[2:]) == sorted(by_name)
    assert cat.names().index("vae2.ckpt") < cat.names().index("vae10.ckpt")  # natural order, as A1111
    assert cat.find("orange.pt") is by_name["sub/orange.pt"]  # A1111 infotexts carry the bare file name
    assert cat.find("kl-f8-anime") is by_name["kl-f8-anime.safetensors"]
    assert cat.find("nope.pt") is None


def test_scan_refresh_and_missing_dirs(tmp_path: Path) -> None:
    cat = VaeCatalog(tmp_path / "none", (tmp_path / "nothing",))
    assert cat.refresh() == [] and cat.choices() == ["Automatic", "None"]
    _touch(tmp_path / "none" / "late.safetensors")
    assert [v.name for v in cat.refresh()] == ["late.safetensors"]


def test_same_file_name_in_two_places_stays_apart(tmp_path: Path) -> None:
    _touch(tmp_path / "models/VAE/x.vae.pt")
    _touch(tmp_path / "models/Stable-diffusion/a/x.vae.pt")
    names = _catalog(tmp_path).names()
    assert sorted(names) == ["a/x.vae.pt", "x.vae.pt"]


def test_resolve_rules(tree: Path) -> None:
    ckpt_dir = tree / "models" / "Stable-diffusion"
    cat = _catalog(tree)
    model = ckpt_dir / "model.safetensors"
    assert cat.resolve("None", model) is None
    assert cat.resolve("", model) is None
    assert cat.resolve(None, model) is None
    # Automatic with nothing matching the stem: the baked VAE
    assert cat.resolve("Automatic", model) is None

    # a prefix match in models/VAE
    _touch(tree / "models/VAE/model-fixed.safetensors")
    cat.refresh()
    found = cat.resolve("Automatic", model)
    assert found is not None and found.name == "model-fixed.safetensors"
    assert cat.resolve("auto", model) is found

    # <stem>.vae.<ext> beside the checkpoint wins over the prefix match
    _touch(ckpt_dir / "model.vae.pt")
    cat.refresh()
    found = cat.resolve("Automatic", model)
    assert found is not None and found.path == ckpt_dir / "model.vae.pt"

    # ... even for a checkpoint outside the scanned folders
    outside = tree / "elsewhere" / "solo.ckpt"
    _touch(outside)
    _touch(outside.parent / "solo.vae.safetensors")
    found = cat.resolve("Automatic", outside)
    assert found is not None and found.path == outside.parent / "solo.vae.safetensors"
    assert cat.resolve("Automatic", None) is None

    assert cat.resolve("kl-f8-anime.safetensors", model).name == "kl-f8-anime.safetensors"
    assert cat.resolve("sub/orange.pt", None).path == tree / "models/VAE/sub/orange.pt"
    with pytest.raises(VaeNotFoundError) as err:
        cat.resolve("missing.safetensors", model)
    assert "missing.safetensors" in str(err.value) and "kl-f8-anime.safetensors" in str(err.value)
    assert "kl-f8-anime.safetensors" in err.value.available


def test_hash_and_api_dict(tmp_path: Path) -> None:
    path = _touch(tmp_path / "models/VAE/h.safetensors", b"some vae bytes")
    cat = _catalog(tmp_path)
    (info,) = cat.items()
    digest = hashlib.sha256(b"some vae bytes").hexdigest()
    assert info.sha256 == digest and info.shorthash == digest[:10]
    cached = json.loads((tmp_path / "cache.json").read_text())["hashes"]["vae/h.safetensors"]
    assert cached["sha256"] == digest
    assert info.api_dict() == {"model_name": "h.safetensors", "filename": str(path)}
    assert cat.find(digest[:10]) is info
    assert VaeInfo(path=path, name="h.safetensors").shorthash == digest[:10]  # no cache given


# --------------------------------------------------------------------------- reading files


def test_read_layouts(tmp_path: Path) -> None:
    comps = tiny_components("sd1", seed=7)
    bare = read_vae_state_dict(make_vae(tmp_path / "a.vae.safetensors", "sd1", components=comps))
    assert "encoder.down.0.block.0.conv1.weight" in bare and not is_diffusers_vae(bare)
    assert not any(k.startswith(("model_ema.", "loss.")) for k in bare)

    prefixed = tmp_path / "p.safetensors"
    save_file({"first_stage_model." + k: v for k, v in bare.items()}
              | {"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(prefixed))
    _assert_same(read_vae_state_dict(prefixed), bare)

    diffusers = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(comps["vae"].state_dict(), str(diffusers))
    sd = read_vae_state_dict(diffusers)
    assert is_diffusers_vae(sd) and "encoder.down_blocks.0.resnets.0.conv1.weight" in sd

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    with pytest.raises(ModelFileError, match="not a VAE.*LoRA"):
        read_vae_state_dict(lora)


# --------------------------------------------------------------------------- swapping


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("vae_sd1")
    ckpt = make_checkpoint(root / "tiny.safetensors", "sd1", seed=1)
    info = CheckpointInfo(path=ckpt, name=ckpt.name)
    return root, info, load_checkpoint(info, POLICY, root / "configs")


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory):
    """VAE files of seed 7 in the three layouts, and the weights they must produce."""
    root = tmp_path_factory.mktemp("vae_files")
    comps = tiny_components("sd1", seed=7)
    diffusers_file = root / "diffusers" / "diffusion_pytorch_model.safetensors"
    diffusers_file.parent.mkdir()
    save_file(comps["vae"].state_dict(), str(diffusers_file))
    files = {
        "safetensors": make_vae(root / "seven.vae.safetensors", "sd1", seed=7),
        "pt": make_vae(root / "seven.vae.pt", "sd1", seed=7),
        "diffusers": diffusers_file,
    }
    return files, _weights(comps["vae"])


def _info(path: Path) -> VaeInfo:
    return VaeInfo(path=path, name=path.name)


def test_swap_and_restore(sd1, external, tmp_path: Path) -> None:
    root, ckpt_info, model = sd1
    files, expected = external
    baked = _weights(model.vae)
    swapper = VaeSwapper(model.vae)
    assert swapper.current is None and swapper.apply(None) is False

    for kind in ("safetensors", "pt", "diffusers"):
        info = _info(files[kind])
        assert swapper.apply(info) is True, kind
        _assert_same(_weights(model.vae), expected)
        assert swapper.current is info
        assert next(model.vae.parameters()).dtype == torch.float32
        assert swapper.apply(info) is False  # same file again: nothing to do
        assert swapper.apply(None) is True
        assert swapper.current is None
        _assert_same(_weights(model.vae), baked)

    # a fresh load of the checkpoint has exactly the restored weights
    fresh = load_checkpoint(ckpt_info, POLICY, root / "configs")
    _assert_same(_weights(model.vae), _weights(fresh.vae))

    # switching straight from one external file to another
    swapper.apply(_info(files["pt"]))
    assert swapper.apply(_info(files["diffusers"])) is True
    _assert_same(_weights(model.vae), expected)
    swapper.apply(None)


def test_wrong_files_leave_vae_unchanged(sd1, external, tmp_path: Path) -> None:
    _, _, model = sd1
    files, _ = external
    swapper = VaeSwapper(model.vae)
    swapper.apply(_info(files["safetensors"]))
    before = _weights(model.vae)

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 4)}, str(lora))
    with pytest.raises(ModelFileError):
        swapper.apply(_info(lora))

    # a real VAE of other widths, in the LDM layout (through the converter) and in diffusers'
    other = AutoencoderKL(**(vae_config("sd1") | {"block_out_channels": (32, 32, 64, 128)}))
    wrong = tmp_path / "wrong.vae.safetensors"
    save_file(vae_to_ldm(other.state_dict(), 4), str(wrong))
    with pytest.raises(ModelFileError, match="does not fit.*another shape"):
        swapper.apply(_info(wrong))
    wrong_diffusers = tmp_path / "wrong" / "diffusion_pytorch_model.safetensors"
    wrong_diffusers.parent.mkdir()
    save_file(other.state_dict(), str(wrong_diffusers))
    with pytest.raises(ModelFileError, match="does not fit"):
        swapper.apply(_info(wrong_diffusers))

    unet_only = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(unet_only))
    with pytest.raises(ModelFileError, match="not a VAE"):
        swapper.apply(_info(unet_only))

    _assert_same(_weights(model.vae), before)
    assert swapper.current.path == files["safetensors"]
    swapper.apply(None)


def test_parsed_cache_is_small(sd1, external) -> None:
    _, _, model = sd1
    files, _ = external
    swapper = VaeSwapper(model.vae)
    for kind in ("safetensors", "pt", "diffusers"):
        swapper.apply(_info(files[kind]))
    assert len(swapper._parsed) <= 2
    swapper.apply(None)


def test_sdxl(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "xl.safetensors", "sdxl", seed=1)
    model = load_checkpoint(CheckpointInfo(path=ckpt, name=ckpt.name), POLICY, tmp_path / "configs")
    comps = tiny_components("sdxl", seed=7)
    vae_file = make_vae(tmp_path / "xl.vae.safetensors", "sdxl", components=comps)
    baked = _weights(model.vae)

    cat = VaeCatalog(tmp_path / "VAE", (tmp_path,))
    cat.refresh()
    info = cat.resolve("Automatic", ckpt)
    assert info is not None and info.path == vae_file

    swapper = VaeSwapper(model.vae)
    assert swapper.apply(info) is True
    _assert_same(_weights(model.vae), _weights(comps["vae"]))
    with torch.no_grad():
        out = model.vae.decode(torch.zeros(1, 4, 8, 8)).sample
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    assert swapper.apply(None) is True
    _assert_same(_weights(model.vae), baked)
