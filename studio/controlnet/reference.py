"""sd-webui-controlnet's reference preprocessors: ``reference_only``, ``reference_adain`` and
``reference_adain+attn``, which need no ControlNet model.

Each sampling step, before the real UNet call, the UNet runs once more on the reference image's
latents noised to the step's noise level, with the same text context ("write"). That pass leaves
behind, per layer:

- attention (``reference_only``): the input of every self-attention (``attn1``); in the real call
  each self-attention then attends to its own tokens *and* the reference's, so the picture borrows
  the reference's look;
- AdaIN (``reference_adain``): the per-channel mean and variance of the outputs of the UNet's
  middle blocks; the real call's outputs are renormalised to them.

Which layers take part depends on the unit's weight, as in the extension: self-attentions are
ranked by width, widest first, and layer ``i`` of ``n`` takes part when ``weight > i / n``; the
block outputs have weights from the extension's table (``2 * (1 - w / n)`` down the encoder,
``2 * w / n`` up the decoder, 0 for the middle block). Weight 0 therefore changes nothing.

"Style Fidelity" (threshold A, "Balanced" mode only) keeps the unconditional rows of the CFG batch
free of the reference in that proportion, which makes guidance push towards it; "ControlNet is
more important" means fidelity 1, "My prompt is more important" and the hires pass 0; SDXL uses
fidelity cubed (the extension: its attention hack is unstable at higher values).

The UNet is patched through diffusers' attention processors and forward hooks, restored exactly
when the pass ends, so the cached model is unchanged for the next job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from studio.controlnet.units import in_guidance_window
from studio.generation.step_callbacks import ModelCall, PassInfo, StepCallback
from studio.generation.txt2img import encode_images

REFERENCE_MODULES = ("reference_only", "reference_adain", "reference_adain+attn")
_ATTENTION = ("reference_only", "reference_adain+attn")
_ADAIN = ("reference_adain", "reference_adain+attn")
_EPS = 1e-6


def is_reference(module: str) -> bool:
    return module in REFERENCE_MODULES


def style_fidelity(threshold_a: float, control_mode: int, is_sdxl: bool, hires: bool) -> float:
    """The extension's effective fidelity for one unit (``hook.py``)."""
    fidelity = max(0.0, min(1.0, float(threshold_a)))
    if is_sdxl:
        fidelity = fidelity ** 3.0
    if control_mode == 2:      # "ControlNet is more important"
        return 1.0
    if control_mode == 1 or hires:
        return 0.0
    return fidelity


@dataclass
class ReferenceUnit:
    module: str
    image: torch.Tensor        # [1, 3, H, W] in [0, 1] at the pass's size
    weight: float
    guidance_start: float
    guidance_end: float
    threshold_a: float         # style fidelity
    control_mode: int
    seed: int = 0
    latents: torch.Tensor | None = field(default=None, repr=False)

    def active(self, step: int, total: int) -> bool:
        return self.weight > 0 and in_guidance_window(step, total, self.guidance_start, self.guidance_end)


@dataclass
class _Bank:
    """What the write pass left for one layer; emptied by the read."""

    tokens: list[torch.Tensor] = field(default_factory=list)
    means: list[torch.Tensor] = field(default_factory=list)
    variances: list[torch.Tensor] = field(default_factory=list)
    fidelities: list[float] = field(default_factory=list)

    def clear(self) -> None:
        self.tokens.clear(), self.means.clear(), self.variances.clear(), self.fidelities.clear()

    def fidelity(self) -> float:
        return sum(self.fidelities) / len(self.fidelities)


@dataclass
class _Machine:
    """The state every patched layer reads: writing or reading, and the writing unit's settings."""

    writing: bool = False
    attention: bool = False     # this write records attention tokens
    adain: bool = False         # this write records block statistics
    weight: float = 0.0
    fidelity: float = 0.0
    uncond_rows: list[int] = field(default_factory=list)


