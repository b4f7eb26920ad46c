"""Serving benchmark: lmforge's HTTP server under concurrent streaming load, next to HF transformers.

For each concurrency level c, N requests (default max(8, 2c)) stream from ``/v1/completions`` with
at most c in flight, greedy, ``ignore_eos`` so every request yields exactly ``--max-tokens``. We
measure, per request, TTFT (send -> first content chunk) and the inter-token latencies (ITL,
between content chunks); per level, output tokens/s = all output tokens / wall time of the level.
The same load then runs through ``transformers`` ``generate`` with batch size c (left padding), the
usual baseline for a Python engine. The method follows vLLM's ``benchmarks/benchmark_serving.py``.

    python benchmarks/serve.py                       # both halves, concurrency 1,4,16,64
    python benchmarks/serve.py --hf-only --concurrency 1,16
    python benchmarks/serve.py --skip-hf --peer-llama-server PATH --concurrency 1,4,16

``--peer-llama-server PATH`` runs the identical load against llama.cpp's ``llama-server`` binary
(``../shared/bench/build_llama_server.sh`` builds one) on the same GGUF, with ``--peer-args``
(default ``-t <threads or CPUs> --parallel 16 -c 32768``), in the same run, rounds interleaved
(lmforge, llama.cpp, lmforge, ...), and prints lmforge / llama.cpp ratios. Each server's
time to ``/health`` 200 and its resident memory after the load are recorded too.

Results are printed and written as JSON to ``--out``; no test asserts them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
from servers import (
    lmforge_command,
    llama_server_command,
    resident_mb,
    start_process,
    stop_server,
)

DEFAULT_MODEL = "smollm2-135m-instruct"
_TOPICS = ["the ocean", "a mountain village", "the history of bread", "a robot learning to paint",
           "the first winter on Mars", "an old lighthouse", "bees in a city", "a chess tournament"]
_FILLER = ("Describe it in detail, with the people, the places, the sounds and the smells, "
           "and explain why it matters to those who live there and to those who visit. ")


def make_prompts(n: int, prompt_len: int, first: int = 0) -> list[str]:
    """``n`` different prompts of about ``prompt_len`` tokens (~0.75 words per token for English),
    numbered from ``first``: the number leads, so no two share a cached prefix block."""
    num_words = max(4, prompt_len * 3 // 4)
    prompts = []
    for i in range(first, first + n):
        words = f"Request {i}. Write a story about {_TOPICS[i % len(_TOPICS)]}. ".split()
        while len(words) < num_words:
            words += _FILLER.split()
        prompts.append(" ".join(words[:num_words]))
    return prompts


def percentile_ms(values: list[float], q: float) -> float | None:
    """The q-th percentile of ``values`` (seconds), in milliseconds; None when empty."""
    return float(np.percentile(values, q) * 1e3) if values else None


# ----------------------------------------------------------------------------------- lmforge half


async def stream_one(client, model_id: str, prompt: str, max_tokens: int) -> dict:
    """One streaming completion: ``{"ttft": s, "itl": [s, ...], "tokens": int}``.

    Raises:
        RuntimeError: a non-200 status or an error event in the stream.
    """
    body = {"model": model_id, "prompt": prompt,
            "max_tokens": max_tokens, "temperature": 0.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunk_times: list[float] = []
    usage_tokens = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(f"error in stream: {event['error']}")
            if event.get("usage"):
                usage_tokens = event["usage"]["completion_tokens"]
            if any(choice.get("text") for choice in event.get("choices") or []):
                chunk_times.append(time.perf_counter())
    if not chunk_times:
        raise RuntimeError("the stream carried no content")
    return {"ttft": chunk_times[0] - start, "itl": list(np.diff(chunk_times)),
            "tokens": usage_tokens if usage_tokens is not None else len(chunk_times)}


async def run_level(args: argparse.Namespace, prompts: list[str], concurrency: int,
                    engine: str = "lmforge") -> dict:
    """Send ``len(prompts)`` requests, at most ``concurrency`` at a time; one row of results."""
    import httpx

    limit = asyncio.Semaphore(concurrency)
    # a connection per request: llama-server closes a connection after a streamed response, and
    # a pooled one reused after that fails (loopback connects cost ~0.1 ms, the same for both)
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{args.port}", timeout=None,
                               limits=httpx.Limits(max_connections=concurrency,
                                                   max_keepalive_connections=0))

    async def bounded(prompt: str) -> dict:
        async with limit:
            return await stream_one(client, model_id, prompt, args.max_tokens)

    async with client:
        # The id clients must send; --model may be a path the server names differently.
        model_id = (await client.get("/v1/models")).json()["data"][0]["id"]
        await stream_one(client, model_id, "Warm-up: " + prompts[0], 4)  # not measured, and
        # not a prefix of a measured prompt
        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - start
    ttfts = [r["ttft"] for r in results]
    itls = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"engine": engine, "concurrency": concurrency, "requests": len(prompts),
            "output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall,
            "ttft_p50_ms": percentile_ms(ttfts, 50), "ttft_p99_ms": percentile_ms(ttfts, 99),
            "itl_p50_ms": percentile_ms(itls, 50)}


# ---------------------------------------------------------------------------------------- HF half


def hf_location(model: str) -> tuple[str, str | None]:
    """``(directory, gguf_file or None)`` for ``from_pretrained``, resolved as lmforge resolves it."""
    from lmforge.models.loader import resolve_model_path

    path, _ = resolve_model_path(model)
    return (str(path.parent), path.name) if path.suffix == ".gguf" else (str(path), None)


class HFRunner:
    """``transformers`` greedy generation on the same model and dtype, left-padded batches."""

    def __init__(self, model: str, dtype: str):
        os.environ["HF_HUB_OFFLINE"] = "1"  # models are local; never reach for the hub
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory, gguf_file = hf_location(model)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        self.tokenizer.padding_side = "left"  # decoder-only: new tokens follow the prompt
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file,
                                                          dtype=getattr(torch, dtype)).eval()

    def timed_generate(self, prompts: list[str], new_tokens: int) -> float:
        """Seconds to generate exactly ``new_tokens`` per prompt for one batch of ``prompts``."""
        import torch

        batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        return time.perf_counter() - start

    def median_time(self, prompts: list[str], new_tokens: int, repeats: int = 3) -> float:
        """Median of ``repeats`` timings: short runs are the ones a busy machine distorts most."""
        return float(np.median([self.timed_generate(prompts, new_tokens) for _ in range(repeats)]))


def run_hf_level(runner: HFRunner, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """The level's prompts in batches of ``concurrency``; TTFT ~ a 1-token run of one batch."""
    runner.timed_generate(prompts[:concurrency], 2)  # warm-up, not measured
    batches = [prompts[i:i + concurrency] for i in range(0, len(prompts), concurrency)]
    wall = sum(runner.timed_generate(b, max_tokens) for b in batches)
    ttft = runner.median_time(batches[0], 1)
    tokens = len(prompts) * max_tokens
    return {"engine": "hf", "concurrency": concurrency, "requests": len(prompts),
            "output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall,
            "ttft_p50_ms": ttft * 1e3, "ttft_p99_ms": None, "itl_p50_ms": None}


