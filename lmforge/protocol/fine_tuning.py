"""``/v1/fine_tuning/jobs`` wire schemas (OpenAI API reference, "Fine-tuning"), with lmforge's
LoRA hyperparameters beside OpenAI's three.

OpenAI's ``hyperparameters`` (``n_epochs``, ``batch_size``, ``learning_rate_multiplier``, each a
number or ``"auto"``) may come at the top level (the older form) or under ``method.supervised``;
lmforge adds the LoRA and optimizer settings to the same object (``lora_r``, ``lora_alpha``,
``lora_dropout``, ``target_modules``, ``learning_rate``, ``warmup_ratio``, ``weight_decay``,
``max_seq_len``). A DPO job (``method={"type": "dpo", "dpo": {"hyperparameters": {...}}}``) adds
``beta`` (and TRL's ``loss_type``, ``label_smoothing`` and ``rpo_alpha``). ``resolved()`` gives
one flat dict with ``"auto"`` left as it is: the fine-tune worker picks those from the number of
training examples when it validates the files (``training.hyperparameters.auto_hyperparameters``)
and stores the numbers in the job.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from lmforge.errors import InvalidRequestError
from lmforge.protocol.base import RequestModel, ResponseModel
from lmforge.protocol.statuses import FineTuningStatus

MAX_SUFFIX = 64  # characters, as OpenAI


class Hyperparameters(RequestModel):
    """OpenAI's three (``"auto"`` or absent = picked from the data size) plus lmforge's LoRA
    settings."""

    n_epochs: int | Literal["auto"] | None = Field(default=None)
    batch_size: int | Literal["auto"] | None = None
    learning_rate_multiplier: float | Literal["auto"] | None = None
    lora_r: int | None = Field(default=None, ge=1, le=256)
    lora_alpha: float | None = Field(default=None, gt=0)
    lora_dropout: float | None = Field(default=None, ge=0, lt=1)
    target_modules: list[str] | None = None
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1)
    weight_decay: float | None = Field(default=None, ge=0)
    max_seq_len: int | None = Field(default=None, ge=8)

    def check(self) -> None:
        """Ranges of OpenAI's three (pydantic checks the rest).

        Raises:
            InvalidRequestError: naming the hyperparameter.
        """
        for name, low, high in (("n_epochs", 1, 50), ("batch_size", 1, 256)):
            value = getattr(self, name)
            if isinstance(value, int) and not low <= value <= high:
                raise InvalidRequestError(f"{name} must be between {low} and {high}, got {value}",
                                          param=f"hyperparameters.{name}")
        lrm = self.learning_rate_multiplier
        if isinstance(lrm, float) and not 0 < lrm <= 10:
            raise InvalidRequestError(f"learning_rate_multiplier must be in (0, 10], got {lrm}",
                                      param="hyperparameters.learning_rate_multiplier")


class DpoHyperparameters(Hyperparameters):
    """``method.dpo.hyperparameters``: OpenAI's ``beta`` besides the three, and TRL's loss
    variants (``loss_type``: sigmoid, ipo, hinge, robust; ``label_smoothing``; ``rpo_alpha``,
    the weight of the chosen answers' NLL added to the loss)."""

    beta: float | Literal["auto"] | None = None
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] | None = None
    label_smoothing: float | None = Field(default=None, ge=0, lt=0.5)
    rpo_alpha: float | None = Field(default=None, ge=0)  # TRL's: + alpha * chosen NLL (RPO)

    def check(self) -> None:
        super().check()
        if isinstance(self.beta, float) and not 0 < self.beta <= 2:
            raise InvalidRequestError(f"beta must be in (0, 2], got {self.beta}",
                                      param="method.dpo.hyperparameters.beta")


class SupervisedMethod(RequestModel):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(RequestModel):
    hyperparameters: DpoHyperparameters | None = None


class Method(RequestModel):
    """OpenAI's ``method``: ``{"type": "supervised" | "dpo", "<type>": {"hyperparameters":
    {...}}}``."""

    type: Literal["supervised", "dpo"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


# OpenAI's method type -> lmforge's training method (``training.methods.METHODS``)
TRAINING_METHODS = {"supervised": "sft", "dpo": "dpo"}


class FineTuningJobCreate(RequestModel):
    """``POST /v1/fine_tuning/jobs``."""

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(default=None, max_length=MAX_SUFFIX, pattern=r"^[A-Za-z0-9_.-]*$")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None

    @property
    def method_type(self) -> str:
        """OpenAI's method type: ``"supervised"`` unless ``method`` says otherwise."""
        return self.method.type if self.method else "supervised"

    def resolved(self) -> dict[str, Any]:
        """The hyperparameters from both places, flat (``method``'s win), Nones dropped.

        Raises:
            InvalidRequestError: integrations (not offered); a hyperparameter out of range;
                top-level ``hyperparameters`` or ``method.supervised`` on a DPO job (OpenAI's
                rule: its hyperparameters go in ``method.dpo``), or ``method.dpo`` on a
                supervised one.
        """
        if self.integrations:
            raise InvalidRequestError("integrations (wandb) are not supported by lmforge; the "
                                      "job's events carry its metrics", param="integrations")
        kind = self.method_type
        if kind == "dpo" and self.hyperparameters is not None:
            raise InvalidRequestError("a DPO job takes its hyperparameters in "
                                      "method.dpo.hyperparameters, not at the top level",
                                      param="hyperparameters")
        method = self.method
        other = "supervised" if kind == "dpo" else "dpo"
        if method is not None and getattr(method, other) is not None:
            raise InvalidRequestError(f"method.{other} does not go with method.type {kind!r}",
                                      param=f"method.{other}")
        own = getattr(method, kind) if method is not None else None
        merged: dict[str, Any] = {}
        for source in (self.hyperparameters, own.hyperparameters if own else None):
            if source is not None:
                source.check()
                merged |= source.model_dump(exclude_none=True)
        return merged


class JobError(ResponseModel):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(ResponseModel):
    """As requested until the files are validated, then the numbers used (as OpenAI)."""

    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"


class FineTuningJob(ResponseModel):
    """The OpenAI fine-tuning job object (``organization_id`` is ``"lmforge"``)."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str = "lmforge"
    result_files: list[str] = []
    seed: int
    status: FineTuningStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any] | None = None
    suffix: str | None = None


class FineTuningJobList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool = False


class FineTuningJobEvent(ResponseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"] = "info"
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class FineTuningJobEventList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool = False


class CheckpointMetrics(ResponseModel):
    """OpenAI's checkpoint metrics, and a method's own (DPO: ``eval_rewards/accuracies``, ...)."""

    model_config = ConfigDict(extra="allow")

    step: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    full_valid_loss: float | None = None


class FineTuningJobCheckpoint(ResponseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class FineTuningJobCheckpointList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
