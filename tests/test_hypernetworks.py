"""A1111 hypernetworks: reading every field, module layout, safety, the library, and UNet hooks."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from studio.networks.hypernetwork_module import HypernetworkModule
from studio.networks.hypernetworks import (
    Hypernetwork,
    HypernetworkFileError,
    HypernetworkLibrary,
    apply_hypernetworks,
    read_hypernetwork,
)
from studio.testing import tiny_components
from studio.testing.hypernetworks import (
    dropout_structure_for,
    expected_keys,
    tiny_widths,
    write_hypernetwork,
)

TEXT_WIDTH = 32  # tiny SD1: the text width; also the width of the first UNet block
MID_WIDTH = 64  # tiny SD1: the only attention of width 64 is in the mid block


class CodePayload:
    """Unpickling this would run code creating ``marker`` (what a malicious .pt would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class PlainObject:
    """An ordinary class instance: refused because it is a class, even though it runs nothing."""

    def __init__(self) -> None:
        self.value = 1


# ---------------------------------------------------------------------------------------------
# Reading


def test_reads_every_field(tmp_path):
    path = write_hypernetwork(
        tmp_path / "style.pt",
        widths=(32, 64, 768),
        layer_structure=(1, 1.5, 2, 1),
        activation="elu",
        layer_norm=True,
        dropout=True,
        last_layer_dropout=True,
        activate_output=False,
        name="internal",
        step=1234,
        sd_checkpoint="deadbeef",
        sd_checkpoint_name="model-x",
        optional_info="notes",
    )
    hn = read_hypernetwork(path)
    assert hn.name == "style"  # prompts use the stem, as A1111 lists by filename
    assert hn.internal_name == "internal"
    assert hn.widths == [32, 64, 768]
    assert hn.layer_structure == [1.0, 1.5, 2.0, 1.0]
    assert hn.activation_func == "elu"
    assert hn.is_layer_norm is True
    assert hn.activate_output is False
    assert hn.use_dropout is True
    assert hn.dropout_structure == [0.0, 0.3, 0.3, 0.0]
    assert hn.last_layer_dropout is True
    assert hn.weight_initialization == "Normal"
    assert hn.step == 1234
    assert hn.sd_checkpoint == "deadbeef"
    assert hn.sd_checkpoint_name == "model-x"
    assert hn.optional_info == "notes"
    assert hn.metadata()["name"] == "internal"
    raw = torch.load(path, weights_only=True)
    for width in (32, 64, 768):
        for module, state in zip(hn.layers[width], raw[width]):
            assert isinstance(module, HypernetworkModule) and not module.training
            loaded = module.state_dict()
            assert loaded.keys() == state.keys()
            assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert hn.shorthash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def test_missing_metadata_uses_a1111_defaults(tmp_path):
    path = write_hypernetwork(tmp_path / "bare.pt", widths=(32,), activation=None)
    data = torch.load(path, weights_only=True)
    for key in (
        "layer_structure",
        "activation_func",
        "is_layer_norm",
        "activate_output",
        "use_dropout",
        "dropout_structure",
        "last_layer_dropout",
        "weight_initialization",
        "name",
        "step",
    ):
        data.pop(key)
    torch.save(data, path)
    hn = read_hypernetwork(path)
    assert hn.layer_structure == [1.0, 2.0, 1.0]
    assert hn.activation_func is None and hn.activate_output is True
    assert hn.is_layer_norm is False and hn.use_dropout is False
    assert hn.dropout_structure == [0.0, 0.0, 0.0]
    assert hn.internal_name is None and hn.step == 0
    assert list(hn.layers[32][0].state_dict()) == [
        "linear.0.weight",
        "linear.0.bias",
        "linear.1.weight",
        "linear.1.bias",
    ]


def test_dropout_structure_derived_when_only_use_dropout_is_stored(tmp_path):
    path = write_hypernetwork(tmp_path / "drop.pt", widths=(32,), layer_structure=(1, 2, 2, 1), dropout=True)
    data = torch.load(path, weights_only=True)
    del data["dropout_structure"]
    torch.save(data, path)
    hn = read_hypernetwork(path)
    assert hn.dropout_structure == [0.0, 0.3, 0.0, 0.0]
    assert [type(m) for m in hn.layers[32][0].linear] == [
        nn.Linear,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
        nn.ReLU,
        nn.Linear,
        nn.ReLU,
    ]


def test_old_linear1_linear2_files(tmp_path):
    path = write_hypernetwork(tmp_path / "old.pt", widths=(32, 64), old_style=True, seed=3)
    raw = torch.load(path, weights_only=True)
    assert set(raw[32][0]) == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}
    hn = read_hypernetwork(path)
    k_module = hn.layers[32][0]
    assert [type(m) for m in k_module.linear] == [nn.Linear, nn.Linear]
    assert torch.equal(k_module.linear[0].weight, raw[32][0]["linear1.weight"])
    assert torch.equal(k_module.linear[1].bias, raw[32][0]["linear2.bias"])


