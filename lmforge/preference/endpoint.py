"""One OpenAI-compatible endpoint, as the pipeline uses it: many chat requests, each answered by
one callback, through ``/v1/batches`` when the stage is large and the server has the route, else
as bounded concurrent requests. The client is the ``openai`` SDK (``AsyncOpenAI``), so the judge
or the policy may be this lmforge server, another one, vLLM, or OpenAI itself.

A batch's id is written to ``<state_dir>/<stage>.batch.json`` before it is awaited, so a run
killed while a batch runs re-attaches to it when restarted instead of paying for it twice.

With ``ray_address`` (the config's), a stage's requests go out from Ray Data tasks instead
(``lmforge.cluster.preference_data``, imported only then): the same requests and callbacks, sent
from the cluster's machines; ``/v1/batches`` is not used.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import openai
from tqdm import tqdm

from lmforge.preference.config import EndpointConfig
from lmforge.preference.errors import PipelineError
from lmforge.preference.parsing import response_format

_DONE = {"completed", "failed", "expired", "cancelled"}
_PROBE_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok"],
                 "properties": {"ok": {"type": "boolean"}}}


@dataclass
class Call:
    """One chat request: ``key`` identifies its result line; ``schema`` = (name, JSON schema) is
    sent as a ``response_format`` only where the endpoint honours it."""

    key: str
    messages: list[dict]
    params: dict  # max_tokens, temperature, top_p, n, ...
    schema: tuple[str, dict] | None = None


@dataclass
class StageStats:
    """What one stage's requests came to: every number a report quotes rests on these."""

    requests: int = 0
    succeeded: int = 0
    errors: int = 0
    first_error: str | None = None
    via: str = "requests"  # "requests", "batch" (/v1/batches) or "ray" (Ray Data tasks)
    structured: bool = False

    def fail(self, message: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or message[:500]


@dataclass
class Endpoint:
    """``config``'s server, with what it supports probed once (``structured()``,
    ``has_batches()``)."""

    config: EndpointConfig
    model: str | None = None  # ask this model instead of config.model (evaluation, iterations)
    ray_address: str | None = None  # send from Ray Data tasks on this cluster (config.py)
    _client: openai.AsyncOpenAI | None = field(default=None, repr=False)
    _structured: bool | None = None
    _batches: bool | None = None

    @property
    def client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            self._client = openai.AsyncOpenAI(base_url=self.config.base_url,
                                              api_key=self.config.key(),
                                              timeout=self.config.timeout, max_retries=2)
        return self._client

    @property
    def model_name(self) -> str:
        return self.model or self.config.model

    async def aclose(self) -> None:
        """Close the HTTP client (before the event loop that made it ends)."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def structured(self) -> bool:
        """Whether JSON-schema response formats are honoured: the config's answer, or (auto) one
        probe request whose reply must parse as the probe's schema."""
        if self._structured is None:
            setting = self.config.structured_output
            self._structured = setting if isinstance(setting, bool) else await self._probe()
        return self._structured

    async def _probe(self) -> bool:
        try:
            reply = await self.client.chat.completions.create(
                model=self.model_name, max_tokens=16, temperature=0,
                messages=[{"role": "user", "content": 'Reply {"ok": true} in JSON.'}],
                response_format=response_format("probe", _PROBE_SCHEMA))
            value = json.loads(reply.choices[0].message.content or "")
            return isinstance(value, dict) and isinstance(value.get("ok"), bool)
        except (openai.APIStatusError, json.JSONDecodeError, IndexError):
            return False

    async def has_batches(self) -> bool:
        """Whether the server has ``/v1/batches`` (the config's answer, or a ``list`` call)."""
        if self._batches is None:
            setting = self.config.batches
            if isinstance(setting, bool):
                self._batches = setting
            else:
                try:
                    await self.client.batches.list(limit=1)
                    self._batches = True
                except openai.APIError:
                    self._batches = False
        return self._batches

    async def run(self, calls: list[Call], on_result: Callable[[Call, list[str]], None], *,
                  stage: str, state_dir: Path) -> StageStats:
        """Send ``calls``; ``on_result(call, choice_texts)`` runs once per call that succeeds, in
        the event loop's thread, as results arrive. A failed call is counted, not retried here
        (the SDK already retried connection errors and 5xx): a rerun of the stage retries it.

        Raises:
            PipelineError: a batch failed as a whole, or every call failed.
        """
        stats = StageStats(requests=len(calls), structured=bool(calls) and any(
            c.schema for c in calls) and await self.structured())
        pending = {c.key: c for c in calls}
        state = state_dir / f"{stage}.batch.json"
        if state.exists():  # a batch from a killed run: take its results first
            await self._await_batch(json.loads(state.read_text())["batch_id"], pending,
                                    on_result, stats, stage)
            state.unlink()
        if not pending:
            return stats
        threshold = self.config.batch_threshold if self.config.batches == "auto" else 1
        if self.ray_address is not None:  # Ray is imported only here, only when asked
            from lmforge.cluster.preference_data import send_on_ray

            stats.via = "ray"
            send_on_ray(self, list(pending.values()), on_result, stats, stage)
        elif len(pending) >= threshold and await self.has_batches():
            stats.via = "batch"
            batch_id = await self._submit(list(pending.values()), stats.structured, stage)
            state.write_text(json.dumps({"batch_id": batch_id}))
            await self._await_batch(batch_id, pending, on_result, stats, stage)
            state.unlink()
        else:
            await self._concurrent(list(pending.values()), on_result, stats, stage)
        if calls and not stats.succeeded:
            raise PipelineError(f"stage {stage}: all {stats.requests} requests to "
                                f"{self.config.base_url} failed; first error: "
                                f"{stats.first_error}")
        return stats

    def _body(self, call: Call, structured: bool) -> dict:
        body = {"model": self.model_name, "messages": call.messages, **call.params}
        if structured and call.schema is not None:
            body["response_format"] = response_format(*call.schema)
        return body

    async def complete(self, call: Call, structured: bool) -> tuple[list[str] | None, str]:
        """Send one call: ``(choice texts, "")``, or ``(None, error)`` when the request failed
        (after the SDK's own retries)."""
        try:
            reply = await self.client.chat.completions.create(**self._body(call, structured))
        except openai.APIError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        return [c.message.content or "" for c in reply.choices], ""

    async def _concurrent(self, calls: list[Call], on_result, stats: StageStats,
                          stage: str) -> None:
        limit = asyncio.Semaphore(self.config.max_concurrency)
        bar = tqdm(total=len(calls), desc=stage, unit="req", leave=False)

        async def one(call: Call) -> None:
            async with limit:
                texts, error = await self.complete(call, stats.structured)
                if texts is None:
                    stats.fail(error)
                else:
                    on_result(call, texts)
                    stats.succeeded += 1
                bar.update()

        try:
            await asyncio.gather(*(one(c) for c in calls))
        finally:
            bar.close()

    async def _submit(self, calls: list[Call], structured: bool, stage: str) -> str:
        lines = [json.dumps({"custom_id": c.key, "method": "POST", "url": "/v1/chat/completions",
                             "body": self._body(c, structured)}) for c in calls]
        upload = await self.client.files.create(
            file=(f"{stage}.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
        batch = await self.client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={"lmforge_stage": stage})
        return batch.id

    async def _await_batch(self, batch_id: str, pending: dict[str, Call], on_result,
                           stats: StageStats, stage: str) -> None:
        bar = tqdm(desc=f"{stage} (batch)", unit="req", leave=False)
        try:
            while True:
                batch = await self.client.batches.retrieve(batch_id)
                counts = batch.request_counts
                if counts is not None:
                    bar.total = counts.total
                    bar.n = counts.completed + counts.failed
                    bar.refresh()
                if batch.status in _DONE:
                    break
                await asyncio.sleep(1.0)
        finally:
            bar.close()
        if batch.status != "completed" and not batch.output_file_id:
            errors = getattr(batch, "errors", None)
            raise PipelineError(f"stage {stage}: batch {batch_id} ended {batch.status}: "
                                f"{errors}")
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                text = (await self.client.files.content(file_id)).text
                self._deliver(text, pending, on_result, stats)

    @staticmethod
    def _deliver(text: str, pending: dict[str, Call], on_result, stats: StageStats) -> None:
        for line in text.splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            call = pending.get(row.get("custom_id"))
            if call is None:
                continue  # written by an earlier run, or not this stage's
            response = row.get("response") or {}
            body = response.get("body") or {}
            if row.get("error") or response.get("status_code") != 200:
                stats.fail(json.dumps(row.get("error") or body.get("error") or body)[:500])
                continue
            on_result(call, [c["message"].get("content") or "" for c in body["choices"]])
            stats.succeeded += 1
            del pending[call.key]
