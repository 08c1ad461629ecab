"""LoRA-family files merged into loaded tiny models: every format, exactness, restore, skips, the library.

Expected updates are computed here from the files' raw tensors with this file's own formulas and
name maps (never through studio.networks.lora_formats / lora_keys), then compared with what the
patcher wrote into the real loaded model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from studio.devices import resolve_policy
from studio.models.catalog import CheckpointInfo, HashCache
from studio.models.ldm_keys import _unet_key
from studio.models.loader import load_checkpoint
from studio.networks.lora import (
    ActiveNetwork,
    LoraFileError,
    LoraInfo,
    LoraLibrary,
    NetworkPatcher,
    addnet_hash,
)
from studio.networks.lora_formats import parse_network
from studio.testing import make_checkpoint, tiny_components
from studio.testing.loras import (
    write_kohya_lora,
    write_loha,
    write_lokr,
    write_old_diffusers_lora,
    write_peft_lora,
)

TE_MULT, UNET_MULT = 0.7, 1.3
PEFT_ALPHA = 8.0
PATTERN_MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
PATTERN_ALPHA = 3.0


# --------------------------------------------------------------------------- fixtures


class Models:
    """Tiny checkpoints written and loaded once per family (float32 CPU, or the bf16 policy)."""

    def __init__(self, root: Path):
        self.root = root
        self.config_cache = root / "configs"
        self._loaded: dict[str, tuple] = {}

    def get(self, family: str, bf16: bool = False):
        key = f"{family}-bf16" if bf16 else family
        if key not in self._loaded:
            components = tiny_components(family, seed=3)
            path = self.root / f"tiny-{family}.safetensors"
            if not path.exists():
                make_checkpoint(path, family, components=components)
            model = self.load(family, bf16)
            self._loaded[key] = (model, components, snapshot(model))
        return self._loaded[key]

    def load(self, family: str, bf16: bool = False):
        path = self.root / f"tiny-{family}.safetensors"
        if bf16:
            policy = resolve_policy("cpu", precision="bf16")
        else:
            policy = resolve_policy("cpu", no_half=True, no_half_vae=True, precision="full", want_xformers=False)
        return load_checkpoint(CheckpointInfo(path=path, name=path.name), policy, self.config_cache)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory.mktemp("lora-models"))


def components_of(model) -> dict:
    return {"unet": model.unet, **{i: te for i, te in enumerate(model.text_encoders)}}


def snapshot(model) -> dict:
    return {(c, name): p.detach().clone() for c, module in components_of(model).items()
            for name, p in module.named_parameters()}


def params(model) -> dict:
    return {(c, name): p for c, module in components_of(model).items() for name, p in module.named_parameters()}


def assert_pristine(model, original: dict) -> None:
    for key, param in params(model).items():
        assert torch.equal(param, original[key]), key


def library_with(tmp_path: Path) -> LoraLibrary:
    lib = LoraLibrary([tmp_path / "Lora"], HashCache(tmp_path / "cache.json"))
    lib.refresh()
    return lib


def patcher_for(model) -> NetworkPatcher:
    return NetworkPatcher(model.unet, model.text_encoders, model.family, model.is_sdxl)


# --------------------------------------------------------------------------- expected updates


def _linear_layers(module: nn.Module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def kohya_name_map(model) -> dict[str, tuple]:
    """kohya module name -> (component, module): diffusers-style UNet names for SD1/SD2, LDM
    names for SDXL, transformers-4 style text-encoder names."""
    sdxl = model.is_sdxl
    unet = model.unet
    with_attention = {i for i, block in enumerate(unet.up_blocks) if hasattr(block, "attentions")}
    names = {}
    for name, _ in _linear_layers(unet):
        key = name
        if sdxl:
            try:
                key = _unet_key(name + ".weight", unet.config.layers_per_block, with_attention)[: -len(".weight")]
            except KeyError:
                continue
        names["lora_unet_" + key.replace(".", "_")] = ("unet", name)
    for index, te in enumerate(model.text_encoders):
        prefix = f"lora_te{index + 1}_" if sdxl else "lora_te_"
        for name, _ in _linear_layers(te):
            names[prefix + "text_model_" + name.removeprefix("text_model.").replace(".", "_")] = (index, name)
    return names


def peft_name_map(model) -> dict[str, tuple]:
    names = {f"unet.{n}": ("unet", n) for n, _ in _linear_layers(model.unet)}
    for index, te in enumerate(model.text_encoders):
        prefix = "text_encoder" if index == 0 else "text_encoder_2"
        for name, _ in _linear_layers(te):
            bare = name.removeprefix("text_model.")
            names[f"{prefix}.{bare}"] = names[f"{prefix}.text_model.{bare}"] = (index, name)
    return names


def read_file(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    return {k: v.float() for k, v in load_file(str(path)).items()}, metadata


def group(tensors: dict, split) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key, value in tensors.items():
        module, part = split(key)
        out.setdefault(module, {})[part] = value
    return out


def tucker(core, wa, wb):
    """core [r1, r2, k, l], wa [r1, out], wb [r2, in] -> [out, in, k, l], by tensordot."""
    step = torch.tensordot(wa, core, dims=([0], [0]))          # [out, r2, k, l]
    return torch.tensordot(step, wb, dims=([1], [0])).permute(0, 3, 1, 2)  # [out, in, k, l]


def kron(w1, w2):
    """Kronecker product by broadcasting, for 2-D w1 and 2-D or 4-D w2."""
    a, b = w1.shape
    c, d = w2.shape[:2]
    rest = w2.shape[2:]
    w1 = w1.reshape(a, 1, b, 1, *([1] * len(rest)))
    w2 = w2.reshape(1, c, 1, d, *rest)
    return (w1 * w2).reshape(a * c, b * d, *rest)


def kohya_delta(parts: dict, shape, factors_in: torch.dtype | None = None, multiplier: float = 1.0) -> torch.Tensor:
    """ΔW·scale of one kohya / LyCORIS module, from its raw tensors. ``factors_in``: round
    up·scale·multiplier and down to that dtype first (what a half-precision merge multiplies);
    the result then already includes the multiplier."""
    alpha = float(parts["alpha"]) if "alpha" in parts else None
    if "lora_down.weight" in parts:
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        rank = down.shape[0]
        scale = (alpha or rank) / rank
        if factors_in is not None:
            up = (up.float() * (scale * multiplier)).to(factors_in).float()
            down = down.to(factors_in).float()
            return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(shape)
        delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
        return delta.reshape(shape) * scale
    if "hada_w1_a" in parts:
        halves = []
        for i in (1, 2):
            wa, wb = parts[f"hada_w{i}_a"], parts[f"hada_w{i}_b"]
            halves.append(tucker(parts[f"hada_t{i}"], wa, wb) if f"hada_t{i}" in parts else wa @ wb)
        rank = parts["hada_w1_b"].shape[0]
        return (halves[0] * halves[1]).reshape(shape) * (alpha / rank)
    if any(k.startswith("lokr_") for k in parts):
        w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
        if "lokr_w2" in parts:
            w2 = parts["lokr_w2"]
        elif "lokr_t2" in parts:
            w2 = tucker(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
        else:
            w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
        scale = 1.0
        for b_key in ("lokr_w1_b", "lokr_w2_b"):
            if b_key in parts:
                scale = alpha / parts[b_key].shape[0]
        if w2.dim() == 2 and len(shape) == 4 and "lokr_w2" not in parts:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        return kron(w1, w2).reshape(shape) * scale
    raise AssertionError(f"unknown module {sorted(parts)}")


def expected_kohya(path: Path, model, factors_in: torch.dtype | None = None,
                   multiplier_for=lambda component: 1.0) -> dict[tuple, torch.Tensor]:
    tensors, _ = read_file(path)
    modules = group(tensors, lambda k: tuple(k.split(".", 1)))
    names = kohya_name_map(model)
    layers = params(model)
    out = {}
    for name, parts in modules.items():
        component, module = names[name]
        shape = layers[(component, module + ".weight")].shape
        out[(component, module)] = kohya_delta(parts, shape, factors_in, multiplier_for(component))
    return out


def expected_peft(path: Path, model, alpha_for) -> dict[tuple, torch.Tensor]:
    tensors, _ = read_file(path)
    modules = group(tensors, lambda k: tuple(k.rsplit(".lora_", 1)))
    names = peft_name_map(model)
    layers = params(model)
    out = {}
    for name, parts in modules.items():
        component, module = names[name]
        down, up = parts["A.weight"], parts["B.weight"]
        rank = down.shape[0]
        shape = layers[(component, module + ".weight")].shape
        out[(component, module)] = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(shape) * (
            alpha_for(name) / rank)
    return out


def expected_old_diffusers(path: Path, model) -> dict[tuple, torch.Tensor]:
    tensors, _ = read_file(path)

    def split(key: str):
        key = key.removesuffix(".weight")
        key, part = key.rsplit(".", 1)
        if ".processor." in key:
            attention, proj = key.split(".processor.")
            proj = proj.removesuffix("_lora")
            return f"{attention}.{'to_out.0' if proj == 'to_out' else proj}", part
        return key.removesuffix(".lora_linear_layer"), part

    modules = group(tensors, split)
    names = peft_name_map(model)
    return {names[name]: parts["up"] @ parts["down"] for name, parts in modules.items()}


def assert_merged(model, original: dict, deltas: dict, te_mult=TE_MULT, unet_mult=UNET_MULT) -> None:
    """Touched weights equal original + multiplier·ΔW; everything else is bit-identical."""
    touched = {(c, m + ".weight"): d for (c, m), d in deltas.items()}
    assert touched
    for key, param in params(model).items():
        if key in touched:
            mult = unet_mult if key[0] == "unet" else te_mult
            expected = original[key].float() + mult * touched[key]
            assert param.shape == expected.shape, key
            torch.testing.assert_close(param.float(), expected, atol=2e-6, rtol=1e-5, msg=str(key))
        else:
            assert torch.equal(param, original[key]), key


# --------------------------------------------------------------------------- every format


def _peft_alpha(name: str) -> float:
    return PATTERN_ALPHA if name == f"unet.{PATTERN_MODULE}" else PEFT_ALPHA


CASES = {
    "kohya-sd1": ("sd1", lambda p, c, f: write_kohya_lora(p, c, f, rank=4, alpha=2.0), "kohya"),
    "locon-sd1": ("sd1", lambda p, c, f: write_kohya_lora(p, c, f, rank=4, alpha=3.0, conv=True), "kohya"),
    "kohya-sd2": ("sd2", lambda p, c, f: write_kohya_lora(p, c, f, rank=4, alpha=2.0), "kohya"),
    "kohya-sdxl": ("sdxl", lambda p, c, f: write_kohya_lora(p, c, f, rank=4, alpha=8.0, conv=True), "kohya"),
    "loha-sd1": ("sd1", lambda p, c, f: write_loha(p, c, f, rank=4, alpha=2.0, conv=True), "kohya"),
    "loha-tucker-sdxl": ("sdxl", lambda p, c, f: write_loha(p, c, f, conv=True, tucker=True), "kohya"),
    "lokr-sd1": ("sd1", lambda p, c, f: write_lokr(p, c, f, rank=2, alpha=1.0, conv=True), "kohya"),
    "lokr-full-sd1": ("sd1", lambda p, c, f: write_lokr(p, c, f, alpha=5.0, conv=True, decompose_w2=False), "kohya"),
    "lokr-w1-tucker-sd2": ("sd2", lambda p, c, f: write_lokr(p, c, f, rank=2, alpha=4.0, conv=True,
                                                            decompose_w1=True, tucker=True), "kohya"),
    "peft-sd1": ("sd1", lambda p, c, f: write_peft_lora(p, c, f, rank=4, alpha=PEFT_ALPHA,
                                                       alpha_pattern={PATTERN_MODULE: PATTERN_ALPHA}), "peft"),
    "peft-sdxl": ("sdxl", lambda p, c, f: write_peft_lora(p, c, f, rank=4, alpha=PEFT_ALPHA,
                                                         alpha_pattern={PATTERN_MODULE: PATTERN_ALPHA}), "peft"),
    "old-diffusers-sd1": ("sd1", lambda p, c, f: write_old_diffusers_lora(p, c, f), "old"),
    "old-diffusers-sdxl": ("sdxl", lambda p, c, f: write_old_diffusers_lora(p, c, f), "old"),
}


def expected_for(kind: str, path: Path, model) -> dict:
    if kind == "kohya":
        return expected_kohya(path, model)
    if kind == "peft":
        return expected_peft(path, model, _peft_alpha)
    return expected_old_diffusers(path, model)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_format_merges_exactly_and_restores(models, tmp_path, case):
    family, write, kind = CASES[case]
    model, components, original = models.get(family)
    path = write(tmp_path / "Lora" / f"{case}.safetensors", components, family)
    lib = library_with(tmp_path)
    patcher = patcher_for(model)
    try:
        report = patcher.apply([ActiveNetwork(lib.find(case), TE_MULT, UNET_MULT)], lib)
        assert report.applied == [case] and report.changed and report.te_changed
        assert report.warnings == []
        assert_merged(model, original, expected_for(kind, path, model))
    finally:
        patcher.restore()
    assert_pristine(model, original)
    assert patcher.current == ()


def test_sdxl_files_touch_both_text_encoders(models, tmp_path):
    model, components, _ = models.get("sdxl")
    path = write_kohya_lora(tmp_path / "Lora" / "xl.safetensors", components, "sdxl")
    deltas = expected_kohya(path, model)
    assert {c for c, _ in deltas} == {"unet", 0, 1}
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in load_file(str(path)))
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(str(path)))


def test_empty_set_and_restore_equal_a_fresh_load(models, tmp_path):
    model, components, original = models.get("sd1")
    write_kohya_lora(tmp_path / "Lora" / "a.safetensors", components, "sd1", conv=True)
    lib = library_with(tmp_path)
    patcher = patcher_for(model)
    patcher.apply([ActiveNetwork(lib.find("a"), 1.0, 1.0)], lib)
    report = patcher.apply([], lib)
    assert report.changed and report.applied == [] and report.te_changed
    assert_pristine(model, original)
    patcher.apply([ActiveNetwork(lib.find("a"), 0.5, 2.0)], lib)
    patcher.restore()
    fresh = snapshot(models.load("sd1"))
    for key, param in params(model).items():
        assert torch.equal(param, fresh[key]), key


def test_order_of_networks_does_not_change_the_bits(models, tmp_path):
    model, components, original = models.get("sd1")
    write_kohya_lora(tmp_path / "Lora" / "a.safetensors", components, "sd1", seed=1)
    write_loha(tmp_path / "Lora" / "b.safetensors", components, "sd1", conv=True, seed=2)
    lib = library_with(tmp_path)
    a, b = lib.find("a"), lib.find("b")
    patcher = patcher_for(model)
    try:
        patcher.apply([ActiveNetwork(a, 0.6, 0.9), ActiveNetwork(b, 1.0, 0.4)], lib)
        first = snapshot(model)
        patcher.apply([], lib)
        patcher.apply([ActiveNetwork(b, 1.0, 0.4), ActiveNetwork(a, 0.6, 0.9)], lib)
        second = snapshot(model)
        # Reached incrementally: A alone first, then A + B.
        patcher.apply([ActiveNetwork(a, 0.6, 0.9)], lib)
        patcher.apply([ActiveNetwork(b, 1.0, 0.4), ActiveNetwork(a, 0.6, 0.9)], lib)
        third = snapshot(model)
        # Both networks together are the sum of their updates.
        deltas = expected_kohya(tmp_path / "Lora" / "a.safetensors", model)
        for key, delta in expected_kohya(tmp_path / "Lora" / "b.safetensors", model).items():
            deltas[key] = deltas.get(key, 0) + delta * (0.4 / 0.9 if key[0] == "unet" else 1.0 / 0.6)
        assert_merged(model, original, deltas, te_mult=0.6, unet_mult=0.9)
    finally:
        patcher.restore()
    for key in first:
        assert torch.equal(first[key], second[key]), key
        assert torch.equal(first[key], third[key]), key
    assert_pristine(model, original)


def test_same_set_again_writes_nothing(models, tmp_path):
    model, components, original = models.get("sd1")
    write_kohya_lora(tmp_path / "Lora" / "a.safetensors", components, "sd1", seed=1)
    write_kohya_lora(tmp_path / "Lora" / "b.safetensors", components, "sd1", seed=2, te=False)
    lib = library_with(tmp_path)
    a, b = lib.find("a"), lib.find("b")
    patcher = patcher_for(model)
    try:
        first = patcher.apply([ActiveNetwork(a, 1.0, 1.0), ActiveNetwork(b, 0.5, 0.5)], lib)
        versions = {k: p._version for k, p in params(model).items()}
        again = patcher.apply([ActiveNetwork(b, 0.5, 0.5), ActiveNetwork(a, 1.0, 1.0)], lib)
        assert not again.changed and not again.te_changed
        assert again.applied == first.applied == ["a", "b"]
        assert {k: p._version for k, p in params(model).items()} == versions
        assert [entry[0] for entry in patcher.current] == [str(a.path), str(b.path)]
    finally:
        patcher.restore()
    assert_pristine(model, original)


def test_multipliers_select_what_is_touched(models, tmp_path):
    model, components, original = models.get("sd1")
    write_kohya_lora(tmp_path / "Lora" / "a.safetensors", components, "sd1")
    lib = library_with(tmp_path)
    a = lib.find("a")
    patcher = patcher_for(model)
    try:
        # Both zero: nothing wanted, so nothing to do.
        report = patcher.apply([ActiveNetwork(a, 0.0, 0.0)], lib)
        assert not report.changed
        assert_pristine(model, original)
        report = patcher.apply([ActiveNetwork(a, 0.0, 1.0)], lib)
        assert report.changed and not report.te_changed
        te_versions = {k: p._version for k, p in params(model).items() if k[0] != "unet"}
        for key, param in params(model).items():
            if key[0] != "unet":
                assert torch.equal(param, original[key])
        # Changing only the UNet multiplier leaves the text encoder alone.
        report = patcher.apply([ActiveNetwork(a, 0.0, 0.5)], lib)
        assert report.changed and not report.te_changed
        assert {k: p._version for k, p in params(model).items() if k[0] != "unet"} == te_versions
        report = patcher.apply([ActiveNetwork(a, 1.0, 0.5)], lib)
        assert report.te_changed
        assert_merged(model, original, expected_kohya(tmp_path / "Lora" / "a.safetensors", model),
                      te_mult=1.0, unet_mult=0.5)
    finally:
        patcher.restore()
    assert_pristine(model, original)


# --------------------------------------------------------------------------- skipping


@pytest.mark.parametrize(("lora_family", "model_family", "label"), [("sdxl", "sd1", "SDXL"), ("sd1", "sdxl", "SD1")])
def test_other_family_is_skipped(models, tmp_path, lora_family, model_family, label):
    model, _, original = models.get(model_family)
    write_kohya_lora(tmp_path / "Lora" / "other.safetensors", tiny_components(lora_family, seed=3), lora_family)
    lib = library_with(tmp_path)
    assert lib.find("other").family == lora_family
    patcher = patcher_for(model)
    report = patcher.apply([ActiveNetwork(lib.find("other"), 1.0, 1.0)], lib)
    assert report.applied == []
    assert any(f"is for {label}" in w and "skipped" in w for w in report.warnings), report.warnings
    assert_pristine(model, original)
    patcher.restore()


def test_file_with_a_misfit_module_is_skipped_whole(models, tmp_path):
    model, components, original = models.get("sd1")
    good = write_kohya_lora(tmp_path / "Lora" / "good.safetensors", components, "sd1", seed=1)
    path = write_kohya_lora(tmp_path / "Lora" / "bad.safetensors", components, "sd1", seed=2)
    tensors = load_file(str(path))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    tensors[key] = torch.zeros(7, tensors[key].shape[1], dtype=tensors[key].dtype)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    lib = library_with(tmp_path)
    patcher = patcher_for(model)
    try:
        report = patcher.apply([ActiveNetwork(lib.find("bad"), 1.0, 1.0)], lib)
        assert report.applied == [] and any("do not fit" in w for w in report.warnings)
        assert_pristine(model, original)
        report = patcher.apply([ActiveNetwork(lib.find("bad"), 1.0, 1.0), ActiveNetwork(lib.find("good"), 1.0, 1.0)],
                               lib)
        assert report.applied == ["good"]
        assert_merged(model, original, expected_kohya(good, model), te_mult=1.0, unet_mult=1.0)
    finally:
        patcher.restore()


def test_unmatched_modules_are_counted_and_the_rest_applied(models, tmp_path):
    model, components, original = models.get("sd1")
    path = write_kohya_lora(tmp_path / "Lora" / "extra.safetensors", components, "sd1")
    tensors = load_file(str(path))
    expected = expected_kohya(path, model)
    tensors["lora_unet_no_such_layer.lora_down.weight"] = torch.ones(2, 3)
    tensors["lora_unet_no_such_layer.lora_up.weight"] = torch.ones(3, 2)
    tensors["bundle_emb.myemb.string_to_param.*"] = torch.ones(1, 32)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    lib = library_with(tmp_path)
    patcher = patcher_for(model)
    try:
        report = patcher.apply([ActiveNetwork(lib.find("extra"), TE_MULT, UNET_MULT)], lib)
        total = len(expected) + 1
        assert report.applied == ["extra"]
        assert any(f"1 of {total} modules match no layer" in w for w in report.warnings), report.warnings
        assert any("bundled embedding" in w for w in report.warnings)
        assert_merged(model, original, expected)
    finally:
        patcher.restore()


def test_inpainting_conv_in_is_zero_padded(models, tmp_path):
    model, components, original = models.get("sd1-inpaint")
    path = write_kohya_lora(tmp_path / "Lora" / "inp.safetensors", components, "sd1", conv=True, conv_in_channels=4)
    lib = library_with(tmp_path)
    patcher = patcher_for(model)
    try:
        report = patcher.apply([ActiveNetwork(lib.find("inp"), TE_MULT, UNET_MULT)], lib)
        assert report.applied == ["inp"], report.warnings
        tensors, _ = read_file(path)
        down, up = tensors["lora_unet_conv_in.lora_down.weight"], tensors["lora_unet_conv_in.lora_up.weight"]
        rank = down.shape[0]
        delta4 = (up.reshape(-1, rank) @ down.reshape(rank, -1)).reshape(up.shape[0], 4, 3, 3) * (2.0 / rank)
        weight, before = model.unet.conv_in.weight, original[("unet", "conv_in.weight")]
        assert weight.shape[1] == 9
        torch.testing.assert_close(weight[:, :4], before[:, :4] + UNET_MULT * delta4, atol=2e-6, rtol=1e-5)
        assert torch.equal(weight[:, 4:], before[:, 4:])
        deltas = expected_kohya_without(path, model, "lora_unet_conv_in")
        deltas[("unet", "conv_in")] = torch.cat([delta4, torch.zeros(delta4.shape[0], 5, 3, 3)], dim=1)
        assert_merged(model, original, deltas)
    finally:
        patcher.restore()
    assert_pristine(model, original)


def expected_kohya_without(path: Path, model, skip: str) -> dict:
    tensors, metadata = read_file(path)
    kept = {k: v for k, v in tensors.items() if not k.startswith(skip + ".")}
    stripped = path.with_name("stripped.safetensors.tmp")
    save_file({k: v.contiguous() for k, v in kept.items()}, str(stripped), metadata=metadata)
    try:
        return expected_kohya(stripped, model)
    finally:
        stripped.unlink()


def test_bf16_channels_last_weights_round_once(models, tmp_path):
    """The CPU default policy: bf16 weights, channels_last UNet; LoCon 3x3 convs go through the
    memory-order path."""
    model, components, original = models.get("sd1", bf16=True)
    assert model.unet.dtype == torch.bfloat16
    path = write_kohya_lora(tmp_path / "Lora" / "a.safetensors", components, "sd1", conv=True)
    lib = library_with(tmp_path)
    patcher = patcher_for(model)
    try:
        patcher.apply([ActiveNetwork(lib.find("a"), TE_MULT, UNET_MULT)], lib)
        # Low-rank updates on half weights run as one bf16 addmm: the factors (up·scale·mult,
        # down) are rounded to bf16, then the kernel accumulates in float32 and rounds once.
        touched = {(c, m + ".weight"): d for (c, m), d in expected_kohya(
            path, model, torch.bfloat16, lambda c: UNET_MULT if c == "unet" else TE_MULT).items()}
        mismatches = total = 0
        for key, param in params(model).items():
            if key not in touched:
                assert torch.equal(param, original[key]), key
                continue
            exact = original[key].float() + touched[key]
            expected = exact.to(torch.bfloat16)
            assert param.dtype == torch.bfloat16
            # the nearest bf16 to that sum, up to ties that the summation order may break
            slack = 1e-5 * exact.abs() + 1e-7
            assert bool(((param.float() - exact).abs() <= (expected.float() - exact).abs() + slack).all()), key
            mismatches += int((param != expected).sum())
            total += param.numel()
        assert mismatches <= total * 1e-3
        assert model.unet.down_blocks[0].resnets[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    finally:
        patcher.restore()
    assert_pristine(model, original)


# --------------------------------------------------------------------------- library


def test_addnet_hash_skips_the_safetensors_header(models, tmp_path):
    _, components, _ = models.get("sd1")
    path = write_kohya_lora(tmp_path / "Lora" / "h.safetensors", components, "sd1")
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    expected = hashlib.sha256(data[8 + header:]).hexdigest()
    assert addnet_hash(path) == expected
    lib = library_with(tmp_path)
    info = lib.find("h")
    assert info.sha256 is None and info.shorthash() is None
    assert lib.hash(info) == expected and info.shorthash() == expected[:12]
    cache = json.loads((tmp_path / "cache.json").read_text())
    assert cache["hashes-addnet"]["lora/h"]["sha256"] == expected
    # A metadata edit changes the header only: the hash stays.
    save_file(load_file(str(path)), str(path), metadata={"ss_output_name": "renamed"})
    assert addnet_hash(path) == expected
    assert library_with(tmp_path).find("renamed").name == "h"
    pt = tmp_path / "Lora" / "p.pt"
    torch.save({"lora_te_x.alpha": torch.tensor(1.0)}, pt)
    assert addnet_hash(pt) == hashlib.sha256(pt.read_bytes()).hexdigest()


def test_library_listing_find_and_api(models, tmp_path):
    _, components, _ = models.get("sd1")
    folder = tmp_path / "Lora"
    write_kohya_lora(folder / "styles" / "file_a.safetensors", components, "sd1", output_name="nice alias")
    write_kohya_lora(folder / ".hidden" / "secret.safetensors", components, "sd1")
    tensors = {k: v for k, v in load_file(str(folder / "styles" / "file_a.safetensors")).items()}
    torch.save(tensors, folder / "pickled.pt")
    lib = library_with(tmp_path)
    names = [i.name for i in lib.items()]
    assert names == ["file_a", "pickled"]
    info = lib.find("nice alias")
    assert info is lib.find("file_a") and info.alias == "nice alias" and info.family == "sd1"
    assert lib.find("nope") is None
    api = info.api_dict()
    assert set(api) == {"name", "alias", "path", "metadata"}
    assert api["metadata"]["ss_base_model_version"] == "sd_v1" and api["path"] == str(info.path)
    pickled = lib.find("pickled")
    assert pickled.metadata == {} and pickled.family is None
    parsed = lib.load(pickled)
    assert parsed.modules and pickled.family is None  # tiny widths say nothing about the family
    assert lib.load(pickled) is parsed  # cached


def test_family_from_keys_without_metadata(models, tmp_path):
    _, components, _ = models.get("sdxl")
    write_peft_lora(tmp_path / "Lora" / "xl.safetensors", components, "sdxl")
    assert library_with(tmp_path).find("xl").family == "sdxl"
    assert LoraInfo(name="x", path=tmp_path).alias == "x"


def test_corrupt_files_are_listed_with_an_error(models, tmp_path):
    model, components, original = models.get("sd1")
    folder = tmp_path / "Lora"
    folder.mkdir(parents=True)
    (folder / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    good = write_kohya_lora(folder / "truncated.safetensors", components, "sd1")
    good.write_bytes(good.read_bytes()[:-100])
    (folder / "broken.pt").write_bytes(b"not a pickle at all")
    lib = library_with(tmp_path)
    assert sorted(i.name for i in lib.items()) == ["broken", "garbage", "truncated"]
    assert lib.find("garbage").error and lib.find("truncated").error
    for name in ("garbage", "truncated", "broken"):
        with pytest.raises(LoraFileError, match=name):
            lib.load(lib.find(name))
    patcher = patcher_for(model)
    report = patcher.apply([ActiveNetwork(lib.find("broken"), 1.0, 1.0)], lib)
    assert report.applied == [] and "broken" in report.warnings[0]
    assert_pristine(model, original)


def test_dora_files_are_refused(models, tmp_path):
    model, components, original = models.get("sd1")
    path = write_kohya_lora(tmp_path / "Lora" / "dora.safetensors", components, "sd1")
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.endswith(".lora_up.weight")]:
        tensors[key.replace(".lora_up.weight", ".dora_scale")] = torch.ones(1, tensors[key].shape[0])
    save_file(tensors, str(path))
    lib = library_with(tmp_path)
    with pytest.raises(LoraFileError, match="DoRA"):
        lib.load(lib.find("dora"))
    report = patcher_for(model).apply([ActiveNetwork(lib.find("dora"), 1.0, 1.0)], lib)
    assert report.applied == [] and "DoRA" in report.warnings[0]
    assert_pristine(model, original)


# --------------------------------------------------------------------------- parser details


def test_kohya_alpha_missing_or_zero_means_rank():
    down, up = torch.randn(4, 8), torch.randn(6, 4)
    for extra in ({}, {"m.alpha": torch.tensor(0.0)}):
        parsed = parse_network({"m.lora_down.weight": down, "m.lora_up.weight": up, **extra})
        assert parsed.modules["m"].scale == 1.0
        torch.testing.assert_close(parsed.modules["m"].delta((6, 8)), up @ down)
    parsed = parse_network({"m.lora_down.weight": down, "m.lora_up.weight": up, "m.alpha": torch.tensor(2.0)})
    assert parsed.modules["m"].scale == 0.5


def test_peft_scale_without_metadata_is_one_and_unsupported_types_are_reported():
    down, up = torch.randn(4, 8), torch.randn(6, 4)
    parsed = parse_network({"unet.m.lora_A.weight": down, "unet.m.lora_B.weight": up,
                            "lora_unet_x.on_input": torch.ones(3), "lora_unet_x.weight": torch.ones(3)})
    assert parsed.modules["unet.m"].scale == 1.0
    assert "lora_unet_x" in parsed.unsupported


def test_modules_whose_tensors_do_not_combine_are_reported_not_merged():
    parsed = parse_network({
        "m.lora_down.weight": torch.randn(4, 8), "m.lora_up.weight": torch.randn(6, 3),
        "n.hada_w1_a": torch.randn(6, 2), "n.hada_w1_b": torch.randn(2, 8),
        "n.hada_w2_a": torch.randn(6, 2), "n.hada_w2_b": torch.randn(2, 8), "n.alpha": torch.tensor(1.0),
    })
    assert list(parsed.modules) == ["n"] and "do not combine" in parsed.unsupported["m"]
