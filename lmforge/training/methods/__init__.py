"""The training methods by name: ``get_method("sft")``, ``get_method("dpo")``. A method is
``base.TrainingMethod``; a new one is a module here with its collator, batch and loss, and one
entry in ``METHODS``."""

from __future__ import annotations

from lmforge.errors import InvalidRequestError
from lmforge.training.methods.base import MicroBatch, TrainingMethod
from lmforge.training.methods.dpo import DPO
from lmforge.training.methods.sft import SFT

METHODS: dict[str, TrainingMethod] = {SFT.name: SFT, DPO.name: DPO}

__all__ = ["METHODS", "MicroBatch", "TrainingMethod", "get_method"]


def get_method(name: str) -> TrainingMethod:
    """The method registered as ``name``.

    Raises:
        InvalidRequestError: no such method (``param="method"``), naming the known ones.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidRequestError(f"unknown training method {name!r}; the methods are "
                                  f"{', '.join(sorted(METHODS))}", param="method") from None
