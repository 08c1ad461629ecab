"""How each DiT family's transformer is called: one signature for the flow sampling loop,
``denoiser(x, t, context, pooled, guidance) -> velocity``, with the inputs diffusers' own
pipelines build (FLUX's 2x2 packing and position ids, SD3's timestep scale).

``x`` is [N, 16, h, w] latents, ``t`` the scheduler's timestep (sigma x 1000), ``context`` the
text sequence [N, L, D], ``pooled`` [N, P]; ``guidance`` is FLUX's distilled guidance scale
(ignored by models without a guidance embedding).

FLUX.1 also takes ControlNets: ``controlnets=[FluxControl, ...]`` (what
:class:`studio.controlnet.flux_controlnet.FluxControlGuidance` hands the loop) runs each one on the
transformer's own inputs and adds their block samples, as diffusers' ``FluxControlNetPipeline`` does;
``prompt_tokens=ExtraPromptTokens`` (FLUX.1 Redux's image tokens) follow the prompt's tokens in the
prompt's rows, as diffusers' ``FluxPriorReduxPipeline`` hands them to ``FluxPipeline``;
``ip_adapter_image_embeds`` go to an installed IP-Adapter through the transformer's
``joint_attention_kwargs``, as ``FluxPipeline`` passes them. A denoiser
lists the keyword arguments it takes beyond the common ones in ``extra_kwargs``; the loop refuses
others for its family.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N, h/2 * w/2, 4C]: FLUX's 2x2 patches as tokens (diffusers' ``_pack_latents``)."""
    n, c, h, w = latents.shape
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n, _, d = tokens.shape
    x = tokens.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, h, w)


