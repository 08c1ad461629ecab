"""How each DiT family's transformer is called: one signature for the flow sampling loop,
``denoiser(x, t, context, pooled, guidance) -> velocity``, with the inputs diffusers' own
pipelines build (FLUX's 2x2 packing and position ids, SD3's timestep scale).

``x`` is [N, 16, h, w] latents, ``t`` the scheduler's timestep (sigma x 1000), ``context`` the
text sequence [N, L, D], ``pooled`` [N, P]; ``guidance`` is FLUX's distilled guidance scale
(ignored by models without a guidance embedding).
"""

from __future__ import annotations

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


class FluxDenoiser:
    def __init__(self, transformer: Any, dtype: torch.dtype):
        self.transformer, self.dtype = transformer, dtype
        self.has_guidance = bool(transformer.config.guidance_embeds)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 guidance: float | None, extra: torch.Tensor | None = None,
                 reference: torch.Tensor | None = None) -> torch.Tensor:
        n, _, h, w = x.shape
        tokens = pack_latents(x)
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
        guidance_in = None
        if self.has_guidance:
            guidance_in = torch.full((n,), float(3.5 if guidance is None else guidance), device=device,
                                     dtype=torch.float32)
        out = self.transformer(
            hidden_states=tokens.to(self.dtype), timestep=timestep, guidance=guidance_in,
            pooled_projections=pooled.to(self.dtype), encoder_hidden_states=context.to(self.dtype),
            txt_ids=torch.zeros(context.shape[1], 3, device=device, dtype=self.dtype),
            img_ids=ids, return_dict=False)[0]
        return unpack_latents(out[:, :count].float(), h, w)


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
