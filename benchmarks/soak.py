"""Soak test: does ``lmforge serve`` hold its memory under steady mixed load?

Drives a server at ``--concurrency`` requests in flight for ``--duration-s`` seconds with a mix of
chat completions, streamed chat (``--disconnect-frac`` of them hang up after a few chunks, as a
client that goes away mid-stream), completions and embeddings, every prompt a different length
and text. Every ``--sample-every`` requests it reads the server process's resident set size
(``VmRSS`` in ``/proc/<pid>/status``). After the first ``--warmup-requests`` (allocator arenas,
oneDNN kernels, tokenizer and template caches fill up there), the least-squares slope of RSS
against requests done is the number to watch: a server that holds its memory ends near its
post-warm-up RSS and has a slope near 0 MB per 1000 requests.

    python benchmarks/soak.py                                  # 30 minutes at concurrency 8
    python benchmarks/soak.py --duration-s 600 --concurrency 4
    python benchmarks/soak.py --base-url http://127.0.0.1:8000 --pid 12345   # a running server

Results are printed and written as JSON to ``--out``; no test asserts them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from serve import make_prompts
from servers import start_server, stop_server

from lmforge.config import DEFAULT_MODEL

# request kind -> share of the mix
MIX = {"chat": 0.3, "chat_stream": 0.3, "completion": 0.25, "embedding": 0.15}


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB, from ``/proc/<pid>/status`` (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError(f"no VmRSS for process {pid}")


def slope_per_1000(samples: list[dict]) -> float | None:
    """Least-squares slope of RSS (MiB) against requests done, per 1000 requests."""
    if len(samples) < 2:
        return None
    x = np.array([s["requests"] for s in samples], dtype=float)
    y = np.array([s["rss_mb"] for s in samples])
    return float(np.polyfit(x, y, 1)[0] * 1000)


class Load:
    """The request mix; ``one(i)`` sends request number i and returns its outcome label."""

    def __init__(self, client: httpx.AsyncClient, model: str, args: argparse.Namespace):
        self.client, self.model, self.args = client, model, args
        self.rng = random.Random(args.seed)

    def _prompt(self, i: int) -> str:
        return make_prompts(1, self.rng.randint(8, self.args.max_prompt_len), first=i)[0]

    async def one(self, i: int) -> str:
        kind = self.rng.choices(list(MIX), weights=list(MIX.values()))[0]
        max_tokens = self.rng.randint(4, self.args.max_tokens)
        messages = [{"role": "user", "content": self._prompt(i)}]
        chat = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": self.rng.choice([0.0, 0.7])}
        if kind == "chat":
            return await self._post("/v1/chat/completions", chat)
        if kind == "completion":
            return await self._post("/v1/completions", {
                "model": self.model, "prompt": self._prompt(i), "max_tokens": max_tokens,
                "temperature": 0.0})
        if kind == "embedding":
            inputs = [self._prompt(i * 4 + k) for k in range(self.rng.randint(1, 4))]
            return await self._post("/v1/embeddings", {"model": self.model, "input": inputs})
        hang_up = self.rng.random() < self.args.disconnect_frac
        return await self._stream({**chat, "stream": True}, 2 if hang_up else None)

    async def _post(self, path: str, body: dict) -> str:
        response = await self.client.post(path, json=body)
        return str(response.status_code)

    async def _stream(self, body: dict, hang_up_after: int | None) -> str:
        """A streamed chat; leaving the ``stream`` block early closes the connection, which the
        server sees as a disconnect."""
        chunks = 0
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return str(response.status_code)
            async for line in response.aiter_lines():
                chunks += line.startswith("data: {")
                if hang_up_after is not None and chunks >= hang_up_after:
                    return "disconnected"
        return "200"


async def drive(args: argparse.Namespace, base_url: str, pid: int) -> dict:
    """Run the load until ``--duration-s`` has passed; RSS samples and request outcomes."""
    samples: list[dict] = []
    outcomes: Counter = Counter()
    done = 0
    start = time.monotonic()
    deadline = start + args.duration_s

    def sample() -> None:
        samples.append({"requests": done, "elapsed_s": round(time.monotonic() - start, 1),
                        "rss_mb": round(rss_mb(pid), 1)})
        s = samples[-1]
        print(f"{s['elapsed_s']:>8.0f} s {done:>7} requests  RSS {s['rss_mb']:8.1f} MiB  "
              f"{dict(outcomes)}", flush=True)

    async with httpx.AsyncClient(base_url=base_url, timeout=600,
                                 limits=httpx.Limits(max_connections=args.concurrency)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        load, counter = Load(client, model, args), iter(range(10**9))
        sample()

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                try:
                    outcomes[await load.one(next(counter))] += 1
                except httpx.HTTPError as e:
                    outcomes[type(e).__name__] += 1
                done += 1
                if done % args.sample_every == 0 or done == args.warmup_requests:
                    sample()

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        sample()
    return {"samples": samples, "outcomes": dict(outcomes), "wall_s": time.monotonic() - start}


def summarize(run: dict, warmup: int) -> dict:
    """RSS after warm-up and at the end, and the slope over the post-warm-up samples."""
    after = [s for s in run["samples"] if s["requests"] >= warmup]
    if not after:  # a slow machine: judge what there is, past the cold start, and say so
        print(f"warning: the run ended before {warmup} warm-up requests; the numbers below "
              "count from the first sample after the start")
        after = run["samples"][1:] or run["samples"]
    first, last = after[0], run["samples"][-1]
    return {"requests": last["requests"], "wall_s": round(run["wall_s"], 1),
            "warmup_reached": first["requests"] >= warmup,
            "requests_per_s": round(last["requests"] / run["wall_s"], 2),
            "rss_start_mb": run["samples"][0]["rss_mb"], "baseline_requests": first["requests"],
            "rss_after_warmup_mb": first["rss_mb"],
            "rss_end_mb": last["rss_mb"], "rss_max_mb": max(s["rss_mb"] for s in after),
            "growth_after_warmup_pct": round(100 * (last["rss_mb"] / first["rss_mb"] - 1), 2),
            "slope_mb_per_1000_requests": slope_per_1000(after), "outcomes": run["outcomes"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, GGUF file or HF directory")
    p.add_argument("--base-url", default=None,
                   help="attach to this running server instead of starting one (needs --pid)")
    p.add_argument("--pid", type=int, default=None, help="the attached server's process id")
    p.add_argument("--port", type=int, default=8013)
    p.add_argument("--serve-args", default="", help="extra `lmforge serve` options, one string")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration-s", type=float, default=1800.0)
    p.add_argument("--warmup-requests", type=int, default=500,
                   help="requests before the RSS baseline; not in the slope")
    p.add_argument("--sample-every", type=int, default=100, help="requests between RSS samples")
    p.add_argument("--max-tokens", type=int, default=48, help="each request asks for 4..this")
    p.add_argument("--max-prompt-len", type=int, default=200,
                   help="prompts are 8..this many tokens (about)")
    p.add_argument("--disconnect-frac", type=float, default=0.3,
                   help="share of streamed chats that hang up after two chunks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    args = p.parse_args(argv)
    if args.base_url and args.pid is None:
        p.error("--base-url needs --pid (the server process whose RSS to sample)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # SIGTERM becomes SystemExit, so the `finally` that stops the server still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    proc = None
    if args.base_url is None:
        proc = start_server(args, args.out.with_suffix(".server.log"))
    try:
        run = asyncio.run(drive(args, args.base_url or f"http://127.0.0.1:{args.port}",
                                args.pid or proc.pid))
    finally:
        if proc is not None:
            stop_server(proc)
    result = summarize(run, args.warmup_requests)
    print(f"\nmodel {args.model}, concurrency {args.concurrency}, {result['requests']} requests "
          f"in {result['wall_s']:.0f} s ({result['requests_per_s']} /s), {os.cpu_count()} CPUs, "
          f"serve args {args.serve_args!r}; outcomes {result['outcomes']}")
    print(f"RSS: start {result['rss_start_mb']:.1f} MiB, after {result['baseline_requests']} "
          f"requests {result['rss_after_warmup_mb']:.1f} MiB, end {result['rss_end_mb']:.1f} MiB "
          f"({result['growth_after_warmup_pct']:+.1f}%), max {result['rss_max_mb']:.1f} MiB")
    slope = result["slope_mb_per_1000_requests"]
    print("slope after warm-up: "
          + ("-" if slope is None else f"{slope:+.2f} MiB per 1000 requests"))
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                    **result, "samples": run["samples"]}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
