"""What one pretraining run is: ``PretrainConfig``, from keyword arguments, a YAML file or both.

The names are the command line's (``--n-layer`` is ``n_layer``), nanoGPT's for the model shape
(``n_layer``, ``n_head``, ``n_embd``) and for the optimizer (AdamW with ``beta2`` 0.95, weight
decay 0.1, warmup then cosine down to ``min_lr_ratio`` of the peak, gradient clipping at 1.0).
The defaults make a ~1M-parameter GPT-2 that learns something from a few megabytes of text in
minutes on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import InvalidRequestError

ARCHITECTURES = {"gpt2": "gpt2", "gpt1": "openai-gpt"}  # --arch -> GPTConfig.architecture
DTYPES = ("auto", "float32", "bfloat16")
DEFAULT_MAX_STEPS = 2000  # when neither max_steps nor max_minutes bounds the run

# what a resumed run must share with the run that wrote the checkpoints; the others (how long it
# runs, how often it evaluates and saves) may change between invocations
RUN_IDENTITY = ("train", "valid", "arch", "n_layer", "n_head", "n_embd", "context", "activation",
                "vocab_size", "tokenizer", "batch_size", "gradient_accumulation_steps",
                "learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2",
                "max_grad_norm", "dropout", "seed", "valid_fraction", "dtype")


@dataclass
class PretrainConfig:
    """Hyperparameters of one from-scratch run of a GPT-2 or GPT-1 (``lmforge pretrain``).

    Units: ``context`` and ``batch_size`` in tokens and sequences; a step is one optimizer step
    over ``batch_size * gradient_accumulation_steps`` sequences of ``context`` tokens.
    """

    train: list[str] = field(default_factory=list)  # UTF-8 text files to learn from
    out: str = ""  # the run's directory: checkpoints, token files, then the HF model itself
    valid: list[str] = field(default_factory=list)  # [] = hold out valid_fraction of train
    arch: str = "gpt2"  # "gpt2" (pre-norm, GELU) or "gpt1" (post-norm, GELU; relu as the seed)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    context: int = 128  # the longest sequence the model sees (its learned positions)
    activation: str | None = None  # None = gelu_new (both papers'); or relu, gelu, silu
    tokenizer: str | None = None  # a tokenizer directory; None = train one on ``train``
    vocab_size: int = 2048  # of the tokenizer trained when none is given
    batch_size: int = 16  # sequences per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-3  # peak AdamW rate
    min_lr_ratio: float = 0.1  # the cosine ends at learning_rate * this (nanoGPT, Chinchilla)
    warmup_steps: int = 100  # linear warmup, at most a tenth of the run
    weight_decay: float = 0.1  # on matrices and embeddings, never on biases and norms
    beta1: float = 0.9
    beta2: float = 0.95
    max_grad_norm: float = 1.0  # 0 = no clipping
    dropout: float = 0.0  # embedding and residual dropout
    max_steps: int | None = None  # optimizer steps; with max_minutes, whichever comes first
    max_minutes: float | None = None  # wall-clock budget of the run, over all its invocations
    eval_interval: int = 100  # steps between validation passes
    eval_windows: int = 64  # validation sequences of ``context`` tokens per pass
    checkpoint_interval: int = 100  # steps between checkpoints
    seed: int = 0
    valid_fraction: float = 0.1  # share of the train tokens held out when ``valid`` is empty
    dtype: str = "auto"  # autocast: auto = bfloat16 where the hardware has it, else float32
    device: str = "auto"  # auto = cuda when available, else cpu

    @classmethod
    def from_sources(cls, yaml_file: str | Path | None = None, **overrides: Any
                     ) -> PretrainConfig:
        """The YAML file's keys (dashes or underscores), then every override that is not None
        or empty.

        Raises:
            InvalidRequestError: an unreadable file, an unknown key, or a value ``validate``
                refuses.
        """
        values: dict[str, Any] = {}
        if yaml_file is not None:
            values = _read_yaml(Path(yaml_file))
        values.update({k: v for k, v in overrides.items() if v not in (None, (), [])})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InvalidRequestError(f"unknown pretraining setting(s): {', '.join(unknown)}; "
                                      f"known: {', '.join(sorted(names))}")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        config = cls(**{k: _coerce(k, v, types[k]) for k, v in values.items()})
        config.validate()
        return config

    @property
    def horizon_steps(self) -> int | None:
        """The step the schedule ends at when it is known up front (``max_steps``, or the default
        when the run has no bound); None when only ``max_minutes`` bounds it."""
        if self.max_steps is not None:
            return self.max_steps
        return None if self.max_minutes is not None else DEFAULT_MAX_STEPS

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the checkpoints' run."""
        return {k: getattr(self, k) for k in RUN_IDENTITY}

    def validate(self) -> None:
        """Raises InvalidRequestError naming the first bad setting."""
        if not self.train:
            _bad("train", "give at least one text file to train on")
        if not self.out:
            _bad("out", "give the output directory")
        missing = [p for p in [*self.train, *self.valid] if not Path(p).is_file()]
        if missing:
            _bad("train", f"no such file: {', '.join(missing)}")
        if self.arch not in ARCHITECTURES:
            _bad("arch", f"arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if self.dtype not in DTYPES:
            _bad("dtype", f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("n_layer", "n_head", "n_embd", "context", "batch_size",
                     "gradient_accumulation_steps", "eval_interval", "eval_windows",
                     "checkpoint_interval"):
            if getattr(self, name) < 1:
                _bad(name, f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            _bad("n_embd", f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.max_steps is not None and self.max_steps < 1:
            _bad("max_steps", f"max_steps must be at least 1, got {self.max_steps}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            _bad("max_minutes", f"max_minutes must be positive, got {self.max_minutes}")
        if not 0.0 <= self.dropout < 1.0:
            _bad("dropout", f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.valid_fraction < 1.0:
            _bad("valid_fraction", f"valid_fraction must be in (0, 1), got {self.valid_fraction}")
        if not self.learning_rate > 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            _bad("learning_rate", "learning_rate must be positive and min_lr_ratio in [0, 1]")


def _bad(param: str, message: str) -> None:
    raise InvalidRequestError(message, param=param)


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """A setting as its field's type: YAML reads ``3e-4`` as a string, a file list may be one
    path. Raises InvalidRequestError for a value of the wrong kind."""
    try:
        if annotation.startswith("list"):
            return [str(v) for v in ([value] if isinstance(value, str | Path) else value)]
        if value is None or annotation.startswith("str"):
            return value if value is None else str(value)
        if annotation.startswith("float"):
            return float(value)
        if annotation.startswith("int") and float(value) == int(float(value)):
            return int(float(value))
    except (TypeError, ValueError):
        pass
    raise InvalidRequestError(f"{name} must be {annotation.split(' ')[0]}, got {value!r}",
                              param=name)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InvalidRequestError(f"cannot read the config file {path}: {e}",
                                  param="config") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidRequestError(f"the config file {path} must hold a mapping of settings",
                                  param="config")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