class _ReferenceAttention:
    """Wraps a self-attention's processor: records its input while writing, attends to it while reading."""

    def __init__(self, inner: Any, machine: _Machine, rank: float):
        self.inner = inner
        self.machine = machine
        self.rank = rank
        self.bank = _Bank()

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, **kwargs: Any) -> torch.Tensor:
        m = self.machine
        if m.writing:
            if m.attention and m.weight > self.rank:
                self.bank.tokens.append(hidden_states.detach().clone())
                self.bank.fidelities.append(m.fidelity)
        elif self.bank.tokens:
            fidelity = self.bank.fidelity()
            context = torch.cat([hidden_states, *(t.to(hidden_states.dtype) for t in self.bank.tokens)], dim=1)
            self.bank.clear()
            with_ref = self.inner(attn, hidden_states, context, attention_mask, temb)
            if not m.uncond_rows or fidelity <= 1e-5:
                return with_ref
            rows = m.uncond_rows
            kept = with_ref.clone()
            kept[rows] = self.inner(attn, hidden_states[rows], None, attention_mask, temb)
            return fidelity * kept + (1.0 - fidelity) * with_ref
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _tensor_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def _with_tensor(output: Any, value: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, tuple):
        return (value, *output[1:])
    output.sample = value
    return output


class _ReferenceStats:
    """A forward hook on one block output: records its statistics while writing, renormalises to them
    while reading (AdaIN)."""

    def __init__(self, machine: _Machine, rank: float):
        self.machine = machine
        self.rank = rank
        self.bank = _Bank()

    def __call__(self, module: Any, args: Any, output: Any) -> Any:
        m = self.machine
        x = _tensor_of(output)
        if m.writing:
            if m.adain and m.weight > self.rank:
                var, mean = torch.var_mean(x.float(), dim=(2, 3), keepdim=True, correction=0)
                self.bank.means.append(mean), self.bank.variances.append(var)
                self.bank.fidelities.append(m.fidelity)
            return None
        if not self.bank.means:
            return None
        fidelity = self.bank.fidelity()
        var, mean = torch.var_mean(x.float(), dim=(2, 3), keepdim=True, correction=0)
        std = var.clamp_min(_EPS) ** 0.5
        mean_ref = sum(self.bank.means) / len(self.bank.means)
        std_ref = (sum(self.bank.variances) / len(self.bank.variances)).clamp_min(_EPS) ** 0.5
        self.bank.clear()
        styled = (x.float() - mean) / std * std_ref + mean_ref
        kept = styled.clone()
        if m.uncond_rows and fidelity > 1e-5:
            kept[m.uncond_rows] = x.float()[m.uncond_rows]
        y = fidelity * kept + (1.0 - fidelity) * styled
        return _with_tensor(output, y.to(x.dtype))


def transformer_blocks(unet: Any) -> list[Any]:
    """The UNet's transformer blocks in the original UNet's order (encoder, middle, decoder), widest
    first (a stable sort, as the extension ranks them)."""
    blocks = []
    for part in (*unet.down_blocks, unet.mid_block, *unet.up_blocks):
        if part is None:
            continue
        blocks += [m for m in part.modules() if type(m).__name__ == "BasicTransformerBlock"]
    return sorted(blocks, key=lambda b: -b.norm1.normalized_shape[0])


def _layer_outputs(block: Any, layers: int) -> list[Any]:
    """The module whose output is each layer's output (the attention after a resnet when there is one)."""
    attentions = getattr(block, "attentions", None)
    return [attentions[j] if attentions is not None else block.resnets[j] for j in range(layers)]


def original_blocks(unet: Any) -> tuple[list[Any], list[Any]]:
    """The modules whose outputs are the original (ldm) UNet's ``input_blocks`` and ``output_blocks``,
    by their index there: the extension's AdaIN layers are named by those indices."""
    inputs: list[Any] = [unet.conv_in]
    for block in unet.down_blocks:
        inputs += _layer_outputs(block, len(block.resnets))
        if getattr(block, "downsamplers", None):
            inputs.append(block.downsamplers[0])
    outputs: list[Any] = []
    for block in unet.up_blocks:
        layers = _layer_outputs(block, len(block.resnets))
        if getattr(block, "upsamplers", None):
            layers[-1] = block.upsamplers[0]   # the original block ends with its upsampler
        outputs += layers
    return inputs, outputs


