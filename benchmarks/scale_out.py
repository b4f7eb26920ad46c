"""Scale-out on Ray Serve: tokens/s of one vs two engine replicas behind ``lmforge serve --ray``,
beside plain ``lmforge serve`` (no Ray), and what the Ray ingress adds to each request.

    python benchmarks/scale_out.py                       # SmolLM2, concurrency 16, this machine
    python benchmarks/scale_out.py --replicas 1,2,4 --replica-cpus 1 --ray-address HOST:6379

Each configuration is started as a user would (``lmforge serve [--ray --replicas R]``), loaded
with the same streamed completions as ``benchmarks/serve.py`` (``--max-tokens`` out, greedy,
``ignore_eos``) at ``--concurrency``, then stopped. The routing overhead is the median latency
of a one-token completion through the ingress minus the same request to ``lmforge serve``
directly, sequentially (``--overhead-requests``). On one 2-core machine two replicas of one
core each split the same cores one replica of two cores uses: this measures the machinery, not
a speed-up, which needs more cores or nodes. Prints a table and writes
``benchmarks/results/scale_out.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve import make_prompts, run_level  # noqa: E402
from servers import start_process, stop_server  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "scale_out.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    p.add_argument("--replica-cpus", type=float, default=None,
                   help="CPUs per replica (default: this machine's cores / replicas)")
    p.add_argument("--ray-address", default=None, help="an existing cluster (default: local)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--overhead-requests", type=int, default=30)
    p.add_argument("--port", type=int, default=8931)
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--serve-args", default="--kv-cache-tokens 16384")
    return p.parse_args(argv)


async def one_token_latency_ms(port: int, n: int) -> float:
    """Median ms of ``n`` sequential one-token completions (after one warm-up)."""
    import httpx

    body = {"model": None, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        body["model"] = (await client.get("/v1/models")).json()["data"][0]["id"]
        await client.post("/v1/completions", json=body)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            (await client.post("/v1/completions", json=body)).raise_for_status()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(args: argparse.Namespace, label: str, extra: list[str]) -> dict:
    """Start ``lmforge serve`` with ``extra`` args, load it, stop it; one result row."""
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--model", args.model, "--host",
           "127.0.0.1", "--port", str(args.port), *args.serve_args.split(), *extra]
    log = Path(f"/tmp/lmforge-scale-out-{label}.log")
    proc, healthy_s = start_process(args, cmd, log)
    try:
        if "--ray" in extra:  # /health is 200 with one replica up: wait for them all
            wait_all_replicas(args.port, args.startup_timeout)
        prompts = make_prompts(args.requests, args.prompt_len)
        row = asyncio.run(run_level(args, prompts, args.concurrency, engine=label))
        row["one_token_ms"] = asyncio.run(one_token_latency_ms(args.port,
                                                               args.overhead_requests))
        row["healthy_s"] = healthy_s
    finally:
        stop_server(proc)
    print(f"{label}: {row['output_tok_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms, "
          f"one-token request {row['one_token_ms']:.1f} ms", flush=True)
    return row


def wait_all_replicas(port: int, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        if set(health.get("replicas", {}).values()) == {"ok"}:
            return
        time.sleep(1)
    raise RuntimeError(f"not every replica was healthy after {timeout_s} s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cores = os.cpu_count() or 1
    rows = [measure(args, "serve", [])]
    for replicas in (int(r) for r in args.replicas.split(",")):
        cpus = args.replica_cpus or max(1.0, cores / replicas)
        extra = ["--ray", "--replicas", str(replicas), "--replica-cpus", f"{cpus:g}"]
        if args.ray_address:
            extra += ["--ray-address", args.ray_address]
        rows.append(measure(args, f"ray-{replicas}x{cpus:g}cpu", extra))
    base = rows[0]
    print(f"\n{'configuration':<18} {'tok/s':>8} {'vs serve':>9} {'TTFT p50':>9} "
          f"{'1-token ms':>11} {'overhead':>9}")
    for row in rows:
        print(f"{row['engine']:<18} {row['output_tok_s']:>8.1f} "
              f"{row['output_tok_s'] / base['output_tok_s']:>8.2f}x "
              f"{row['ttft_p50_ms']:>7.0f}ms {row['one_token_ms']:>10.1f} "
              f"{row['one_token_ms'] - base['one_token_ms']:>8.1f}ms")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"cores": cores, "args": vars(args), "rows": rows},
                                  indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
