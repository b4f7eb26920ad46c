"""Batch input files and batch lines: validation up front, running one line, the output records.

Shared by the server's batch worker (``jobs/batch_worker.py``) and the offline runner (``lmforge batch
run``). A line runs as an HTTP request to the serving app itself, in-process (``httpx`` over the
app's ASGI callable), so its response body is exactly what the online endpoint returns.

Output records follow OpenAI's batch output format::

    {"id": "batch_req_...", "custom_id": "...",
     "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}

A line the endpoint answered with a 4xx/5xx goes to the error file with that response; a line
never run because the batch expired or was cancelled goes there with ``response: null`` and
``error: {"code": "batch_expired" | "batch_cancelled", "message"}``.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from lmforge.errors import LMForgeError
from lmforge.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from lmforge.protocol.base import RequestModel
from lmforge.protocol.batches import BatchInputLine

BODY_MODELS: dict[str, type[RequestModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}
MAX_LINES = 50_000  # OpenAI's limit per batch input file
# While the server sheds load (429) or is briefly unavailable (503), a line waits and retries
# instead of failing: batch traffic yields to online traffic.
RETRY_STATUSES = (429, 503)
MAX_RETRY_WAIT_S = 5.0
UNRUN_MESSAGES = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
}


@dataclass
class BatchLine:
    """One valid input line (``index`` is 0-based)."""

    index: int
    custom_id: str
    body: dict[str, Any]
    url: str  # the endpoint it goes to


@dataclass
class LineResult:
    """What running a line gave: its output record, where it goes, and its token usage."""

    ok: bool
    record: dict[str, Any]
    usage: tuple[int, int, int]  # (input, cached input, output) tokens


def parse_input(data: bytes, endpoint: str | None, model_names: set[str]
                ) -> tuple[list[BatchLine], list[dict[str, Any]]]:
    """Validate a batch input file against the batch's endpoint and the served models.

    Each non-empty line must be a JSON object with a unique ``custom_id``, ``method`` POST,
    ``url`` equal to ``endpoint`` (any of ``ENDPOINTS`` when None: the offline runner lets
    lines differ), a ``body`` the endpoint accepts (its schema and checks, no ``stream``), and a
    ``model`` this server serves.

    Returns:
        ``(lines, errors)``: errors are OpenAI batch errors ``{code, message, param, line}``
        (``line`` 1-based); the batch fails if there is any.
    """
    lines: list[BatchLine] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], [{"code": "invalid_json_line", "message": "the file is not UTF-8 text",
                     "param": None, "line": None}]
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        parsed = _parse_line(raw, endpoint, model_names, seen)
        if isinstance(parsed, tuple):
            code, message, param = parsed
            errors.append({"code": code, "message": message, "param": param, "line": number})
        else:
            lines.append(BatchLine(number - 1, parsed.custom_id, parsed.body, parsed.url))
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "the input file has no requests",
                       "param": None, "line": None})
    if len(lines) > MAX_LINES:
        errors.append({"code": "too_many_requests", "message": f"the input file has "
                       f"{len(lines)} requests; a batch takes at most {MAX_LINES}",
                       "param": None, "line": None})
    return lines, errors


def _parse_line(raw: str, endpoint: str | None, model_names: set[str], seen: set[str]
                ) -> BatchInputLine | tuple[str, str, str | None]:
    """One non-empty input line, validated (see ``parse_input``), or its problem as
    ``(code, message, param)``. Adds its ``custom_id`` to ``seen``."""
    try:
        item = BatchInputLine.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        kind = "invalid_json_line" if first["type"] == "json_invalid" else "invalid_request"
        where = ".".join(str(p) for p in first["loc"]) or None
        return kind, f"{where + ': ' if where else ''}{first['msg']}", where
    if item.custom_id in seen:
        return ("duplicate_custom_id", (f"custom_id {item.custom_id!r} is used by an earlier "
                                        "line; each line needs its own"), "custom_id")
    seen.add(item.custom_id)
    if item.url != (endpoint or item.url) or item.url not in BODY_MODELS:
        message = (f"url {item.url!r} differs from the batch's endpoint {endpoint!r}"
                   if endpoint else f"url {item.url!r} is not one of {', '.join(BODY_MODELS)}")
        return "mismatched_endpoint", message, "url"
    problem = _body_problem(item.url, item.body, model_names)
    return problem if problem is not None else item


def _body_problem(endpoint: str, body: dict[str, Any], model_names: set[str]
                  ) -> tuple[str, str, str | None] | None:
    """(code, message, param) of what the endpoint would reject in ``body``, or None."""
    try:
        request = BODY_MODELS[endpoint].model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = "body." + ".".join(str(p) for p in first["loc"])
        return "invalid_request", f"{where}: {first['msg']}", where
    if body.get("stream"):
        return "invalid_request", "stream is not supported in a batch", "body.stream"
    model = request.model  # type: ignore[attr-defined]
    if model is None and len(model_names) != 1:  # one served model is the default (vLLM's rule)
        return ("invalid_request", "Missing required parameter: 'model'. Several models are "
                f"served: {', '.join(sorted(model_names))}", "body.model")
    if model is not None and model not in model_names:
        return ("model_not_found", f"model {model!r} is not served here; served: "
                f"{', '.join(sorted(model_names))}", "body.model")
    check = getattr(request, "check", None)
    if check is not None and endpoint != "/v1/embeddings":  # embeddings' check needs the model
        try:
            check()
        except LMForgeError as e:
            return "invalid_request", e.message, f"body.{e.param}" if e.param else "body"
    return None


async def run_line(client: httpx.AsyncClient, line: BatchLine) -> LineResult:
    """POST one line's body to its endpoint through ``client`` (bound to the serving app) and
    build its output record; retries while the server answers 429 or 503 (``Retry-After``)."""
    while True:
        response = await client.post(line.url, json=line.body)
        if response.status_code not in RETRY_STATUSES:
            break
        await asyncio.sleep(min(float(response.headers.get("retry-after", 1)), MAX_RETRY_WAIT_S))
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text, "type": "server_error", "param": None,
                          "code": None}}
    ok = 200 <= response.status_code < 300
    usage = body.get("usage") if ok and isinstance(body, dict) else None
    return LineResult(ok, {
        "id": f"batch_req_{secrets.token_hex(12)}", "custom_id": line.custom_id,
        "response": {"status_code": response.status_code,
                     "request_id": f"req_{secrets.token_hex(12)}", "body": body},
        "error": None}, _usage(usage))


def unrun_result(line: BatchLine, code: str) -> LineResult:
    """The error record of a line never run: ``code`` batch_expired or batch_cancelled."""
    return LineResult(False, {"id": f"batch_req_{secrets.token_hex(12)}",
                              "custom_id": line.custom_id, "response": None,
                              "error": {"code": code, "message": UNRUN_MESSAGES[code]}},
                      (0, 0, 0))


def _usage(usage: dict[str, Any] | None) -> tuple[int, int, int]:
    if not usage:
        return 0, 0, 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return usage.get("prompt_tokens", 0), cached, usage.get("completion_tokens", 0)


def jsonl(records: list[str]) -> bytes:
    """Output file bytes from records' JSON texts, one per line."""
    return "".join(r + "\n" for r in records).encode("utf-8")
