"""One entry to the denoising loops: each family's prediction type picks its loop (the SD loop for
eps / v-prediction UNets, the flow loop for SD3/FLUX transformers)."""

from __future__ import annotations

import torch

from studio.generation.flow_sampling import sample_flow
from studio.generation.sampling import BatchSpec, sample
from studio.jobs import JobState


def denoise(model, spec: BatchSpec, state: JobState) -> torch.Tensor:
    if model.spec.is_flow:
        return sample_flow(model, spec, state)
    return sample(model, spec, state)