def hf_decode_tok_s(runner: HFRunner, prompt: str, max_tokens: int) -> float:
    """Batch-1 decode speed without prefill: ``(max_tokens - 1) / (T(max_tokens) - T(1))``."""
    t_one = runner.median_time([prompt], 1)
    return (max_tokens - 1) / (runner.timed_generate([prompt], max_tokens) - t_one)


# ------------------------------------------------------------------------------------------ main


def print_table(rows: list[dict]) -> None:
    """Rows as a fixed-width table; '-' where a number was not measured."""
    cols = ["engine", "concurrency", "requests", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms",
            "itl_p50_ms"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    print("  ".join(f"{c:>12}" for c in cols))
    for row in rows:
        print("  ".join(f"{fmt(row[c]):>12}" for c in cols))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, GGUF file or HF directory")
    p.add_argument("--num-requests", type=int, default=None, help="per level; max(8, 2c) if unset")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per lmforge level; the median run is reported, every run listed")
    p.add_argument("--prompt-len", type=int, default=64, help="approximate prompt tokens")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--serve-args", default="", help="extra `lmforge serve` options, one string")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for both halves (sets OMP_NUM_THREADS); torch's default if unset")
    p.add_argument("--hf-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="transformers' dtype; match the server's (`--dtype auto` is bfloat16 on "
                        "CPUs with native bf16)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds")
    p.add_argument("--peer-llama-server", default=None, metavar="PATH",
                   help="a llama-server binary: run the same load against it, interleaved")
    p.add_argument("--peer-args", default=None,
                   help="llama-server options (default: -t THREADS --parallel 16 -c 32768)")
    half = p.add_mutually_exclusive_group()
    half.add_argument("--skip-hf", action="store_true", help="benchmark lmforge only")
    half.add_argument("--hf-only", action="store_true", help="benchmark transformers only")
    return p.parse_args(argv)


def run_servers(args: argparse.Namespace, levels: list[int], log_path: Path) -> list[dict]:
    """Each level ``--repeats`` times on lmforge (and on llama-server with
    ``--peer-llama-server``), rounds interleaved so both see the same machine; per engine and
    level the median run. Each server starts once per round: its time to healthy and its RSS
    after the round go into ``servers``."""
    engines = {"lmforge": lmforge_command(args)}
    if args.peer_llama_server:
        engines["llama.cpp"] = llama_server_command(args)
    runs: dict[tuple[str, int], list[dict]] = {}
    args.servers = []
    for k in range(args.repeats):
        for name, cmd in engines.items():
            proc, healthy_s = start_process(args, cmd, log_path.with_suffix(f".{name}.log"))
            try:
                for c in levels:
                    n = num_requests(args, c)  # fresh prompts per run, or a prefix cache serves
                    prompts = make_prompts(n, args.prompt_len, first=k * n)
                    runs.setdefault((name, c), []).append(
                        asyncio.run(run_level(args, prompts, c, engine=name)))
                args.servers.append({"engine": name, "round": k, "healthy_s": healthy_s,
                                     "rss_mb_after": resident_mb(proc)})
                print(f"{name} round {k}: healthy after {healthy_s:.1f} s, RSS after the load "
                      f"{args.servers[-1]['rss_mb_after']} MB", flush=True)
            finally:
                stop_server(proc)
    rows = [median_run(runs[(name, c)]) for name in engines for c in levels]
    print_table(rows)
    return rows


def run_hf(args: argparse.Namespace, levels: list[int]) -> tuple[list[dict], float]:
    print("loading the model in transformers ...", flush=True)
    runner = HFRunner(args.model, args.hf_dtype)
    rows = []
    for c in levels:
        rows.append(run_hf_level(runner, make_prompts(num_requests(args, c), args.prompt_len), c,
                                 args.max_tokens))
        print_table(rows[-1:])
    return rows, hf_decode_tok_s(runner, make_prompts(1, args.prompt_len)[0], args.max_tokens)


def median_run(runs: list[dict]) -> dict:
    """The run with the median output tokens/s, with every run's tokens/s under
    ``output_tok_s_runs``: on a shared machine one run can be off by 10% either way."""
    ordered = sorted(runs, key=lambda r: r["output_tok_s"])
    return {**ordered[(len(ordered) - 1) // 2],
            "output_tok_s_runs": [r["output_tok_s"] for r in runs]}


def machine_check() -> dict:
    """This machine's bf16 GEMM rate and memory read bandwidth right now.

    On a shared VM both move (read bandwidth was seen anywhere from 19 to 34 GB/s within an
    hour), and decoding follows the bandwidth; printing them next to the results says which
    machine the numbers came from.
    """
    import torch

    a, b = torch.randn(512, 1536, dtype=torch.bfloat16), torch.randn(1536, 1536,
                                                                     dtype=torch.bfloat16)
    big = torch.ones(64 * 2**20 // 2, dtype=torch.bfloat16)  # 64 MiB, more than any cache
    for _ in range(3):
        a @ b, big.sum()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    gemm = 20 * 2 * 512 * 1536 * 1536 / (time.perf_counter() - start) / 1e9
    start = time.perf_counter()
    for _ in range(10):
        big.sum()
    read = 10 * big.nbytes / (time.perf_counter() - start) / 1e9
    return {"bf16_gemm_gflops": round(gemm), "read_gb_s": round(read, 1)}


def num_requests(args: argparse.Namespace, concurrency: int) -> int:
    return args.num_requests or max(8, 2 * concurrency)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.threads:
        # Read by torch at import, here and in the server subprocess, which inherits the environment.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    # SIGTERM becomes SystemExit, so the `finally` that stops the server still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    machine = [machine_check()]
    print(f"machine now: {machine[0]}", flush=True)
    args.servers = []
    served = [] if args.hf_only else run_servers(args, levels, args.out.with_suffix(".server"))
    ours = [r for r in served if r["engine"] == "lmforge"]
    peer = [r for r in served if r["engine"] == "llama.cpp"]
    machine.append(machine_check())
    hf, decode = ([], None) if args.skip_hf else run_hf(args, levels)

    print(f"\nmodel {args.model}, max_tokens {args.max_tokens}, prompt ~{args.prompt_len} tokens, "
          f"{os.cpu_count()} CPUs, threads {args.threads or 'default'}, HF dtype {args.hf_dtype}, "
          f"serve args {args.serve_args!r}")
    print(f"machine before / after lmforge: {machine[0]} / {machine[1]}")
    print_table(ours + peer + hf)
    ratios = {r["concurrency"]: r["output_tok_s"] / h["output_tok_s"] for r, h in zip(ours, hf)}
    for c, ratio in ratios.items():
        print(f"concurrency {c:>3}: lmforge / HF output tokens/s = {ratio:.2f}x")
    peer_ratios = {r["concurrency"]: {
        "output_tok_s": r["output_tok_s"] / p["output_tok_s"],
        "ttft_p50": r["ttft_p50_ms"] / p["ttft_p50_ms"]} for r, p in zip(ours, peer)}
    for c, ratio in peer_ratios.items():
        print(f"concurrency {c:>3}: lmforge / llama.cpp output tokens/s = "
              f"{ratio['output_tok_s']:.2f}x, TTFT p50 = {ratio['ttft_p50']:.2f}x")
    for server in args.servers:
        print(f"{server['engine']} round {server['round']}: healthy after "
              f"{server['healthy_s']:.1f} s, RSS after the load {server['rss_mb_after']} MB")
    if decode is not None:
        print(f"HF pure decode at batch 1: {decode:.1f} tokens/s")
    result = {"config": {k: str(v) for k, v in vars(args).items() if k != "servers"},
              "rows": ours + peer + hf, "ratio_lmforge_over_hf": ratios,
              "ratio_lmforge_over_llama_cpp": peer_ratios, "servers": args.servers,
              "hf_decode_tok_s_batch1": decode,
              "machine_before_after_lmforge": machine}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
