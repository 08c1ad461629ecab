"""The options of a LoRA / LoCon training run (:class:`LoraSettings`), apart from the training code
(studio.training.lora, torch and peft): the API and the UI build their forms from it at start-up."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from studio.generation.request import door
from studio.training.base import settings_error

MAX_RANK = 1024
MAX_ALPHA = 1e6
_NETWORK = "network (LoRA)"   # the CLI's argument group of these fields


class LoraSettings(BaseModel):
    """kohya ``train_network.py`` options of a LoRA (kohya's names in the descriptions). Frozen, ranges
    on the fields like :class:`~studio.training.base.TrainSettings`."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rank: int = Field(8, ge=1, le=MAX_RANK, description="network dim (kohya network_dim)",
                      json_schema_extra=door(group=_NETWORK, label="Rank (dim)"))
    alpha: float = Field(8.0, ge=0, le=MAX_ALPHA, description="network alpha (kohya network_alpha); 0 = rank",
                         json_schema_extra=door(group=_NETWORK))
    conv_rank: int = Field(0, ge=0, le=MAX_RANK, description="rank of the conv layers (LoCon, kohya conv_dim); "
                           "0 = none", json_schema_extra=door(group=_NETWORK))
    conv_alpha: float = Field(1.0, ge=0, le=MAX_ALPHA, description="conv layers' alpha (kohya conv_alpha); "
                              "0 = conv_rank", json_schema_extra=door(group=_NETWORK))
    train_unet: bool = Field(True, description="train the UNet (off: kohya network_train_text_encoder_only)",
                             json_schema_extra=door(group=_NETWORK))
    train_text_encoder: bool = Field(False, validate_default=True,   # checked with train_unet's default too
                                     description="train the text encoder(s) too (off: kohya "
                                     "network_train_unet_only)", json_schema_extra=door(group=_NETWORK))
    unet_lr: float | None = Field(None, gt=0, le=10, description="UNet learning rate; empty = learning_rate",
                                  json_schema_extra=door(group=_NETWORK, label="UNet learning rate"))
    text_encoder_lr: float | None = Field(None, gt=0, le=10, description="text encoder learning rate; "
                                          "empty = learning_rate",
                                          json_schema_extra=door(group=_NETWORK, cli=("--te-lr",)))
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (peft lora_dropout, on the LoRA's "
                           "input); 0 = none", json_schema_extra=door(group=_NETWORK, label="Network dropout"))

    @field_validator("train_text_encoder")
    @classmethod
    def _trains_something(cls, value: bool, info: ValidationInfo) -> bool:
        if not value and info.data.get("train_unet") is False:
            raise settings_error("a LoRA must train the UNet, the text encoder, or both")
        return value

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha) if self.alpha else float(self.rank)

    @property
    def effective_conv_alpha(self) -> float:
        return float(self.conv_alpha) if self.conv_alpha else float(self.conv_rank)
