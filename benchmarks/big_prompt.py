"""``/health`` latency while ``lmforge serve`` refuses huge prompts, end to end over HTTP.

A hostile client sends ``--sizes`` MB prompts to ``/v1/completions`` (one at a time, each on
its own connection) while another connection polls ``GET /health`` every ``--poll-ms``. Before
prompts were bounded and tokenized off the event loop, a 20 MB prompt froze every route for
36-58 s; now a prompt too long for the context is refused by its character count before the
tokenizer runs (400 ``context_length_exceeded``) and a body over ``--max-request-mb`` with a
413. Printed per size: the answer, its time, and the /health latency (median, p99, max) while
it was in flight; written as JSON to ``--out``. No test asserts these numbers.

    python benchmarks/big_prompt.py
    python benchmarks/big_prompt.py --sizes 1 5 20 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx
from serve import percentile_ms
from servers import start_server, stop_server

from lmforge.config import DEFAULT_MODEL


async def poll_health(client: httpx.AsyncClient, stop: asyncio.Event, poll_s: float,
                      latencies: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        response = await client.get("/health")
        latencies.append(time.perf_counter() - start)
        response.raise_for_status()
        await asyncio.sleep(poll_s)


async def one_size(base_url: str, megabytes: float, poll_s: float) -> dict:
    """Send one prompt of ``megabytes`` MB while /health is polled; its numbers."""
    body = json.dumps({"model": DEFAULT_MODEL, "max_tokens": 1,
                       "prompt": "word " * int(megabytes * 2**20 / 5)}).encode()
    latencies: list[float] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as health, \
            httpx.AsyncClient(base_url=base_url, timeout=600) as hostile:
        poller = asyncio.ensure_future(poll_health(health, stop, poll_s, latencies))
        await asyncio.sleep(5 * poll_s)  # a few idle polls first
        latencies.clear()
        start = time.perf_counter()
        response = await hostile.post("/v1/completions", content=body,
                                      headers={"Content-Type": "application/json"})
        elapsed = time.perf_counter() - start
        stop.set()
        await poller
    code = response.json().get("error", {}).get("code") if response.status_code >= 400 else None
    return {"mb": megabytes, "status": response.status_code, "code": code,
            "answer_s": round(elapsed, 3), "health_polls": len(latencies),
            "health_p50_ms": percentile_ms(latencies, 50),
            "health_p99_ms": percentile_ms(latencies, 99),
            "health_max_ms": max(latencies) * 1e3 if latencies else None}


async def run(args: argparse.Namespace) -> list[dict]:
    base_url = f"http://127.0.0.1:{args.port}"
    rows = []
    for megabytes in args.sizes:
        row = await one_size(base_url, megabytes, args.poll_ms / 1e3)
        rows.append(row)
        print(f"{row['mb']:>6} MB  -> {row['status']} {row['code'] or ''} in "
              f"{row['answer_s']:.2f} s; /health over {row['health_polls']} polls: "
              f"p50 {row['health_p50_ms'] or 0:.1f} ms, p99 {row['health_p99_ms'] or 0:.1f} "
              f"ms, max {row['health_max_ms'] or 0:.1f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--port", type=int, default=8017)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 5, 20, 40])
    parser.add_argument("--poll-ms", type=float, default=10)
    parser.add_argument("--serve-args", default="", help="extra `lmforge serve` options")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                        "big_prompt.json")
    args = parser.parse_args()
    log = Path(tempfile.mkdtemp(prefix="lmforge-big-prompt-")) / "server.log"
    server = start_server(args, log)
    try:
        rows = asyncio.run(run(args))
    finally:
        stop_server(server)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
