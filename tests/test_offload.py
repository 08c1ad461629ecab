"""--medvram / --lowvram offloading (studio.offload).

Without a GPU the swapping is observed through a stand-in "device": the injected move function turns
a unit into float64 when it is sent to the execution device and back into float32 when it is sent to
storage. Inputs are float64, so a unit that ran without being brought in first would fail with a dtype
mismatch, exactly as a CPU weight meets a CUDA input. ``Module.to`` takes the same in-place ``.data``
path for a dtype change as for a device change, so Parameter identity is checked on that path too.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from studio.offload import Offloader, OffloadMode, OffloadUnit, offload_mode, offload_units
from studio.testing import tiny_components

FAKE_GPU = torch.device("cuda", 0)  # never touched: the recording mover below only changes dtypes
STORAGE = torch.device("cpu")
EXEC_DTYPE = torch.float64


def _components(family: str) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    c = tiny_components(family)
    tes = [c["text_encoder"]] + ([c["text_encoder_2"]] if "text_encoder_2" in c else [])
    return c["unet"], c["vae"], tes


def _unet_inputs(unet: nn.Module, family: str, dtype: torch.dtype = torch.float32) -> dict:
    # Drawn in float32 and then cast, so that every dtype gets the same values.
    g = torch.Generator().manual_seed(1)
    cross = unet.config.cross_attention_dim
    kwargs = {
        "sample": torch.randn(2, 4, 8, 8, generator=g).to(dtype),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(2, 7, cross, generator=g).to(dtype),
    }
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 64, generator=g).to(dtype),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2, dtype=dtype),
        }
    return kwargs


def _all_modules(*roots: nn.Module) -> list[nn.Module]:
    return [m for root in roots for m in root.modules()]


def _hook_count(*roots: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in _all_modules(*roots))


class MoveRecorder:
    """A move function that stands in for CPU<->GPU with float32<->float64 and records every move."""

    def __init__(self, units: list[OffloadUnit]):
        self.names = {id(u.module): u.name for u in units}
        self.moves: list[tuple[str, str]] = []
        self.on_exec: set[str] = set()
        self.peak = 0

    def __call__(self, module: nn.Module, device: torch.device) -> None:
        name = self.names.get(id(module), "<component>")
        # nn.Module.to rather than ModelMixin.to: the latter warns on every dtype cast.
        if device == FAKE_GPU:
            nn.Module.to(module, EXEC_DTYPE)
            self.moves.append(("in", name))
            self.on_exec.add(name)
        else:
            nn.Module.to(module, torch.float32)
            self.moves.append(("out", name))
            self.on_exec.discard(name)
        self.peak = max(self.peak, len(self.on_exec))


def _instrument(offloader: Offloader, units: list[OffloadUnit], runs: list[str]):
    """Probe hooks, run after the offloader's (which are prepended): when a unit's module starts,
    that unit alone must be resident, its weights on the 'GPU' and every other unit's in storage."""

    def probe(unit: OffloadUnit, module: nn.Module, args: tuple) -> None:
        assert offloader.resident == unit.name
        for other in units:
            want = EXEC_DTYPE if other is unit else torch.float32
            assert all(p.dtype == want for p in other.module.parameters()), (unit.name, other.name)
        runs.append(unit.name)

    return [u.module.register_forward_pre_hook(lambda m, a, u=u: probe(u, m, a)) for u in units]


def _check_swaps(moves: list[tuple[str, str]], runs: list[str]) -> None:
    """Each change of the running unit is preceded by exactly: evict the previous, bring in the next."""
    distinct = [name for name, _ in itertools.groupby(runs)]
    swaps = [m for m in moves if m[1] != "<component>"]
    expected: list[tuple[str, str]] = []
    previous = None
    for name in distinct:
        if previous is not None:
            expected.append(("out", previous))
        expected.append(("in", name))
        previous = name
    assert swaps == expected


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("medvram,lowvram,medvram_sdxl,is_sdxl", itertools.product([False, True], repeat=4))
def test_offload_mode_truth_table(medvram, lowvram, medvram_sdxl, is_sdxl):
    if lowvram:
        expected = OffloadMode.LOWVRAM
    elif medvram or (medvram_sdxl and is_sdxl):
        expected = OffloadMode.MEDVRAM
    else:
        expected = OffloadMode.NONE
    assert offload_mode(medvram, lowvram, medvram_sdxl, is_sdxl) is expected


