"""What a checkpoint is, from tensor names and shapes only (A1111's
``guess_model_config_from_state_dict`` rules), never from file names.

diffusers' own ``infer_diffusers_model_type`` keys off widths such as 1024 for SD2 and
falls back to SD1 for anything unusual, which misreads small or pruned models; the
presence of the text-encoder layouts is the reliable signal.
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.families.spec import family_label
from studio.models.state_dict import ModelFileError, Shapes

UNET = "model.diffusion_model."
SD1_TE = "cond_stage_model.transformer."
SD2_TE = "cond_stage_model.model."
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."
REFINER_TE = "conditioner.embedders.0.model."
VAE = "first_stage_model."

# Markers written by v-prediction and zero-terminal-SNR checkpoints that know about them (ComfyUI convention).
V_PRED_KEYS = ("v_pred",)
ZTSNR_KEYS = ("ztsnr",)


@dataclass(frozen=True)
class CheckpointProbe:
    family: str                 # a family id of studio/families/spec.py: "sd1" | "sd2" | "sdxl" | "sd3" | "flux1" ...
    variant: str                # "base" | "inpaint" | "ip2p"; DiT: "dev" | "schnell" | "fill" | "control" | "turbo"
    in_channels: int
    prediction_type: str | None  # "epsilon" | "v_prediction" | None = decide by running the UNet
    has_vae: bool
    has_text_encoder: bool
    # trained with zero terminal SNR (NoobAI-XL v-pred and the like): the ``ztsnr`` marker key
    zero_terminal_snr: bool = False

    @property
    def label(self) -> str:
        text = family_label(self.family)
        if self.variant not in ("base", "dev"):
            text += f" {self.variant}"
        if self.prediction_type == "v_prediction":
            text += " (v-prediction)"
        if self.zero_terminal_snr:
            text += " (ZTSNR)"
        return text


def _has_prefix(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def probe_checkpoint(shapes: Shapes, name: str = "checkpoint") -> CheckpointProbe:
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        if _has_prefix(shapes, "control_model.") or "input_hint_block.0.weight" in shapes:
            raise ModelFileError(f"{name}: this is a ControlNet model; put it in models/ControlNet")
        if "encoder.conv_in.weight" in shapes or "decoder.conv_in.weight" in shapes:
            raise ModelFileError(f"{name}: this is a standalone VAE; put it in models/VAE")
        if any(k.startswith(("lora_unet_", "lora_te")) for k in shapes):
            raise ModelFileError(f"{name}: this is a LoRA; put it in models/Lora")
        raise ModelFileError(
            f"{name}: not a Stable Diffusion checkpoint (no '{UNET}input_blocks.0.0.weight' tensor)"
        )
    in_channels = conv_in[1]
    variant = {9: "inpaint", 8: "ip2p"}.get(in_channels, "base")

    if _has_prefix(shapes, SDXL_TE2):
        family = "sdxl"
    elif _has_prefix(shapes, REFINER_TE):
        family = "sdxl-refiner"
    elif _has_prefix(shapes, SD2_TE):
        family = "sd2"
    else:
        family = "sd1"

    prediction = None if family == "sd2" else "epsilon"
    if any(k in shapes for k in V_PRED_KEYS):
        prediction = "v_prediction"

    te_prefix = {"sd1": SD1_TE, "sd2": SD2_TE, "sdxl": SDXL_TE1, "sdxl-refiner": REFINER_TE}[family]
    return CheckpointProbe(
        family=family,
        variant=variant,
        in_channels=in_channels,
        prediction_type=prediction,
        has_vae=_has_prefix(shapes, VAE),
        has_text_encoder=_has_prefix(shapes, te_prefix),
        zero_terminal_snr=any(k in shapes for k in ZTSNR_KEYS),
    )