@pytest.mark.parametrize(
    (
        "layer_structure",
        "activation",
        "layer_norm",
        "dropout",
        "last_layer_dropout",
        "activate_output",
        "types",
    ),
    [
        ((1, 2, 1), "relu", False, False, False, True, "L A L A"),
        ((1, 2, 1), "relu", False, False, False, False, "L A L"),
        ((1, 2, 1), "linear", True, False, False, True, "L N L N"),
        ((1, 2, 1), "tanh", True, True, True, True, "L A N D L A N"),
        ((1, 2, 2, 1), "swish", True, True, False, False, "L A N D L A N L N"),
        ((1, 2, 2, 1), "leakyrelu", False, True, True, True, "L A D L A D L A"),
    ],
)
def test_module_layout_matches_a1111(
    tmp_path, layer_structure, activation, layer_norm, dropout, last_layer_dropout, activate_output, types
):
    path = write_hypernetwork(
        tmp_path / "variant.pt",
        widths=(32,),
        layer_structure=layer_structure,
        activation=activation,
        layer_norm=layer_norm,
        dropout=dropout,
        last_layer_dropout=last_layer_dropout,
        activate_output=activate_output,
    )
    hn = read_hypernetwork(path)
    module = hn.layers[32][1]
    letter = {nn.Linear: "L", nn.LayerNorm: "N", nn.Dropout: "D"}
    assert " ".join(letter.get(type(m), "A") for m in module.linear) == types
    if activation == "swish":
        assert isinstance(module.linear[1], nn.Hardswish)  # A1111's "swish" is Hardswish
    drop = dropout_structure_for(layer_structure, dropout, last_layer_dropout)
    keys = expected_keys(layer_structure, activation, layer_norm, drop, activate_output)
    assert list(module.state_dict()) == keys
    # Dropout is inert at inference: two calls agree exactly.
    x = torch.randn(2, 5, 32)
    assert torch.equal(module(x), module(x))


def test_other_torch_activation_names(tmp_path):
    hn = read_hypernetwork(write_hypernetwork(tmp_path / "gelu.pt", widths=(32,), activation="gelu"))
    assert isinstance(hn.layers[32][0].linear[1], nn.GELU)


def test_unknown_activation_is_a_clear_error(tmp_path):
    path = write_hypernetwork(tmp_path / "bad_act.pt", widths=(32,), activation="relu")
    data = torch.load(path, weights_only=True)
    data["activation_func"] = "wiggle"
    torch.save(data, path)
    with pytest.raises(HypernetworkFileError, match=r"bad_act\.pt.*unsupported activation function 'wiggle'"):
        read_hypernetwork(path)


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"this is not a torch file at all")
    with pytest.raises(HypernetworkFileError, match=r"corrupt\.pt"):
        read_hypernetwork(path)
    truncated = write_hypernetwork(tmp_path / "truncated.pt", widths=(32,))
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(HypernetworkFileError, match=r"truncated\.pt"):
        read_hypernetwork(truncated)