def test_offload_mode_spot_checks():
    assert offload_mode(False, False, True, False) is OffloadMode.NONE  # medvram-sdxl on SD1
    assert offload_mode(False, False, True, True) is OffloadMode.MEDVRAM
    assert offload_mode(True, True, False, False) is OffloadMode.LOWVRAM
    assert OffloadMode("lowvram") is OffloadMode.LOWVRAM


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("mode", [OffloadMode.MEDVRAM, OffloadMode.LOWVRAM])
def test_units_cover_every_tensor_exactly_once(family, mode):
    unet, vae, tes = _components(family)
    units = offload_units(mode, unet, vae, tes)
    names = [u.name for u in units]
    assert len(names) == len(set(names))

    def tensors(modules):
        return [t for m in modules for t in itertools.chain(m.parameters(), m.buffers())]

    in_units = [id(t) for t in tensors(u.module for u in units)]
    everything = {id(t) for t in tensors([unet, vae, *tes])}
    assert len(in_units) == len(set(in_units)), "a tensor belongs to two units"
    assert set(in_units) == everything, "a tensor belongs to no unit"
    # A unit can only be brought in by a hook that fires: each one has a callable trigger.
    for u in units:
        assert u.triggers and not any(isinstance(t, (nn.ModuleList, nn.ModuleDict)) for t in u.triggers)


def test_unit_names():
    unet, vae, tes = _components("sdxl")
    assert [u.name for u in offload_units(OffloadMode.MEDVRAM, unet, vae, tes)] == [
        "text_encoder", "text_encoder_2", "unet", "vae",
    ]
    low = [u.name for u in offload_units(OffloadMode.LOWVRAM, unet, vae, tes)]
    assert low == [
        "text_encoder", "text_encoder_2",
        "unet.conv_in", "unet.time_embedding", "unet.add_embedding",
        "unet.down_blocks.0", "unet.down_blocks.1", "unet.up_blocks.0", "unet.up_blocks.1",
        "unet.mid_block", "unet.conv_norm_out", "unet.conv_out",
        "vae.encoder", "vae.decoder", "vae.quant_conv", "vae.post_quant_conv",
    ]
    assert offload_units(OffloadMode.NONE, unet, vae, tes) == []
    sd1_unet, sd1_vae, sd1_tes = _components("sd1")
    sd1_low = [u.name for u in offload_units(OffloadMode.LOWVRAM, sd1_unet, sd1_vae, sd1_tes)]
    assert "unet.add_embedding" not in sd1_low and sd1_low[0] == "text_encoder"


def test_container_with_own_tensors_is_kept_whole():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.a = nn.Linear(2, 2)

    odd = Odd()
    units = offload_units(OffloadMode.LOWVRAM, odd, None, [])
    assert [u.name for u in units] == ["unet"] and units[0].module is odd


# --------------------------------------------------------------------------- Offloader


@pytest.mark.parametrize("mode", list(OffloadMode))
def test_cpu_only_attach_installs_no_hooks(mode):
    unet, vae, tes = _components("sd1")
    inputs = _unet_inputs(unet, "sd1")
    with torch.no_grad():
        ref = unet(**inputs).sample
    offloader = Offloader(torch.device("cpu"))
    offloader.attach(mode, unet, vae, tes)
    assert _hook_count(unet, vae, *tes) == 0
    assert offloader.units() == [] and offloader.resident is None
    assert all(p.device.type == "cpu" for p in unet.parameters())
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, ref)
    offloader.detach()
    assert _hook_count(unet, vae, *tes) == 0


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lowvram_unet_swaps_one_unit_at_a_time(family):
    unet, vae, tes = _components(family)
    inputs = _unet_inputs(unet, family)
    with torch.no_grad():
        ref = unet(**inputs).sample
    param_ids = [id(p) for p in unet.parameters()]

    units = offload_units(OffloadMode.LOWVRAM, unet, vae, tes)
    recorder = MoveRecorder(units)
    offloader = Offloader(FAKE_GPU, STORAGE, move=recorder)
    offloader.attach(OffloadMode.LOWVRAM, unet, vae, tes)
    assert offloader.units() == [u.name for u in units]
    assert offloader.resident is None and recorder.on_exec == set()
    # The top-level UNet gets no hook: that would pull every block in at once.
    assert len(unet._forward_pre_hooks) == 0
    recorder.moves.clear()

    runs: list[str] = []
    units = [u for u in units if u.name.startswith("unet.")]
    probes = _instrument(offloader, units, runs)
    with torch.no_grad():
        out = unet(**_unet_inputs(unet, family, EXEC_DTYPE)).sample
    assert out.dtype == EXEC_DTYPE
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-6)

    assert set(runs) == {u.name for u in units}, "every UNet unit ran"
    assert runs[0] == "unet.time_embedding" and runs[-1] == "unet.conv_out"
    _check_swaps(recorder.moves, runs)
    assert recorder.peak == 1
    assert offloader.resident == "unet.conv_out"

    for handle in probes:
        handle.remove()
    offloader.detach()
    assert _hook_count(unet, vae, *tes) == 0
    assert offloader.resident is None and recorder.on_exec == set()
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    assert [id(p) for p in unet.parameters()] == param_ids, "Parameters must stay the same objects"
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, ref)


