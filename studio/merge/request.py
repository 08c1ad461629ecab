"""The Checkpoint Merger's request and result.

A1111 has no merge endpoint; its merger tab calls ``modules/extras.run_modelmerger`` with the
tab's values, so the fields carry those argument names. Everything a user can get wrong without
reading a file (a missing model name, ``ckpt`` output, a bad regular expression or metadata JSON)
is refused when the request is built: the API answers 422 and nothing is queued. What needs the
files (unknown names, mixed families, shapes) is refused by the merge itself, before it writes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from studio.generation.request import door

NO_INTERPOLATION = "No interpolation"
WEIGHTED_SUM = "Weighted sum"
ADD_DIFFERENCE = "Add difference"
INTERP_METHODS = (NO_INTERPOLATION, WEIGHTED_SUM, ADD_DIFFERENCE)
# A1111's "Copy config from" radio (type="index"): the request holds the index.
CONFIG_SOURCES = ("A, B or C", "B", "C", "Don't")
NO_VAE = "None"
CKPT_REFUSED = ("checkpoint_format 'ckpt' is not offered: the studio never writes pickled checkpoints (loading "
                "a pickle can run code); use 'safetensors', which every current UI reads")


class MergeRequest(BaseModel):
    """A1111's Checkpoint Merger inputs. Model names are anything the checkpoint list accepts
    (title, name, model name, hash); ``bake_in_vae`` is a name from the VAE list."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    primary_model_name: str = Field("", description="model A (its title, file name or hash)",
                                    json_schema_extra=door(cli=("-a",), label="Primary model (A)"))
    secondary_model_name: str = Field("", description="model B (not needed for No interpolation)",
                                      json_schema_extra=door(cli=("-b",), label="Secondary model (B)"))
    tertiary_model_name: str = Field("", description="model C (Add difference only)",
                                     json_schema_extra=door(cli=("-c",), label="Tertiary model (C)"))
    interp_method: Literal["No interpolation", "Weighted sum", "Add difference"] = Field(
        WEIGHTED_SUM, description="No interpolation: A alone; Weighted sum: A*(1-M) + B*M; "
                                  "Add difference: A + (B-C)*M",
        json_schema_extra=door(cli=("--method",), label="Interpolation Method"))
    multiplier: float = Field(0.3, ge=0, le=1, description="M",
                              json_schema_extra=door(cli=("-m",), label="Multiplier (M) - set to 0 to get model A"))
    save_as_half: bool = Field(False, description="store 32-bit float tensors as float16",
                               json_schema_extra=door(cli=("--fp16",), label="Save as float16"))
    custom_name: str = Field("", description="output file name, no extension; empty = A1111's name made of the "
                                             "models, method and multiplier",
                             json_schema_extra=door(cli=("--name",), label="Custom Name (Optional)"))
    checkpoint_format: Literal["safetensors", "ckpt"] = Field(
        "safetensors", description="safetensors only ('ckpt' is refused: the studio never writes pickles)",
        json_schema_extra=door(ui=False, label="Checkpoint format"))
    config_source: int = Field(0, ge=0, le=3, description="copy the .yaml config beside an input model to the "
                                                          "output: 0 = A, B or C, 1 = B, 2 = C, 3 = don't",
                               json_schema_extra=door(label="Copy config from"))
    bake_in_vae: str = Field(NO_VAE, description="a VAE whose weights replace the output's own VAE "
                                                 "(first_stage_model.*); None = keep A's",
                             json_schema_extra=door(cli=("--vae",), label="Bake in VAE"))
    discard_weights: str = Field("", description="regular expression: tensors whose names it matches are left out",
                                 json_schema_extra=door(label="Discard weights with matching name"))
    discard_ema: bool = Field(False, description="leave out the EMA weights (model_ema.*); A1111 keeps them "
                                                 "(merged when both models have them, A's otherwise)",
                              json_schema_extra=door(label="Discard EMA weights"))
    save_metadata: bool = Field(True, description="write safetensors metadata",
                                json_schema_extra=door(label="Save metadata"))
    add_merge_recipe: bool = Field(True, description="record the recipe and the input models' hashes "
                                                     "(sd_merge_recipe, sd_merge_models)",
                                   json_schema_extra=door(label="Add merge recipe metadata"))
    copy_metadata_fields: bool = Field(True, description="copy the input models' metadata fields (A, then B, then "
                                                         "C: later ones win)",
                                       json_schema_extra=door(label="Copy metadata from merged models"))
    metadata_json: str = Field("{}", description="a JSON object of metadata fields, written over the copied ones",
                               json_schema_extra=door(label="Metadata in JSON format"))
    overwrite: bool = Field(False, description="replace a file of the same name (otherwise that is an error)",
                            json_schema_extra=door(label="Overwrite an existing file"))

    @field_validator("checkpoint_format", mode="before")
    @classmethod
    def _format_name(cls, value: Any) -> Any:
        return value.strip().lstrip(".").lower() if isinstance(value, str) else value

    @field_validator("bake_in_vae", mode="before")
    @classmethod
    def _vae_name(cls, value: Any) -> Any:
        return NO_VAE if value is None or (isinstance(value, str) and value.strip() in ("", NO_VAE)) else value

    @field_validator("discard_weights")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return value

    @field_validator("metadata_json")
    @classmethod
    def _metadata(cls, value: str) -> str:
        if not value.strip():
            return "{}"
        try:
            parsed = json.loads(value)
        except ValueError as e:
            raise ValueError(f"not valid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object of field names and values")
        return value

    @model_validator(mode="after")
    def _models_given(self) -> MergeRequest:
        # A1111's own messages, without its "Failed: " prefix
        if self.checkpoint_format == "ckpt":
            raise ValueError(CKPT_REFUSED)
        if not self.primary_model_name.strip():
            raise ValueError("Merging requires a primary model.")
        if self.interp_method != NO_INTERPOLATION and not self.secondary_model_name.strip():
            raise ValueError("Merging requires a secondary model.")
        if self.interp_method == ADD_DIFFERENCE and not self.tertiary_model_name.strip():
            raise ValueError(f"Interpolation method ({self.interp_method}) requires a tertiary model.")
        return self

    @property
    def extra_metadata(self) -> dict[str, Any]:
        return json.loads(self.metadata_json or "{}")


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote: the file, the metadata in its header, and what the user should know
    (tensors kept from A because their shapes differ, partial channel merges, a copied config)."""

    path: Path
    notes: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    config_path: Path | None = None

    @property
    def message(self) -> str:
        return f"Checkpoint saved to {self.path}"   # A1111's words

    def api_dict(self) -> dict[str, Any]:
        return {"info": self.message, "path": str(self.path), "name": self.path.name, "notes": list(self.notes),
                "metadata": dict(self.metadata), "config": str(self.config_path) if self.config_path else None}
