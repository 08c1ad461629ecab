"""Published full-size SD1.5 / SD2.x / SDXL architectures, built on the meta device.

Used to derive the bundled configs (tools/write_bundled_configs.py), to check in tests that
the shape-based derivation reproduces them from real-layout key names, and by bench/ to make
full-size random-weight checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch

CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768}
OPEN_CLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
               "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 1024}
OPEN_CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                  "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
SD_UNET = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
           "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
           "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}

STANDARD: dict[str, dict[str, Any]] = {
    "sd15": {"family": "sd1", "prediction_type": "epsilon",
             "unet": {**SD_UNET, "cross_attention_dim": 768, "attention_head_dim": 8},
             "text_encoder": CLIP_L},
    "sd2": {"family": "sd2", "prediction_type": "epsilon",
            "unet": {**SD_UNET, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
                     "use_linear_projection": True},
            "text_encoder": OPEN_CLIP_H},
    "sd2-768-v": {"family": "sd2", "prediction_type": "v_prediction",
                  "unet": {**SD_UNET, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
                           "use_linear_projection": True},
                  "text_encoder": OPEN_CLIP_H},
    "sdxl": {"family": "sdxl", "prediction_type": "epsilon",
             "unet": {"block_out_channels": [320, 640, 1280], "layers_per_block": 2,
                      "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                      "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
                      "cross_attention_dim": 2048, "use_linear_projection": True,
                      "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                      "projection_class_embeddings_input_dim": 2816},
             "text_encoder": CLIP_L, "text_encoder_2": OPEN_CLIP_BIGG},
}
for _base in ("sd15", "sd2", "sdxl"):
    _spec = STANDARD[_base]
    STANDARD[f"{_base}-inpaint"] = {**_spec, "unet": {**_spec["unet"], "in_channels": 9}}


def build_components(spec: dict[str, Any], device: str = "meta") -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def te(cfg: dict[str, Any], projection: bool):
        config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                eos_token_id=49407, **cfg)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    with torch.device(device):
        comps: dict[str, Any] = {
            "unet": UNet2DConditionModel(**spec["unet"]),
            "vae": AutoencoderKL(**SD_VAE),
            "text_encoder": te(spec["text_encoder"], False),
            "prediction_type": spec["prediction_type"],
        }
        if "text_encoder_2" in spec:
            comps["text_encoder_2"] = te(spec["text_encoder_2"], True)
    return comps


def full_size_shapes(spec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of a real single-file checkpoint of this architecture."""
    from studio.models.ldm_keys import to_ldm_state_dict

    family = spec["family"] + ("-inpaint" if spec["unet"].get("in_channels") == 9 else "")
    if spec["prediction_type"] == "v_prediction":
        family = "sd2-v"
    sd = to_ldm_state_dict(build_components(spec), family)
    return {k: tuple(v.shape) for k, v in sd.items()}
