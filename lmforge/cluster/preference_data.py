"""The preference pipeline's stages on Ray Data (``ray_address`` in its config): a stage's
requests become a dataset, ``map_batches`` sends each batch from a Ray task with the same
``openai`` client the pipeline uses in-process (``preference.endpoint.Endpoint.complete``), and
the driver hands each reply to the stage's callback, which appends its line to the stage's log.

Data flow of one stage::

    calls (driver: only the keys its log lacks)
        --ray.data.from_items--> map_batches(send_calls, batch_size=max_concurrency)
        --iter_batches, in call order (driver)--> on_result(call, texts) -> the stage's JSONL

So the files, their resumption (a killed run's log keeps every line already appended; a rerun
asks only for the rest) and the statistics are those of the in-process run. The lines arrive in
the stages' call order (``preserve_order``), where the in-process run appends them in the order
replies arrive. The driver's event loop waits while a stage runs on the cluster: nothing else
runs in it meanwhile.

Only this package imports Ray; ``preference.endpoint`` imports this module inside the call that
needs it, so the pipeline without ``ray_address`` never touches Ray.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from lmforge.cluster.ray_env import RayUnavailableError, connect
from lmforge.preference.config import EndpointConfig
from lmforge.preference.endpoint import Call, Endpoint, StageStats
from lmforge.preference.errors import PipelineError

# a task mostly waits on HTTP: a quarter CPU each lets a 4-CPU cluster run 16 batches at once
TASK_CPUS = 0.25


def send_on_ray(endpoint: Endpoint, calls: list[Call],
                on_result: Callable[[Call, list[str]], None], stats: StageStats,
                stage: str) -> None:
    """Send ``calls`` to ``endpoint`` from Ray Data tasks on the cluster at
    ``endpoint.ray_address`` and call ``on_result(call, choice_texts)`` here, in call order, for
    each call that succeeded; a failed call is counted in ``stats`` (as ``Endpoint.run`` does).

    Raises:
        PipelineError: Ray is missing (the message names ``pip install 'lmforge[ray]'``), or
            no cluster answers at the address.
    """
    try:
        ray = connect(endpoint.ray_address)
    except RayUnavailableError as exc:  # the pipeline's CLI prints its own errors in one line
        raise PipelineError(f"ray_address {endpoint.ray_address!r}: {exc}") from exc
    by_key = {call.key: call for call in calls}
    items = [{"key": c.key, "call": json.dumps({"messages": c.messages, "params": c.params,
                                                "schema": c.schema}, ensure_ascii=False)}
             for c in calls]
    replies = ray.data.from_items(items).map_batches(
        send_calls, fn_kwargs={"config": endpoint.config, "model": endpoint.model,
                               "structured": stats.structured},
        batch_size=endpoint.config.max_concurrency, num_cpus=TASK_CPUS)
    replies.context.execution_options.preserve_order = True
    with tqdm(total=len(calls), desc=f"{stage} (ray)", unit="req", leave=False) as bar:
        for batch in replies.iter_batches(batch_size=None, batch_format="numpy"):
            for key, texts, error in zip(batch["key"], batch["texts"], batch["error"]):
                if error:
                    stats.fail(str(error))
                else:
                    on_result(by_key[str(key)], json.loads(texts))
                    stats.succeeded += 1
            bar.update(len(batch["key"]))


def send_calls(batch: dict[str, Any], config: EndpointConfig, model: str | None,
               structured: bool) -> dict[str, list[str]]:
    """The ``map_batches`` function: send a batch's calls at once (they are at most
    ``max_concurrency``) and return ``key``, ``texts`` (the choices as JSON text, ``""`` on
    failure) and ``error`` (``""`` on success) per call, in the batch's order."""
    calls = [Call(str(key), **_call_fields(raw)) for key, raw in zip(batch["key"], batch["call"])]
    replies = asyncio.run(_send(calls, Endpoint(config, model, _structured=structured),
                                structured))
    return {"key": [c.key for c in calls],
            "texts": [json.dumps(texts) if texts is not None else "" for texts, _ in replies],
            "error": [error for _, error in replies]}


def _call_fields(raw: str) -> dict[str, Any]:
    fields = json.loads(raw)
    schema = fields.pop("schema")
    return {**fields, "schema": tuple(schema) if schema is not None else None}


async def _send(calls: list[Call], endpoint: Endpoint, structured: bool
                ) -> list[tuple[list[str] | None, str]]:
    try:
        return await asyncio.gather(*(endpoint.complete(c, structured) for c in calls))
    finally:
        await endpoint.aclose()
