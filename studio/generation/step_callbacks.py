"""Hooks into the sampling loop, shaped like diffusers' ``callback_on_step_end``.

A :class:`StepCallback` can act at five points of one sampling pass (the first pass, a hires
pass): when it starts, before every UNet call (extra UNet keyword arguments: ControlNet's
residuals; an ``added_cond_kwargs`` dict is merged into the loop's own, so an IP-Adapter's image
embeddings travel next to SDXL's size conditioning and Revision's replace its pooled text; an
``encoder_hidden_states`` replaces the call's text context), right after it (a replacement for the UNet's
prediction: the ControlNet tile colour fix and inpaint_only work there), at the end of every
sampler step (the tensors it declared, and it may hand back new latents), and when the pass ends,
also on an error or an interrupt (token merging patches and un-patches the UNet there). Job
progress and live previews, ControlNet, token merging and extensions all use it, so the loop
itself only denoises.

As in diffusers, a callback declares the tensors it reads (``tensor_inputs``, names from
:data:`TENSOR_INPUTS`; diffusers calls the list ``_callback_tensor_inputs``) and gets only those;
asking for another name is refused before the pass starts. Of them, only the latents may be
handed back (:data:`REPLACEABLE`), with their shape.

Steps are sampler steps, not model calls: Heun at 20 steps calls the UNet 39 times but ends
20 steps, so step-end callbacks run 20 times, on the step's completed latents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# What a step-end callback may read: the latents after the step (scaled, as the VAE decodes them),
# the guided noise prediction of the step's last model call, and the text context of that call
# (``groups`` blocks of ``batch`` rows, the unconditional block first when there is one).
TENSOR_INPUTS = ("latents", "noise_pred", "prompt_embeds")
REPLACEABLE = ("latents",)


@dataclass(frozen=True)
class PassInfo:
    """One sampling pass, as its callbacks see it at the start and the end."""

    model: Any              # the LoadedModel (unet, vae, is_sdxl…)
    steps: int              # sampler steps this pass runs (img2img and hires run part of a schedule)
    seeds: list[int]        # the batch's image seeds


@dataclass(frozen=True)
class ModelCall:
    """One UNet evaluation about to run. Second-order samplers make two per step."""

    index: int              # model call of this pass, from 0 (A1111's denoiser step)
    step: int               # the sampler step it belongs to (prompt schedules count these)
    steps: int              # sampler steps of this pass
    timestep: Any
    sigma: float
    x: torch.Tensor         # UNet input: ``groups`` blocks of ``batch`` images
    context: torch.Tensor   # text context, the same layout
    added: dict[str, Any] | None   # SDXL's added conditioning
    groups: int
    batch: int
    has_uncond: bool        # the first block is the unconditional (negative) one


@dataclass(frozen=True)
class StepEnd:
    """A finished sampler step."""

    index: int              # from 0 to ``total`` - 1
    total: int              # sampler steps of this pass
    timestep: Any           # where the step started
    sigma: float


class StepCallback:
    """Override what you need; every hook does nothing by default."""

    tensor_inputs: Sequence[str] = ()

    def on_pass_start(self, run: PassInfo) -> None:
        pass

    def unet_kwargs(self, call: ModelCall) -> dict[str, Any]:
        """Extra keyword arguments for this UNet call."""
        return {}

    def unet_output(self, call: ModelCall, pred: torch.Tensor) -> torch.Tensor | None:
        """The UNet's raw prediction for ``call`` (before classifier-free guidance, the layout of
        ``call.x``); return a tensor of the same shape to replace it, or None."""
        return None

    def on_step_end(self, step: StepEnd, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """``tensors`` holds the declared ``tensor_inputs``; return replacements (or None)."""
        return None

    def on_pass_end(self, run: PassInfo) -> None:
        pass


class OnStepEnd(StepCallback):
    """A plain function as diffusers takes it: ``fn(step_index, timestep, tensors) -> dict | None``."""

    def __init__(self, fn: Callable[[int, Any, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None],
                 tensor_inputs: Sequence[str] = ("latents",)):
        check_tensor_inputs(tensor_inputs, getattr(fn, "__name__", repr(fn)))
        self.fn = fn
        self.tensor_inputs = tuple(tensor_inputs)

    def on_step_end(self, step: StepEnd, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        return self.fn(step.index, step.timestep, tensors)


def check_tensor_inputs(names: Sequence[str], owner: str) -> None:
    unknown = [name for name in names if name not in TENSOR_INPUTS]
    if unknown:
        raise ValueError(f"step callback {owner} asks for {', '.join(unknown)}; "
                         f"the loop offers {', '.join(TENSOR_INPUTS)}")


def _name(callback: StepCallback) -> str:
    return type(callback).__name__


class StepCallbacks:
    """The callbacks of one pass, run in order (pass ends in reverse order)."""

    def __init__(self, callbacks: Sequence[StepCallback]):
        for callback in callbacks:
            check_tensor_inputs(callback.tensor_inputs, _name(callback))
        self.callbacks = list(callbacks)

    @contextmanager
    def running(self, run: PassInfo) -> Iterator[None]:
        """Start every callback; end the started ones however the pass ends."""
        with ExitStack() as stack:
            for callback in self.callbacks:
                callback.on_pass_start(run)
                stack.callback(callback.on_pass_end, run)
            yield

    def unet_kwargs(self, call: ModelCall) -> dict[str, Any]:
        """The callbacks' arguments for this call, merged. A callback sees in ``call.added`` the
        ``added_cond_kwargs`` of the callbacks before it, so a callback that runs the UNet itself (the
        reference modules' extra pass) gives it what the real call will get (an IP-Adapter's image
        embeddings)."""
        merged: dict[str, Any] = {}
        for callback in self.callbacks:
            seen = call
            if merged.get("added_cond_kwargs"):
                seen = replace(call, added={**(call.added or {}), **merged["added_cond_kwargs"]})
            extra = dict(callback.unet_kwargs(seen))
            added = extra.pop("added_cond_kwargs", None)
            if added:
                _merge_added(merged, added, callback)
            clash = (merged.keys() & extra.keys()) - {"added_cond_kwargs"}
            if clash:
                raise ValueError(f"step callback {_name(callback)} sets UNet argument(s) "
                                 f"{', '.join(sorted(clash))} that another callback already set")
            merged |= extra
        return merged

    def unet_output(self, call: ModelCall, pred: torch.Tensor) -> torch.Tensor:
        """Hand the prediction through every callback; a replacement is what later ones see."""
        import torch
        for callback in self.callbacks:
            out = callback.unet_output(call, pred)
            if out is not None:
                if not isinstance(out, torch.Tensor) or out.shape != pred.shape:
                    raise ValueError(f"step callback {_name(callback)} returned a UNet prediction that is not a "
                                     f"tensor of shape {tuple(pred.shape)}")
                pred = out
        return pred

    def step_end(self, step: StepEnd, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run every callback on the step's tensors; a replacement is what later callbacks see.
        Returns the tensors, replaced ones included."""
        tensors = dict(tensors)
        for callback in self.callbacks:
            out = callback.on_step_end(step, {name: tensors[name] for name in callback.tensor_inputs})
            for name, value in (out or {}).items():
                _check_replacement(callback, name, value, tensors.get(name))
                tensors[name] = value
        return tensors


def _merge_added(merged: dict[str, Any], added: dict[str, Any], callback: StepCallback) -> None:
    """Callbacks' ``added_cond_kwargs`` entries go into one dict; two setting the same entry clash."""
    into = merged.setdefault("added_cond_kwargs", {})
    clash = into.keys() & added.keys()
    if clash:
        raise ValueError(f"step callback {_name(callback)} sets added_cond_kwargs "
                         f"{', '.join(sorted(clash))} that another callback already set")
    into.update(added)


def _check_replacement(callback: StepCallback, name: str, value: Any, current: torch.Tensor | None) -> None:
    import torch
    if name not in callback.tensor_inputs or name not in REPLACEABLE:
        raise ValueError(f"step callback {_name(callback)} returned {name!r}: a callback may only return "
                         f"tensors it declared in tensor_inputs, and of them only {', '.join(REPLACEABLE)}")
    if not isinstance(value, torch.Tensor) or current is None or value.shape != current.shape:
        raise ValueError(f"step callback {_name(callback)} returned {name!r} that is not a tensor of shape "
                         f"{tuple(current.shape) if current is not None else '?'}")
