"""The commands ``AsyncEngine`` sends to its loop thread, which alone touches the ``LLMEngine``.

Drained at the start of every step (``AsyncEngine._apply``), so an abort frees its request's KV
blocks within one step and a LoRA adapter is added or removed between two steps.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from lmforge.engine.pooling import EmbeddingTask
from lmforge.engine.request import SamplingParams


@dataclass(frozen=True)
class AddRequest:
    """Queue a generation request (``LLMEngine.add_request``)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    after: str | None
    priority: int
    lora: str | None


@dataclass(frozen=True)
class AbortRequest:
    """Abort a generation or embedding request; unknown ids are ignored."""

    request_id: str


@dataclass(frozen=True)
class StartEmbedding:
    """Compute an embedding request a piece per loop iteration (``LLMEngine.start_embedding``)."""

    request_id: str
    priority: int
    task: EmbeddingTask


@dataclass(frozen=True)
class CallOnLoop:
    """Run ``fn(*args)`` on the loop thread between steps; its result or error goes to
    ``future``."""

    future: Future
    fn: Callable[..., Any]
    args: tuple


Command = AddRequest | AbortRequest | StartEmbedding | CallOnLoop
