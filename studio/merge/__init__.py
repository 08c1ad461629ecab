"""A1111's Checkpoint Merger: weighted sum / add difference of checkpoints, streamed tensor by tensor
into a new ``.safetensors`` file (see :mod:`studio.merge.merger`)."""

from studio.merge.merger import default_name, merge_checkpoints, merge_metadata
from studio.merge.request import CONFIG_SOURCES, INTERP_METHODS, MergeRequest, MergeResult
from studio.merge.safetensors_writer import SafetensorsWriter, TensorSpec

__all__ = [
    "CONFIG_SOURCES",
    "INTERP_METHODS",
    "MergeRequest",
    "MergeResult",
    "SafetensorsWriter",
    "TensorSpec",
    "default_name",
    "merge_checkpoints",
    "merge_metadata",
]