def _adain_layers(unet: Any, is_sdxl: bool) -> list[tuple[Any, float]]:
    """(module, rank) for the extension's AdaIN layers; layers a small UNet lacks are left out."""
    inputs, outputs = original_blocks(unet)
    input_ids = (4, 5, 7, 8) if is_sdxl else (4, 5, 7, 8, 10, 11)
    output_ids = (0, 1, 2, 3, 4, 5) if is_sdxl else (0, 1, 2, 3, 4, 5, 6, 7)
    layers: list[tuple[Any, float]] = [(unet.mid_block, 0.0)]
    layers += [(inputs[i], 2.0 * (1.0 - w / len(input_ids))) for w, i in enumerate(input_ids) if i < len(inputs)]
    layers += [(outputs[i], 2.0 * w / len(output_ids)) for w, i in enumerate(output_ids) if i < len(outputs)]
    return layers


class ReferenceGuidance(StepCallback):
    """The reference units of one pass (any number; each writes before every model call it is active in)."""

    def __init__(self, units: list[ReferenceUnit], hires: bool = False):
        self.units = units
        self.hires = hires
        self.machine = _Machine()
        self._model: Any = None
        self._saved_processors: dict[str, Any] | None = None
        self._hooks: list[Any] = []
        self._is_sdxl = False

    def on_pass_start(self, run: PassInfo) -> None:
        model = run.model
        unet = model.unet
        self._model, self._is_sdxl = model, bool(model.is_sdxl)
        for unit in self.units:
            pixels = unit.image * 2.0 - 1.0
            unit.latents = encode_images(model, pixels).to(next(unet.parameters()).device)
        if any(u.module in _ATTENTION for u in self.units):
            self._patch_attention(unet)
        if any(u.module in _ADAIN for u in self.units):
            for module, rank in _adain_layers(unet, self._is_sdxl):
                self._hooks.append(module.register_forward_hook(_ReferenceStats(self.machine, rank)))

    def _patch_attention(self, unet: Any) -> None:
        self._saved_processors = dict(unet.attn_processors)
        blocks = [b for b in transformer_blocks(unet) if not b.only_cross_attention]
        by_module = {id(b.attn1): i / len(blocks) for i, b in enumerate(blocks)}
        processors = {}
        for name, processor in self._saved_processors.items():
            owner = unet.get_submodule(name.removesuffix(".processor"))
            rank = by_module.get(id(owner))
            processors[name] = processor if rank is None else _ReferenceAttention(processor, self.machine, rank)
        unet.set_attn_processor(processors)

    def unet_kwargs(self, call: ModelCall) -> dict[str, Any]:
        unet = self._model.unet
        m = self.machine
        m.uncond_rows = list(range(call.batch)) if call.has_uncond else []
        alpha = 1.0 / (1.0 + float(call.sigma) ** 2)
        param = next(unet.parameters())
        for unit in self.units:
            if not unit.active(call.step, call.steps):
                continue
            latents = unit.latents
            generator = torch.Generator("cpu").manual_seed(unit.seed + call.index)
            noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
            x = alpha ** 0.5 * latents + (1.0 - alpha) ** 0.5 * noise
            if unet.config.in_channels == latents.shape[1] + 5:  # inpainting UNets: no mask, the image itself
                x = torch.cat([x, torch.zeros_like(x[:, :1]), latents], dim=1)
            x = x.expand(call.x.shape[0], -1, -1, -1)
            m.writing, m.weight = True, unit.weight
            m.attention, m.adain = unit.module in _ATTENTION, unit.module in _ADAIN
            m.fidelity = style_fidelity(unit.threshold_a, unit.control_mode, self._is_sdxl, self.hires)
            try:
                unet(x.to(param.device, param.dtype), call.timestep, encoder_hidden_states=call.context,
                     added_cond_kwargs=call.added)
            finally:
                m.writing = False
        return {}

    def on_pass_end(self, run: PassInfo) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._saved_processors is not None:
            run.model.unet.set_attn_processor(self._saved_processors)
            self._saved_processors = None
        for unit in self.units:
            unit.latents = None