def test_wrong_shapes_and_non_hypernetwork_dicts(tmp_path):
    path = write_hypernetwork(tmp_path / "shape.pt", widths=(32,))
    data = torch.load(path, weights_only=True)
    data["layer_structure"] = [1, 3, 1]  # weights were written for [1, 2, 1]
    torch.save(data, path)
    with pytest.raises(HypernetworkFileError, match=r"shape\.pt: width 32 k weights do not fit"):
        read_hypernetwork(path)
    embedding = tmp_path / "embedding.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "x"}, embedding)
    with pytest.raises(HypernetworkFileError, match="not a hypernetwork"):
        read_hypernetwork(embedding)
    bad_structure = write_hypernetwork(tmp_path / "structure.pt", widths=(32,))
    data = torch.load(bad_structure, weights_only=True)
    data["layer_structure"] = [2, 2, 1]
    torch.save(data, bad_structure)
    with pytest.raises(HypernetworkFileError, match="must start and end with 1"):
        read_hypernetwork(bad_structure)


def test_pickled_class_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    torch.save({32: ({}, {}), "payload": CodePayload(marker)}, evil)
    with pytest.raises(HypernetworkFileError, match=r"evil\.pt: refused to load.*exec"):
        read_hypernetwork(evil)
    assert not marker.exists()
    plain = tmp_path / "plain.pt"
    torch.save({32: ({}, {}), "payload": PlainObject()}, plain)
    with pytest.raises(HypernetworkFileError, match=r"refused to load.*PlainObject"):
        read_hypernetwork(plain)


# ---------------------------------------------------------------------------------------------
# Library


def test_library_lists_finds_loads_and_caches(tmp_path):
    folder = tmp_path / "hypernetworks"
    a = write_hypernetwork(folder / "Alpha.pt", widths=(32,))
    b = write_hypernetwork(folder / "sub" / "beta.pt", widths=(64,), seed=1)
    (folder / "broken.pt").write_bytes(b"junk")
    (folder / "None.pt").write_bytes(b"reserved")
    (folder / "notes.txt").write_text("ignored")
    lib = HypernetworkLibrary([folder, tmp_path / "missing"])
    lib.refresh()  # the broken file must not make this raise
    assert [info.name for info in lib.items()] == ["Alpha", "broken", "beta"]
    assert lib.api_dict() == [
        {"name": "Alpha", "path": str(a)},
        {"name": "broken", "path": str(folder / "broken.pt")},
        {"name": "beta", "path": str(b)},
    ]
    assert lib.find("beta").path == b
    assert lib.find("alpha").path == a  # unique case-insensitive fallback
    assert lib.find("gamma") is None
    with pytest.raises(HypernetworkFileError, match=r"broken\.pt"):
        lib.load(lib.find("broken"))

    info = lib.find("Alpha")
    first = lib.load(info)
    assert isinstance(first, Hypernetwork) and first.widths == [32]
    assert lib.load(info) is first  # unchanged file: cached
    assert first.shorthash == info.shorthash == hashlib.sha256(a.read_bytes()).hexdigest()[:10]
    old_hash = info.shorthash

    write_hypernetwork(a, widths=(32, 64), seed=7)  # same name, new content
    lib.refresh()
    again = lib.load(lib.find("Alpha"))
    assert again is not first and again.widths == [32, 64]
    assert lib.find("Alpha").shorthash != old_hash

    b.unlink()
    lib.refresh()
    assert lib.find("beta") is None


# ---------------------------------------------------------------------------------------------
# Applying to a UNet


@pytest.fixture(scope="module")
def unet():
    return tiny_components("sd1")["unet"]


@pytest.fixture(scope="module")
def unet_inputs():
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 7, TEXT_WIDTH, generator=generator)
    return sample, torch.tensor([500]), context


def _run(unet, inputs) -> torch.Tensor:
    sample, timestep, context = inputs
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=context).sample


def _hook_counts(module: nn.Module) -> list[int]:
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules()]


def _first_attention(unet, name: str, width: int):
    for module_name, module in unet.named_modules():
        if module_name.endswith(name) and module.to_k.in_features == width:
            return module
    raise AssertionError(f"no {name} of width {width}")


def _manual_hk(raw_state: dict, x: torch.Tensor, multiplier: float) -> torch.Tensor:
    """A relu [1, 2, 1] hypernetwork module with activate_output, computed by hand."""
    hidden = F.relu(x @ raw_state["linear.0.weight"].T + raw_state["linear.0.bias"])
    out = F.relu(hidden @ raw_state["linear.2.weight"].T + raw_state["linear.2.bias"])
    return x + out * multiplier