def image_ids(h: int, w: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """(row, column) position ids of the packed tokens, FLUX's RoPE input: [h/2 * w/2, 3]."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class FluxControl:
    """One FLUX ControlNet for one transformer call."""

    model: Any              # diffusers FluxControlNetModel
    cond: torch.Tensor      # [1, tokens, 64] packed control latents; [1, 3, H, W] pixels in [-1, 1] for
                            # models with an input_hint_block (XLabs')
    weight: float
    mode: int | None = None     # a Union model's control mode
    uncond_rows: int = 0        # leading rows (the unconditional block) that get no control


@dataclass(frozen=True)
class ExtraPromptTokens:
    """Tokens that follow the prompt's in every row after the first ``uncond_rows`` (the negative
    prompt's block, which is computed without them)."""

    tokens: torch.Tensor    # [T, context width]
    uncond_rows: int = 0


def _rows(value: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if value is None else value[start:stop]


def _control_rows(controls: Sequence[FluxControl], start: int, stop: int) -> list[FluxControl]:
    """The ControlNets of rows ``start:stop`` of a call (their maps are shared by every row; only how
    many leading rows get no control changes)."""
    return [replace(c, uncond_rows=max(0, min(c.uncond_rows, stop) - start)) for c in controls]


def _per_block(samples: Sequence[torch.Tensor] | None, blocks: int, repeat: bool) -> list[torch.Tensor] | None:
    """A ControlNet's samples spread over the transformer's ``blocks`` the way FluxTransformer2DModel
    indexes them (every ``ceil(blocks / len)`` blocks share one; XLabs' models cycle), so that units
    with different block counts can be added block by block."""
    if not samples:
        return None
    if repeat:
        return [samples[i % len(samples)] for i in range(blocks)]
    interval = math.ceil(blocks / len(samples))
    return [samples[i // interval] for i in range(blocks)]


def _summed(per_unit: list[list[torch.Tensor]], pad: int) -> list[torch.Tensor] | None:
    """Block-wise sums of the units' samples; blocks reading the same samples share one sum (a single
    unit's list holds its own tensors). ``pad`` zero tokens follow (Kontext's reference tokens get no
    control)."""
    if not per_unit:
        return None
    cache: dict[tuple[int, ...], torch.Tensor] = {}
    out = []
    for parts in zip(*per_unit):
        key = tuple(id(p) for p in parts)
        if key not in cache:
            total = parts[0]
            for p in parts[1:]:
                total = total + p
            if pad:
                total = torch.cat([total, total.new_zeros(total.shape[0], pad, total.shape[2])], dim=1)
            cache[key] = total
        out.append(cache[key])
    return out


class FluxDenoiser:
    extra_kwargs = ("controlnets", "prompt_tokens", "ip_adapter_image_embeds")

    def __init__(self, transformer: Any, dtype: torch.dtype):
        self.transformer, self.dtype = transformer, dtype
        self.has_guidance = bool(transformer.config.guidance_embeds)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 guidance: float | None, extra: torch.Tensor | None = None,
                 reference: torch.Tensor | None = None, controlnets: Sequence[FluxControl] = (),
                 prompt_tokens: ExtraPromptTokens | None = None,
                 ip_adapter_image_embeds: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        n, _, h, w = x.shape
        if prompt_tokens is not None:
            k = prompt_tokens.uncond_rows
            if k:   # the negative rows without the extra tokens, the prompt's with them: two calls
                ip_head = [e[:k] for e in ip_adapter_image_embeds] if ip_adapter_image_embeds else None
                ip_tail = [e[k:] for e in ip_adapter_image_embeds] if ip_adapter_image_embeds else None
                head = self(x[:k], t, context[:k], _rows(pooled, 0, k), guidance, _rows(extra, 0, k),
                            _rows(reference, 0, k), _control_rows(controlnets, 0, k), None, ip_head)
                tail = self(x[k:], t, context[k:], _rows(pooled, k, n), guidance, _rows(extra, k, n),
                            _rows(reference, k, n), _control_rows(controlnets, k, n),
                            replace(prompt_tokens, uncond_rows=0), ip_tail)
                return torch.cat([head, tail])
            extra_tokens = prompt_tokens.tokens.to(context.device, context.dtype)
            context = torch.cat([context, extra_tokens.expand(n, *extra_tokens.shape)], dim=1)
        latent_tokens = pack_latents(x)
        tokens = latent_tokens
        if extra is not None:   # FLUX Fill / Control: more channels after the packed latents
            tokens = torch.cat([tokens, extra.to(tokens.dtype)], dim=-1)
        device = x.device
        ids = image_ids(h, w, device, self.dtype)
        count = tokens.shape[1]
        if reference is not None:
            # FLUX Kontext: the image to edit follows as more tokens, told apart by the first id axis
            ref_h, ref_w = reference.shape[2:]
            tokens = torch.cat([tokens, pack_latents(reference).to(tokens.dtype)], dim=1)
            ref_ids = image_ids(ref_h, ref_w, device, self.dtype)
            ref_ids[:, 0] = 1
            ids = torch.cat([ids, ref_ids])
        timestep = (t.expand(n).to(device) / 1000).to(self.dtype)
        scale = float(3.5 if guidance is None else guidance)
        guidance_in = None
        if self.has_guidance:
            guidance_in = torch.full((n,), scale, device=device, dtype=torch.float32)
        txt_ids = torch.zeros(context.shape[1], 3, device=device, dtype=self.dtype)
        control = {}
        if controlnets:
            inputs = dict(hidden_states=latent_tokens, timestep=timestep, guidance=scale,
                          pooled_projections=pooled, encoder_hidden_states=context, txt_ids=txt_ids,
                          img_ids=ids[:count])
            control = self._control(controlnets, inputs, tokens.shape[1] - count)
        if ip_adapter_image_embeds:   # an installed FLUX IP-Adapter's image embeddings, one per adapter
            control["joint_attention_kwargs"] = {
                "ip_adapter_image_embeds": [e.to(device, self.dtype) for e in ip_adapter_image_embeds]}
        out = self.transformer(
            hidden_states=tokens.to(self.dtype), timestep=timestep, guidance=guidance_in,
            pooled_projections=pooled.to(self.dtype), encoder_hidden_states=context.to(self.dtype),
            txt_ids=txt_ids, img_ids=ids, return_dict=False, **control)[0]
        return unpack_latents(out[:, :count].float(), h, w)

    def _control(self, controlnets: Sequence[FluxControl], inputs: dict[str, Any], pad: int) -> dict[str, Any]:
        """The transformer's ``controlnet_block_samples`` / ``controlnet_single_block_samples``: every
        ControlNet run on the transformer's own inputs (image tokens only), scaled by its weight,
        spread over the transformer's blocks and added up."""
        double, single = [], []
        n = inputs["hidden_states"].shape[0]
        for c in controlnets:
            model = c.model
            dtype = next(model.parameters()).dtype
            device = inputs["hidden_states"].device
            if c.cond.ndim == 3 and c.cond.shape[1] != inputs["hidden_states"].shape[1]:
                raise ValueError(f"FLUX ControlNet map has {c.cond.shape[1]} tokens, the latents "
                                 f"{inputs['hidden_states'].shape[1]}: the map must be at the pass size")
            mode = None
            if c.mode is not None:
                mode = torch.full((n, 1), c.mode, device=device, dtype=torch.long)
            guidance = None
            if model.config.guidance_embeds:
                guidance = torch.full((n,), inputs["guidance"], device=device, dtype=torch.float32)
            blocks, singles = model(
                hidden_states=inputs["hidden_states"].to(dtype),
                controlnet_cond=c.cond.to(device, dtype).expand(n, *c.cond.shape[1:]), controlnet_mode=mode,
                conditioning_scale=c.weight, timestep=inputs["timestep"].to(dtype), guidance=guidance,
                pooled_projections=inputs["pooled_projections"].to(dtype),
                encoder_hidden_states=inputs["encoder_hidden_states"].to(dtype),
                txt_ids=inputs["txt_ids"], img_ids=inputs["img_ids"], return_dict=False)
            if c.uncond_rows:
                keep = torch.ones(n, 1, 1, device=device, dtype=dtype)
                keep[:c.uncond_rows] = 0
                blocks = [b * keep for b in blocks] if blocks else blocks
                singles = [s * keep for s in singles] if singles else singles
            repeat = model.input_hint_block is not None   # XLabs' few blocks cycle over the transformer's
            blocks = _per_block([b.to(self.dtype) for b in blocks or ()],
                                len(self.transformer.transformer_blocks), repeat)
            singles = _per_block([s.to(self.dtype) for s in singles or ()],
                                 len(self.transformer.single_transformer_blocks), False)
            if blocks is not None:
                double.append(blocks)
            if singles is not None:
                single.append(singles)
        return {"controlnet_block_samples": _summed(double, pad),
                "controlnet_single_block_samples": _summed(single, pad)}


class SD3Denoiser:
    def __init__(self, transformer: Any, dtype: torch.dtype):
        self.transformer, self.dtype = transformer, dtype
        self.has_guidance = False

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 guidance: float | None, extra: torch.Tensor | None = None,
                 reference: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        return self.transformer(
            hidden_states=x.to(self.dtype), timestep=t.expand(n).to(x.device),
            encoder_hidden_states=context.to(self.dtype), pooled_projections=pooled.to(self.dtype),
            return_dict=False)[0].float()