@pytest.mark.parametrize("mode", [OffloadMode.MEDVRAM, OffloadMode.LOWVRAM])
def test_whole_generation_order_sdxl(mode):
    """Text encoders, UNet, then VAE decode and encode (which never call vae.forward)."""
    unet, vae, tes = _components("sdxl")
    ids = torch.tensor([[49406, 320, 2368, 49407] + [49407] * 3])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_te = [te(ids).last_hidden_state for te in tes]
        ref_dec = vae.decode(latents).sample
    all_params = [id(p) for m in (unet, vae, *tes) for p in m.parameters()]

    units = offload_units(mode, unet, vae, tes)
    recorder = MoveRecorder(units)
    offloader = Offloader(FAKE_GPU, STORAGE, move=recorder)
    offloader.attach(mode, unet, vae, tes)
    recorder.moves.clear()
    runs: list[str] = []
    probes = _instrument(offloader, units, runs)
    with torch.no_grad():
        te_out = [te(ids).last_hidden_state for te in tes]
        unet(**_unet_inputs(unet, "sdxl", EXEC_DTYPE))
        dec = vae.decode(latents.to(EXEC_DTYPE)).sample
        vae.encode(dec)
    for got, want in zip(te_out, ref_te):
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dec.float(), ref_dec, rtol=1e-4, atol=1e-5)

    distinct = [name for name, _ in itertools.groupby(runs)]
    if mode is OffloadMode.MEDVRAM:
        # The probes sit on the units' modules; VAE decode/encode reach the VAE only via its children.
        assert distinct == ["text_encoder", "text_encoder_2", "unet"]
        assert [m for m in recorder.moves if m[0] == "in"][-1] == ("in", "vae")
        assert offloader.resident == "vae"
    else:
        assert distinct[:2] == ["text_encoder", "text_encoder_2"]
        assert distinct[-4:] == ["vae.post_quant_conv", "vae.decoder", "vae.encoder", "vae.quant_conv"]
        assert offloader.resident == "vae.quant_conv"
    assert recorder.peak == 1
    if mode is OffloadMode.LOWVRAM:
        _check_swaps(recorder.moves, runs)

    for handle in probes:
        handle.remove()
    offloader.detach()
    assert _hook_count(unet, vae, *tes) == 0
    assert [id(p) for m in (unet, vae, *tes) for p in m.parameters()] == all_params
    assert all(p.dtype == torch.float32 for m in (unet, vae, *tes) for p in m.parameters())


def test_reattach_does_not_stack_hooks():
    unet, vae, tes = _components("sd1")
    units = offload_units(OffloadMode.MEDVRAM, unet, vae, tes)
    offloader = Offloader(FAKE_GPU, STORAGE, move=MoveRecorder(units))
    offloader.attach(OffloadMode.MEDVRAM, unet, vae, tes)
    count = _hook_count(unet, vae, *tes)
    assert count > 0
    offloader.attach(OffloadMode.MEDVRAM, unet, vae, tes)
    assert _hook_count(unet, vae, *tes) == count
    offloader.attach(OffloadMode.NONE, unet, vae, tes)
    assert _hook_count(unet, vae, *tes) == 0 and offloader.units() == []
    offloader.detach()


# --------------------------------------------------------------------------- real GPU


def _nbytes(*modules: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in itertools.chain(m.parameters(), m.buffers()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", [OffloadMode.MEDVRAM, OffloadMode.LOWVRAM])
def test_cuda_offloaded_forward_matches_cpu(mode):
    cuda = torch.device("cuda")
    unet, vae, tes = _components("sdxl")
    inputs = _unet_inputs(unet, "sdxl")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = unet(**inputs).sample
        ref_dec = vae.decode(latents).sample
    param_ids = [id(p) for m in (unet, vae, *tes) for p in m.parameters()]

    offloader = Offloader(cuda)
    offloader.attach(mode, unet, vae, tes)
    assert all(p.device.type == "cpu" for m in (unet, vae, *tes) for p in m.parameters())
    # Warm up kernels and cuBLAS/cuDNN workspaces so the peak below counts weights and activations.
    with torch.no_grad():
        unet(**{k: _to(v, cuda) for k, v in inputs.items()})
    tes[0](torch.tensor([[49406, 49407]], device=cuda))  # leaves a small unit resident
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = unet(**{k: _to(v, cuda) for k, v in inputs.items()}).sample
        dec = vae.decode(latents.to(cuda)).sample
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(dec.cpu(), ref_dec, rtol=1e-3, atol=1e-4)
    whole = _nbytes(unet, vae, *tes)
    assert peak < whole, (peak, whole)
    if mode is OffloadMode.LOWVRAM:
        assert peak < _nbytes(unet), (peak, _nbytes(unet))

    offloader.detach()
    assert [id(p) for m in (unet, vae, *tes) for p in m.parameters()] == param_ids
    assert all(p.device.type == "cpu" for m in (unet, vae, *tes) for p in m.parameters())
    assert _hook_count(unet, vae, *tes) == 0


def _to(value, device):
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value.to(device)