def test_tiny_widths_match_the_tiny_unet(unet):
    widths = {m.to_k.in_features for m in unet.modules() if hasattr(m, "to_k")}
    assert widths == set(tiny_widths("sd1")) == {32, 64}


def test_multiplier_zero_installs_nothing_and_is_bit_identical(tmp_path, unet, unet_inputs):
    hn = read_hypernetwork(write_hypernetwork(tmp_path / "hn.pt", widths=tiny_widths("sd1")))
    before = _hook_counts(unet)
    base = _run(unet, unet_inputs)
    with apply_hypernetworks(unet, [(hn, 0.0)], torch.float32, "cpu") as hooks:
        assert hooks.hook_count == 0 and _hook_counts(unet) == before
        assert torch.equal(_run(unet, unet_inputs), base)
    with apply_hypernetworks(unet, [], torch.float32, "cpu") as hooks:
        assert hooks.hook_count == 0


def test_multiplier_one_changes_output_and_removal_restores(tmp_path, unet, unet_inputs):
    hn = read_hypernetwork(write_hypernetwork(tmp_path / "hn.pt", widths=tiny_widths("sd1")))
    before = _hook_counts(unet)
    base = _run(unet, unet_inputs)
    handle = apply_hypernetworks(unet, [(hn, 1.0)], torch.float32, "cpu")
    n_attention = sum(1 for m in unet.modules() if hasattr(m, "to_k"))
    assert handle.hook_count == 2 * n_attention  # every attention's to_k and to_v
    changed = _run(unet, unet_inputs)
    assert not torch.allclose(changed, base, atol=1e-6)
    handle.remove()
    assert _hook_counts(unet) == before
    assert torch.equal(_run(unet, unet_inputs), base)
    handle.remove()  # harmless twice


def test_key_and_value_use_the_transformed_context(tmp_path, unet, unet_inputs):
    path = write_hypernetwork(tmp_path / "hn.pt", widths=tiny_widths("sd1"), seed=5)
    raw = torch.load(path, weights_only=True)
    hn = read_hypernetwork(path)
    multiplier = 0.7
    _, _, context = unet_inputs
    cross = _first_attention(unet, "attn2", TEXT_WIDTH)
    self_attn = _first_attention(unet, "attn1", MID_WIDTH)
    seen: dict[str, torch.Tensor] = {}

    def keep(label, output=True):
        def hook(module, args, *rest):
            seen.setdefault(label, (rest[0] if output else args[0]).detach().clone())

        return hook

    with apply_hypernetworks(unet, [(hn, multiplier)], torch.float32, "cpu"):
        extra = [
            cross.to_k.register_forward_hook(keep("cross_k")),
            cross.to_v.register_forward_hook(keep("cross_v")),
            self_attn.to_k.register_forward_hook(keep("self_k")),
            # Runs before the hypernetwork's hook, so it sees the untouched block activations.
            self_attn.to_k.register_forward_pre_hook(keep("self_in", output=False), prepend=True),
        ]
        try:
            _run(unet, unet_inputs)
        finally:
            for handle in extra:
                handle.remove()

    k_state, v_state = raw[TEXT_WIDTH]
    with torch.no_grad():
        expected_k = cross.to_k(_manual_hk(k_state, context, multiplier))
        expected_v = cross.to_v(_manual_hk(v_state, context, multiplier))
        expected_self_k = self_attn.to_k(_manual_hk(raw[MID_WIDTH][0], seen["self_in"], multiplier))
    torch.testing.assert_close(seen["cross_k"], expected_k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["cross_v"], expected_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["self_k"], expected_self_k, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected_k, cross.to_k(context), atol=1e-4)


