"""Training: LoRA fine-tuning (``trainer.py``, ``methods/``), tokenizer training (``bpe.py``) and
pretraining from scratch (``pretraining/``).

``lmforge.training.pretrain(...)`` and ``PretrainConfig`` are importable from here; they load
on first use, so importing another training module does not import the pretraining stack.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"pretrain": "lmforge.training.pretraining",
         "PretrainConfig": "lmforge.training.pretraining",
         "PretrainResult": "lmforge.training.pretraining"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmforge.training' has no attribute {name!r}")
