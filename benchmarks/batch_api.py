"""Online TTFT while a real ``/v1/batches`` job runs, end to end over HTTP.

``batch_priority.py`` measures the engine mechanism in-process; this one measures what a user
sees: ``lmforge serve`` (a subprocess, its own throwaway ``LMFORGE_HOME``), a batch of
``--lines`` chat lines (~``--prompt-len``-token prompts, ``--max-tokens`` tokens each) uploaded
through ``/v1/files`` and run by the batch worker (``--batch-concurrency`` lines in flight, at
batch priority), and ``--probes`` streamed chat requests, one at a time after random pauses of
up to ``--max-gap-s``, first with the server idle, then while the batch is in progress. TTFT is
the time to the first content chunk. The batch's own progress (lines/s, completion tokens/s)
while the probes run is its cost side.

    python benchmarks/batch_api.py
    python benchmarks/batch_api.py --batch-concurrency 16 --lines 600

Results are printed and written as JSON to ``--out``; no test asserts them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serve import machine_check, make_prompts, percentile_ms
from servers import start_server, stop_server

from lmforge.config import DEFAULT_MODEL

QUESTIONS = ["What is the capital of France?", "How do bees make honey?",
             "Why is the sky blue?", "What is a prime number?", "How far away is the Moon?"]


async def probe(client: httpx.AsyncClient, i: int, max_tokens: int) -> float:
    """One streamed chat request; seconds to its first content chunk."""
    body = {"model": DEFAULT_MODEL, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"{i}. {QUESTIONS[i % len(QUESTIONS)]}"}]}
    start = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            choices = json.loads(line[6:])["choices"] if line.startswith("data: {") else []
            if choices and choices[0]["delta"].get("content"):
                return time.perf_counter() - start
    raise RuntimeError("the probe's stream carried no content")


async def probes(client: httpx.AsyncClient, args: argparse.Namespace, first: int) -> list[float]:
    out = []
    for i in range(args.probes):
        await asyncio.sleep(random.uniform(0, args.max_gap_s))
        out.append(await probe(client, first + i, args.probe_max_tokens))
    return out


async def run(args: argparse.Namespace, base: str) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        await probes(client, args, 10_000)  # warm-up: compiled paths, allocator
        idle = await probes(client, args, 0)
        lines = [json.dumps({"custom_id": f"l{i}", "method": "POST",
                             "url": "/v1/chat/completions",
                             "body": {"model": DEFAULT_MODEL, "max_tokens": args.max_tokens,
                                      "ignore_eos": True, "temperature": 0,
                                      "messages": [{"role": "user", "content": p}]}})
                 for i, p in enumerate(make_prompts(args.lines, args.prompt_len))]
        upload = await client.post("/v1/files", data={"purpose": "batch"},
                                   files={"file": ("b.jsonl", "\n".join(lines).encode())})
        batch = (await client.post("/v1/batches", json={
            "input_file_id": upload.raise_for_status().json()["id"],
            "endpoint": "/v1/chat/completions", "completion_window": "24h"})).json()
        while (state := (await client.get(f"/v1/batches/{batch['id']}")).json())[
                "request_counts"]["completed"] < args.batch_concurrency:
            await asyncio.sleep(0.2)  # lines flowing at full concurrency
        start, done_before = time.perf_counter(), state["request_counts"]["completed"]
        busy = await probes(client, args, 1000)
        elapsed = time.perf_counter() - start
        state = (await client.get(f"/v1/batches/{batch['id']}")).json()
        lines_done = state["request_counts"]["completed"] - done_before
        if state["status"] != "in_progress":
            print(f"warning: the batch was {state['status']} by the end of the probes; "
                  "raise --lines", flush=True)
        await client.post(f"/v1/batches/{batch['id']}/cancel")
    row = {"idle_ttft_p50_ms": percentile_ms(idle, 50), "idle_ttft_p90_ms": percentile_ms(idle, 90),
           "batch_ttft_p50_ms": percentile_ms(busy, 50),
           "batch_ttft_p90_ms": percentile_ms(busy, 90),
           "batch_lines_per_s": lines_done / elapsed,
           "batch_completion_tok_s": lines_done * args.max_tokens / elapsed}
    row["ratio_p50"] = row["batch_ttft_p50_ms"] / row["idle_ttft_p50_ms"]
    row["ratio_p90"] = row["batch_ttft_p90_ms"] / row["idle_ttft_p90_ms"]
    return row


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="the alias (the lines name it)")
    p.add_argument("--port", type=int, default=8012)
    p.add_argument("--batch-concurrency", type=int, default=8)
    p.add_argument("--lines", type=int, default=400)
    p.add_argument("--prompt-len", type=int, default=100, help="approximate prompt tokens")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--probes", type=int, default=30)
    p.add_argument("--probe-max-tokens", type=int, default=4)
    p.add_argument("--max-gap-s", type=float, default=0.3)
    p.add_argument("--serve-args", default="", help="extra `lmforge serve` options, one string")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/batch_api.json"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    args.serve_args = f"--batch-concurrency {args.batch_concurrency} {args.serve_args}"
    os.environ["LMFORGE_HOME"] = tempfile.mkdtemp(prefix="lmforge-bench-")  # the server's too
    machine = [machine_check()]
    proc = start_server(args, Path(os.environ["LMFORGE_HOME"]) / "server.log")
    try:
        row = asyncio.run(run(args, f"http://127.0.0.1:{args.port}"))
    finally:
        stop_server(proc)
    machine.append(machine_check())
    print(f"\nmodel {args.model}, {os.cpu_count()} CPUs; batch of {args.lines} lines "
          f"(~{args.prompt_len} -> {args.max_tokens} tokens), {args.batch_concurrency} in "
          f"flight; {args.probes} probes; machine before / after: {machine[0]} / {machine[1]}")
    print(f"{'':<14} {'TTFT p50':>9} {'TTFT p90':>9}   (ms)")
    print(f"{'idle':<14} {row['idle_ttft_p50_ms']:>9.1f} {row['idle_ttft_p90_ms']:>9.1f}")
    print(f"{'batch running':<14} {row['batch_ttft_p50_ms']:>9.1f} "
          f"{row['batch_ttft_p90_ms']:>9.1f}   ratio p50 {row['ratio_p50']:.2f}x, "
          f"p90 {row['ratio_p90']:.2f}x")
    print(f"the batch meanwhile: {row['batch_lines_per_s']:.2f} lines/s, "
          f"{row['batch_completion_tok_s']:.0f} completion tokens/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                    "machine_before_after": machine, **row}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
