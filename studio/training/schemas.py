"""The typed schema of each kind of training request, the one the doors derive from: the body of
``POST /sdapi/v1/train/lora`` (plus ``wait``), the flags of ``studio train lora|embedding|hypernetwork``
and the Train tab's forms. A field added here (or in a subclass handed to the studio through
:class:`TrainingSchemas`) is an API field, a CLI flag and a UI control with nothing else changed.

A1111's own ``/train/embedding`` and ``/train/hypernetwork`` keep A1111's bodies (studio.api.training),
which are turned into these settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from studio.generation.request import door
from studio.training.base import MAX_TRAIN_STEPS, TEMPLATE_NAMES, LrScheduler, TrainSettings
from studio.training.lora_settings import LoraSettings

EMBEDDING_LR = "0.005"           # A1111's Train tab defaults
HYPERNETWORK_LR = "0.00001"

_TEMPLATE = (f"prompt template: a built-in one ({', '.join(TEMPLATE_NAMES)}), its lines with [name] and "
             "[filewords], or on the command line a text file of them")
_SCHEDULE = ("learning rate, or an A1111 schedule of rate:until-step pairs like \"0.005:100, 1e-3:1000, 1e-5\" "
             "(the run stops where the schedule ends)")


class TrainLoraRequest(LoraSettings, TrainSettings):
    """A LoRA run: the run's settings and the LoRA's in one object, which is both a
    :class:`TrainSettings` and a :class:`LoraSettings`, so the loop and the trainable each read
    theirs and a field a subclass adds reaches the engine."""


class TrainEmbeddingRequest(TrainSettings):
    """Training an existing embedding (A1111's Train tab): a learning-rate schedule instead of a rate,
    a scheduler and warmup, and a prompt template. The output is the embedding itself."""

    learn_rate: str = Field(EMBEDDING_LR, min_length=1, description=_SCHEDULE,
                            json_schema_extra=door(cli=("--lr",), label="Learning rate"))
    template: str | None = Field("subject_filewords", description=_TEMPLATE,
                                 json_schema_extra=door(label="Prompt template"))
    steps: int = Field(1000, ge=1, le=MAX_TRAIN_STEPS, description="optimizer steps (at most; a schedule may "
                       "end sooner)")
    # the schedule replaces these, and the file trained is the output: hidden from every door
    learning_rate: SkipJsonSchema[float] = Field(1e-4, gt=0, exclude=True)
    lr_scheduler: SkipJsonSchema[LrScheduler] = Field("constant", exclude=True)
    lr_warmup_steps: SkipJsonSchema[int] = Field(0, ge=0, exclude=True)
    overwrite: SkipJsonSchema[bool] = Field(False, exclude=True)


class TrainHypernetworkRequest(TrainEmbeddingRequest):
    """Training an existing hypernetwork: as an embedding, with A1111's defaults for a hypernetwork."""

    learn_rate: str = Field(HYPERNETWORK_LR, min_length=1, description=_SCHEDULE,
                            json_schema_extra=door(cli=("--lr",), label="Learning rate"))
    template: str | None = Field("style_filewords", description=_TEMPLATE,
                                 json_schema_extra=door(label="Prompt template"))


@dataclass(frozen=True)
class TrainingSchemas:
    """The training schema of each kind that the doors derive from. A test (or a later feature) hands
    the studio subclasses with more fields and sees them in the UI, the CLI and /docs."""

    lora: type[TrainLoraRequest] = TrainLoraRequest
    embedding: type[TrainEmbeddingRequest] = TrainEmbeddingRequest
    hypernetwork: type[TrainEmbeddingRequest] = TrainHypernetworkRequest

    def of(self, kind: str) -> type[TrainSettings]:
        return {"lora": self.lora, "embedding": self.embedding, "hypernetwork": self.hypernetwork}[kind]


def training_schemas(schemas: Any = None) -> TrainingSchemas:
    """The training schemas of a studio: ``schemas`` itself when it is a :class:`TrainingSchemas`, the
    ``training`` member of the studio's request schemas when they have one, else the defaults."""
    if isinstance(schemas, TrainingSchemas):
        return schemas
    found = getattr(schemas, "training", None)
    return found if isinstance(found, TrainingSchemas) else TrainingSchemas()