def test_width_missing_from_file_leaves_attention_unchanged(tmp_path, unet, unet_inputs):
    hn = read_hypernetwork(write_hypernetwork(tmp_path / "mid.pt", widths=(MID_WIDTH,)))
    cross = _first_attention(unet, "attn2", TEXT_WIDTH)
    seen: list[torch.Tensor] = []
    probe = cross.to_k.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        base = _run(unet, unet_inputs)
        with apply_hypernetworks(unet, [(hn, 1.0)], torch.float32, "cpu") as hooks:
            assert hooks.hook_count == 2  # mid-block attn1 (k, v); its attn2 reads the 32-wide text
            changed = _run(unet, unet_inputs)
    finally:
        probe.remove()
    assert len(cross.to_k._forward_pre_hooks) == 0
    assert torch.equal(seen[0], seen[1])  # the width-32 attention saw no change
    assert not torch.allclose(base, changed, atol=1e-6)  # the width-64 one did


def test_two_hypernetworks_chain_in_order(tmp_path, unet, unet_inputs):
    path_a = write_hypernetwork(tmp_path / "a.pt", widths=tiny_widths("sd1"), seed=11)
    path_b = write_hypernetwork(tmp_path / "b.pt", widths=tiny_widths("sd1"), seed=12, activation="tanh")
    a, b = read_hypernetwork(path_a), read_hypernetwork(path_b)
    _, _, context = unet_inputs
    cross = _first_attention(unet, "attn2", TEXT_WIDTH)
    seen: list[torch.Tensor] = []
    probe = cross.to_k.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    try:
        with apply_hypernetworks(unet, [(a, 1.0), (b, 0.5)], torch.float32, "cpu"):
            ab = _run(unet, unet_inputs)
        with apply_hypernetworks(unet, [(b, 0.5), (a, 1.0)], torch.float32, "cpu"):
            ba = _run(unet, unet_inputs)
    finally:
        probe.remove()
    assert not torch.allclose(ab, ba, atol=1e-6)
    hk_b = b.layers[TEXT_WIDTH][0]
    with torch.no_grad():
        manual = cross.to_k(
            hk_b(_manual_hk(torch.load(path_a, weights_only=True)[TEXT_WIDTH][0], context, 1.0), 0.5)
        )
    torch.testing.assert_close(seen[0], manual, rtol=1e-5, atol=1e-6)


def test_device_copies_are_cached_per_dtype(tmp_path, unet, unet_inputs):
    hn = read_hypernetwork(write_hypernetwork(tmp_path / "hn.pt", widths=tiny_widths("sd1")))
    assert hn.modules_for("cpu", torch.float32) is hn.layers
    half = hn.modules_for("cpu", torch.bfloat16)
    assert half is hn.modules_for("cpu", torch.bfloat16)
    assert half[32][0].linear[0].weight.dtype == torch.bfloat16
    assert hn.layers[32][0].linear[0].weight.dtype == torch.float32
    # A UNet in another dtype gets modules in its dtype (inferred when not given).
    bf16_unet = copy.deepcopy(unet).to(torch.bfloat16)
    sample, timestep, context = unet_inputs
    with torch.no_grad():
        base = bf16_unet(sample.bfloat16(), timestep, encoder_hidden_states=context.bfloat16()).sample
        with apply_hypernetworks(bf16_unet, [(hn, 1.0)]):
            out = bf16_unet(sample.bfloat16(), timestep, encoder_hidden_states=context.bfloat16()).sample
    assert out.dtype == torch.bfloat16 and not torch.equal(out, base)


def test_sdxl_cross_attention_is_chosen_by_text_width(tmp_path):
    from diffusers import UNet2DConditionModel

    from studio.testing.factory import unet_config

    sdxl_unet = UNet2DConditionModel(**unet_config("sdxl"))
    text_width = sdxl_unet.config.cross_attention_dim
    assert text_width in tiny_widths("sdxl") and text_width not in tiny_widths("sd1")
    hn = read_hypernetwork(write_hypernetwork(tmp_path / "xl.pt", widths=(text_width,)))
    attn2 = [m for name, m in sdxl_unet.named_modules() if name.endswith("attn2")]
    with apply_hypernetworks(sdxl_unet, [(hn, 1.0)]) as hooks:
        assert hooks.hook_count == 2 * len(attn2)
        assert all(len(m.to_k._forward_pre_hooks) == 1 == len(m.to_v._forward_pre_hooks) for m in attn2)
    assert all(len(m.to_k._forward_pre_hooks) == 0 for m in attn2)
