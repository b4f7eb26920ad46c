"""Nothing of a request outlives it: after a mix of requests (chat, streamed chat cut off by the
client, completions with ``n``, ``echo`` and prompt logprobs, embeddings) every per-request table
of the engine and the server is empty again, and the engine loop hands the heap memory its steps
freed back to the OS once it is idle (``engine/memory.py``).

``benchmarks/soak.py`` watches the memory of a server under this mix for half an hour; this is
its countable half: a table that keeps one entry per finished request grows without bound.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from lmforge.engine.memory import _malloc_trim

CHAT = {"messages": [{"role": "user", "content": "Tell me about bees."}], "max_tokens": 8}


def request_tables(engine) -> dict[str, int]:
    """Sizes of every table keyed by request id, in the engine and the server's AsyncEngine."""
    core = engine.engine
    scheduler, blocks, outputs = core.scheduler, core.block_manager, core.output_processor
    return {"detokenizers": len(outputs.detokenizers),
            "prompt_logprobs": len(outputs.prompt_logprobs), "held": len(scheduler.held),
            "scheduler.requests": len(scheduler.requests), "arrival": len(scheduler._arrival),
            "waiting": len(scheduler.waiting), "running": len(scheduler.running),
            "req_blocks": len(blocks.req_blocks), "num_hashed": len(blocks.num_hashed),
            "streams": len(engine._streams), "embeddings": len(engine._embeddings)}


def run_mix(base_url: str, model: str, rounds: int) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for i in range(rounds):
            chat = {"model": model, **CHAT, "messages": [{"role": "user", "content": f"{i}. Hi"}]}
            assert http.post("/v1/chat/completions", json=chat).status_code == 200
            body = {**chat, "stream": True, "max_tokens": 200, "ignore_eos": True}
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                json.loads(next(lines).removeprefix("data: "))  # then hang up mid-stream
            assert http.post("/v1/completions", json={
                "model": model, "prompt": f"{i}. Once upon a time", "max_tokens": 4, "n": 2,
                "echo": True, "logprobs": 1}).status_code == 200
            assert http.post("/v1/embeddings", json={
                "model": model, "input": [f"{i}. bees", "honey"]}).status_code == 200


def test_every_request_table_is_empty_after_a_mix(base_url, engine, model, wait_idle):
    run_mix(base_url, model, rounds=3)
    wait_idle(5.0)
    deadline = time.monotonic() + 5.0  # the aborts of the hung-up streams land within a step
    while any(request_tables(engine).values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert request_tables(engine) == dict.fromkeys(request_tables(engine), 0)


@pytest.mark.skipif(_malloc_trim() is None, reason="no glibc malloc_trim here")
def test_the_engine_loop_gives_memory_back_when_it_goes_idle(http, model, engine, wait_idle):
    released = engine.memory.releases
    assert http.post("/v1/completions", json={"model": model, "prompt": "Hello",
                                              "max_tokens": 4}).status_code == 200
    wait_idle(5.0)
    deadline = time.monotonic() + 5.0  # the idle loop looks again within a second
    while engine.memory.releases == released and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.memory.releases > released
