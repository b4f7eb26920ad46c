"""Anyscale's ``llmforge`` fine-tuning YAML (seed 002's ``mistral_dpo_summarization.yaml``) as one
offline run: ``lmforge fine-tune run CONFIG.yaml``.

Keys read (the seed's names):

- ``model_id``: a local GGUF file or HF directory, or a model alias (``smollm2-135m-instruct``).
- ``train_path``, ``valid_path`` (optional: 10% of the training rows are held out), local files.
- ``task``: ``preference_tuning`` (DPO; the preference formats of ``training.preferences``) or
  ``instruction_tuning`` (SFT; the formats of ``training.data``).
- ``context_length`` (-> ``max_seq_len``), ``train_batch_size_per_device`` (-> ``batch_size``),
  ``eval_batch_size_per_device`` (validation and reference batches), ``learning_rate``,
  ``num_epochs``, ``gradient_accumulation_steps``, ``output_dir``, ``seed``.
- ``preference_tuning_config.beta``; ``lora_config.r``, ``lora_alpha``, ``lora_dropout``,
  ``target_modules`` (and PEFT's ``modules_to_save: []``, ``bias: none``, ``fan_in_fan_out:
  false``, ``init_lora_weights: true``, the only values our LoRA has).
- Accepted with no effect in one process, and said so: ``num_data_blocks_per_device``,
  ``no_gradient_checkpoint``, ``flash_attention_2``, ``padding: longest`` (what the collators
  do).

Keys that run on a Ray cluster (``lmforge.cluster.reference_logprobs.run_on_ray`` runs them;
``FinetuneRun.on_ray`` says when):

- ``preference_tuning_config.logprob_processor_scaling_config``: the reference model's log-probs
  on their own Ray actors while training runs (the seed's "logprob processor"):
  ``concurrency`` (actors, each loading the base model once), ``batch_size`` (pairs per call),
  ``custom_resources`` (Ray resources of each actor, e.g. ``accelerator_type:A10G: 1``,
  ``CPU``, ``GPU``).
- ``num_devices``: training workers (default 1, in this process or the ``worker_resources``
  task). Above 1, that many Ray workers train the adapter data-parallel
  (``lmforge.cluster.data_parallel``), each on ``train_batch_size_per_device`` examples per
  micro-batch: an optimizer step is ``train_batch_size_per_device * num_devices *
  gradient_accumulation_steps`` examples, llmforge's global batch, so more devices make fewer
  steps per epoch.
- ``worker_resources``: the Ray resources of each training worker (the one Ray task, or each of
  the ``num_devices`` workers).

Refused with a message saying why, never ignored: ``deepspeed`` (ZeRO shards what LoRA workers
do not need sharded), and any key not listed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import InvalidRequestError
from lmforge.models.lora import LoRAConfig
from lmforge.training.training_config import TrainingConfig

TASKS = {"preference_tuning": "dpo", "instruction_tuning": "sft"}
DEEPSPEED = ("shards the optimizer and weights over several workers (ZeRO), which lmforge does "
             "not do: each LoRA worker keeps the whole adapter, whose optimizer state is small; "
             "remove it (num_devices alone trains data-parallel on Ray workers)")
PROCESSOR = "preference_tuning_config.logprob_processor_scaling_config"
_PROCESSOR_KEYS = {"concurrency", "batch_size", "custom_resources"}
_NO_EFFECT = {"num_data_blocks_per_device": "Ray Data's blocks: the data is read in-process",
              "no_gradient_checkpoint": "gradient checkpointing is not used",
              "flash_attention_2": "attention runs the engine's own kernels"}
_PEFT_FIXED = {"modules_to_save": [], "bias": "none", "fan_in_fan_out": False,
               "init_lora_weights": True}
_PLAIN = {"context_length": "max_seq_len", "train_batch_size_per_device": "batch_size",
          "eval_batch_size_per_device": "eval_batch_size", "learning_rate": "learning_rate",
          "num_epochs": "n_epochs", "gradient_accumulation_steps": "gradient_accumulation_steps",
          "seed": "seed"}
_KNOWN = {"model_id", "train_path", "valid_path", "task", "output_dir", "num_devices",
          "padding", "preference_tuning_config", "lora_config", "deepspeed",
          "worker_resources", *_NO_EFFECT, *_PLAIN}


@dataclass(frozen=True)
class LogprobProcessorConfig:
    """``preference_tuning_config.logprob_processor_scaling_config``: the Ray actors computing
    the DPO reference log-probs while training runs (seed 002's "logprob processor")."""

    concurrency: int = 1  # actors, each with the base model loaded once
    batch_size: int = 8  # pairs per call to an actor (one no-grad forward of up to 8 pairs)
    custom_resources: dict[str, float] = field(default_factory=dict)  # Ray resources per actor


@dataclass
class FinetuneRun:
    """One offline run read from an llmforge YAML: what to train, on what, into where, and on
    which Ray workers when the YAML asks for them."""

    model: str
    train_path: Path
    valid_path: Path | None
    output_dir: Path
    config: TrainingConfig
    notes: list[str] = field(default_factory=list)  # keys accepted with no effect, said so
    logprob_processor: LogprobProcessorConfig | None = None  # reference log-probs on Ray actors
    worker_resources: dict[str, float] | None = None  # each training worker's, on Ray
    num_devices: int = 1  # training workers; above 1 data-parallel on Ray

    @property
    def on_ray(self) -> bool:
        """Part of the run goes to a Ray cluster (``lmforge.cluster.reference_logprobs``)."""
        return (self.logprob_processor is not None or self.worker_resources is not None
                or self.num_devices > 1)


def read_llmforge_config(path: str | Path) -> FinetuneRun:
    """Read and check ``path`` (module docstring); relative data paths are the YAML's folder's.

    Raises:
        InvalidRequestError: unreadable YAML, a missing required key (``model_id``,
            ``train_path``, ``task``), an unknown key or task, ``deepspeed`` (refused:
            ``param`` names it, the message says why), or a value out of range
            (``TrainingConfig.validate``, ``num_devices``, the Ray resources).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise InvalidRequestError(f"cannot read {path}: {e}", param="config") from None
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"{path} must hold a mapping of settings", param="config")
    devices = _devices(raw)
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise InvalidRequestError(f"unknown key(s) {', '.join(unknown)}; the keys are "
                                  f"{', '.join(sorted(_KNOWN))}", param=unknown[0])
    for key in ("model_id", "train_path", "task"):
        if not raw.get(key):
            raise InvalidRequestError(f"{key} is required", param=key)
    if raw["task"] not in TASKS:
        raise InvalidRequestError(f"task {raw['task']!r} is not one of {', '.join(TASKS)}"
                                  + ("; pretraining from scratch is `lmforge pretrain`"
                                     if raw["task"] == "causal_language_modeling" else ""),
                                  param="task")
    if raw.get("padding", "longest") != "longest":
        raise InvalidRequestError("padding must be 'longest' (batches are padded to their "
                                  "longest row)", param="padding")
    config = _training_config(raw)
    base = path.parent
    notes = [f"{key}: no effect here ({why})" for key, why in _NO_EFFECT.items() if key in raw]
    return FinetuneRun(model=_model(str(raw["model_id"]), base),
                       train_path=base / raw["train_path"],
                       valid_path=base / raw["valid_path"] if raw.get("valid_path") else None,
                       output_dir=base / raw.get("output_dir", "output"), config=config,
                       notes=notes, logprob_processor=_processor(raw),
                       worker_resources=_resources("worker_resources",
                                                   raw.get("worker_resources")),
                       num_devices=devices)


def _training_config(raw: dict[str, Any]) -> TrainingConfig:
    values: dict[str, Any] = {ours: raw[theirs] for theirs, ours in _PLAIN.items()
                              if raw.get(theirs) is not None}
    preference = raw.get("preference_tuning_config") or {}
    unknown = sorted(set(preference) - {"beta", "logprob_processor_scaling_config"})
    if unknown:
        raise InvalidRequestError(f"unknown preference_tuning_config key(s) {', '.join(unknown)}",
                                  param=f"preference_tuning_config.{unknown[0]}")
    if "beta" in preference:
        values["beta"] = preference["beta"]
    config = TrainingConfig(method=TASKS[raw["task"]], lora=_lora(raw.get("lora_config") or {}),
                            **{k: _number(k, v) for k, v in values.items()})
    config.validate()
    return config


def _devices(raw: dict[str, Any]) -> int:
    """``num_devices`` (a whole number of at least 1, default 1); refuses ``deepspeed``."""
    if raw.get("deepspeed"):
        raise InvalidRequestError(f"deepspeed {DEEPSPEED}", param="deepspeed")
    devices = raw.get("num_devices", 1)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise InvalidRequestError(f"num_devices must be a whole number of at least 1 (training "
                                  f"workers), got {devices!r}", param="num_devices")
    return devices


def _processor(raw: dict[str, Any]) -> LogprobProcessorConfig | None:
    """The logprob processor's settings, None when the YAML has none (computed in-process)."""
    scaling = (raw.get("preference_tuning_config") or {}).get("logprob_processor_scaling_config")
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise InvalidRequestError(f"{PROCESSOR} must be a mapping of "
                                  f"{', '.join(sorted(_PROCESSOR_KEYS))}", param=PROCESSOR)
    unknown = sorted(set(scaling) - _PROCESSOR_KEYS)
    if unknown:
        raise InvalidRequestError(f"unknown {PROCESSOR} key(s) {', '.join(unknown)}; the keys "
                                  f"are {', '.join(sorted(_PROCESSOR_KEYS))}",
                                  param=f"{PROCESSOR}.{unknown[0]}")
    values: dict[str, Any] = {}
    for key in ("concurrency", "batch_size"):
        if key in scaling:
            value = scaling[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequestError(f"{PROCESSOR}.{key} must be a whole number of at "
                                          f"least 1, got {value!r}", param=f"{PROCESSOR}.{key}")
            values[key] = value
    resources = _resources(f"{PROCESSOR}.custom_resources", scaling.get("custom_resources"))
    return LogprobProcessorConfig(custom_resources=resources or {}, **values)


def _resources(name: str, value: Any) -> dict[str, float] | None:
    """Ray resources ``{name: amount}`` (amounts above 0), None when not given."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            and v > 0 for k, v in value.items()):
        raise InvalidRequestError(f"{name} must map Ray resource names to amounts above 0, "
                                  f"e.g. {{'accelerator_type:A10G': 1}} or {{'CPU': 2}}; got "
                                  f"{value!r}", param=name)
    return {k: float(v) for k, v in value.items()}


def _lora(raw: dict[str, Any]) -> LoRAConfig:
    for key, only in _PEFT_FIXED.items():
        if key in raw and raw[key] != only:
            raise InvalidRequestError(f"lora_config.{key} must be {only!r} (lmforge's LoRA has "
                                      "no other)", param=f"lora_config.{key}")
    known = {"r", "lora_alpha", "lora_dropout", "target_modules", *_PEFT_FIXED}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InvalidRequestError(f"unknown lora_config key(s) {', '.join(unknown)}",
                                  param=f"lora_config.{unknown[0]}")
    values = {k: raw[k] for k in ("r", "lora_alpha", "lora_dropout") if k in raw}
    if raw.get("target_modules"):
        values["target_modules"] = tuple(raw["target_modules"])
    return LoRAConfig(**{k: _number(f"lora_config.{k}", v) if k != "target_modules" else v
                         for k, v in values.items()})


def _number(name: str, value: Any) -> Any:
    """YAML reads ``5e-6`` as a string: numbers written so become floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise InvalidRequestError(f"{name} must be a number, got {value!r}",
                                      param=name) from None
    return value


def _model(model_id: str, base: Path) -> str:
    """A path relative to the YAML's folder when one exists there, else the id as given (an
    absolute path or an alias)."""
    local = base / model_id
    return str(local) if local.exists() else model_id
