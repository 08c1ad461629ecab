"""The Detailer: find faces / hands / people and inpaint each at full resolution with its own
prompt and settings — what the ADetailer extension does, with its API arguments and infotext.

- :mod:`~studio.detailer.args`: ``alwayson_scripts.ADetailer.args`` → :class:`DetailerConfig`;
- :mod:`~studio.detailer.detectors`: the detectors by name (built-in, extensions', YOLO files);
- :mod:`~studio.detailer.masks`: detections → inpaint masks;
- :mod:`~studio.detailer.run`: the loop, with the engine's inpaint passed in.
"""

from studio.detailer.args import (
    ADETAILER_COMPAT_VERSION,
    DetailerConfig,
    DetailerUnit,
    detailer_from_alwayson,
    parse_adetailer,
)
from studio.detailer.detectors import MEDIAPIPE_MODELS, DetectorRegistry
from studio.detailer.masks import Detection
from studio.detailer.run import InpaintFn, expand_prompts, inpaint_overrides, run_detailer
from studio.restore.face_boxes import Box

__all__ = [
    "ADETAILER_COMPAT_VERSION", "Box", "Detection", "DetailerConfig", "DetailerUnit", "DetectorRegistry",
    "InpaintFn", "MEDIAPIPE_MODELS", "detailer_from_alwayson", "expand_prompts", "inpaint_overrides",
    "parse_adetailer", "run_detailer",
]
