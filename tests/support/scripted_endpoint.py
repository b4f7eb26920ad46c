"""A scripted OpenAI-compatible endpoint for the preference pipeline's tests: a FastAPI app on a
real port (uvicorn in a thread), so the pipeline's ``openai`` client, and a ``lmforge``
subprocess, talk to it over HTTP as they would to vLLM or OpenAI. It has only
``/v1/chat/completions`` (no ``/v1/batches``: the pipeline must fall back to requests).

- The judge (model ``judge``) writes ``NUM_QUESTIONS`` questions whose key is "choice A", and
  answers a summary that starts with ``S<k>`` right on the first k questions and wrong on the
  rest: that summary scores k (any other summary, a real model's, scores its word count modulo
  6).
- A policy model (any other name) answers the article in its prompt with the summaries
  ``summaries[model][article_text]``, the first ``n`` of them.
- ``fail_keys``: summaries the judge answers with a 500 (a flaky endpoint); ``delay_s``: seconds
  every request waits (so a test can kill a run midway).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from support.serve_process import free_port

NUM_QUESTIONS = 5


@dataclass
class Script:
    summaries: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    fail_keys: set[str] = field(default_factory=set)
    delay_s: float = 0.0
    requests: list[dict] = field(default_factory=list)


def _reply(model: str, texts: list[str]) -> dict:
    return {"id": "chatcmpl-scripted", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [
                {"index": i, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": t}} for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def build_app(script: Script) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        script.requests.append(body)
        if script.delay_s:
            await asyncio.sleep(script.delay_s)
        prompt = body["messages"][-1]["content"]
        model = body["model"]
        if '{"ok": true}' in prompt:  # the structured-output probe: ignores response_format
            return _reply(model, ["Sure, here it is: ok"])
        if model == "judge":
            if "Summary:\n" in prompt:
                summary = prompt.split("Summary:\n", 1)[1].split("\n", 1)[0]
                if summary in script.fail_keys:
                    return JSONResponse({"error": {"message": "scripted failure"}}, 500)
                first = (summary.split() or [""])[0]
                # "S<k> ...": scores k; any other text (a real model's): its word count mod 6
                k = (int(first[1:]) if first[:1] == "S" and first[1:].isdigit()
                     else len(summary.split()) % (NUM_QUESTIONS + 1))
                # the choices come shuffled: the right one is wherever "choice A" is shown
                right = re.findall(r"(?m)^   ([A-E])\) choice A$", prompt)
                answers = right[:k] + [next(x for x in "ABCDE" if x != r) for r in right[k:]]
                return _reply(model, [json.dumps({"answers": answers})])
            question = {"question": "Which?", "choices": {c: f"choice {c}" for c in "ABCDE"},
                        "answer": "A"}
            return _reply(model, ["Here you go:\n```json\n" + json.dumps(
                {"questions": [question] * NUM_QUESTIONS}) + "\n```"])
        for article, summaries in script.summaries.get(model, {}).items():
            if article in prompt:
                return _reply(model, summaries[:body.get("n") or 1])
        return JSONResponse({"error": {"message": f"no script for model {model}"}}, 404)

    return app


class ScriptedEndpoint:
    """``with ScriptedEndpoint(script) as url:`` serves ``script`` at ``url`` (ends in /v1)."""

    def __init__(self, script: Script):
        self.script = script
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(build_app(script), host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("the scripted endpoint did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def summ(score: int, words: int, tag: str) -> str:
    """A summary the scripted judge scores ``score``, of exactly ``words`` words."""
    return " ".join([f"S{score}", tag] + ["w"] * (words - 2))
