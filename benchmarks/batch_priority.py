"""Online time to first token (TTFT) while a batch job runs: what priority buys, at what cost.

The issue's aim: while a big batch runs, an online request's TTFT stays within 2x of the idle
figure. In-process on the default model (SmolLM2-135M-Instruct GGUF), through ``AsyncEngine``
directly (no HTTP), so the engine is what is measured:

- online probes: ``--probes`` short chat requests (a question rendered with the chat template,
  ~30-50 tokens, ``--probe-max-tokens`` greedy tokens), one at a time, each after a random pause
  of up to ``--max-gap-s`` so that they land at random points of the engine's steps; TTFT is
  the time from ``generate`` to the first output;
- the "big batch": ``c`` background requests kept in flight (as the batch worker keeps
  ``batch_concurrency`` lines in flight), each a fresh ~``--prompt-len``-token prompt (no prefix
  cache hits) generating ``--max-tokens`` tokens with ``ignore_eos``, at priority 1 (batch) or
  at priority 0 (as if there were no priorities), under each ``max_background_prefill_tokens``
  of ``--caps`` and with no cap (0).

Each scenario lets the background settle for ``--settle-s`` seconds (requests at every stage),
then sends the probes and counts the background's output tokens meanwhile (tokens/s, the cost
of the cap). All scenarios, idle included, run ``--repeats`` rounds round-robin, so that a slow
spell of a shared machine hits them all; a row gives the percentiles over all its probes. On a
shared machine every number still moves with the neighbours' load: compare scenarios of one
run, and rerun before trusting a small difference.

    python benchmarks/batch_priority.py                            # c = 8, 16; cap 64
    python benchmarks/batch_priority.py --caps 16,32,64,128 --concurrency 8

Results are printed and written as JSON to ``--out``; no test asserts them.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import time
from pathlib import Path

from serve import DEFAULT_MODEL, machine_check, make_prompts, percentile_ms

from lmforge.config import EngineConfig, ModelConfig
from lmforge.engine.async_engine import AsyncEngine
from lmforge.engine.request import BATCH_PRIORITY, ONLINE_PRIORITY, SamplingParams

QUESTIONS = ["What is the capital of France?", "How do bees make honey?",
             "Give me three tips for sleeping better.", "Why is the sky blue?",
             "What is a prime number?", "Suggest a name for a grey cat.",
             "How far away is the Moon?", "What should I cook tonight with rice and eggs?",
             "Explain photosynthesis in one sentence.", "Who wrote Romeo and Juliet?"]


def probe_prompts(engine: AsyncEngine, n: int) -> list[list[int]]:
    """``n`` different chat prompts (the model's template, its default system prompt)."""
    return [engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Question {i}: {QUESTIONS[i % len(QUESTIONS)]}"}],
        add_generation_prompt=True) for i in range(n)]


class Background:
    """``concurrency`` requests at ``priority`` kept in flight until ``stop()``; counts the
    output tokens delivered (``tokens``)."""

    def __init__(self, engine: AsyncEngine, args: argparse.Namespace, concurrency: int,
                 priority: int, numbers: itertools.count):
        self.engine, self.args, self.priority, self.numbers = engine, args, priority, numbers
        self.tokens = 0
        self.params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        self.tasks = [asyncio.ensure_future(self._worker()) for _ in range(concurrency)]

    async def _worker(self) -> None:
        while True:
            number = next(self.numbers)  # leads the prompt: no two share a cached block
            ids = self.engine.tokenizer.encode(make_prompts(1, self.args.prompt_len, number)[0])
            async for out in self.engine.generate(f"bg-{number}", ids, self.params,
                                                  priority=self.priority):
                self.tokens += len(out.token_ids)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()  # aborts the requests in flight
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def ttft(engine: AsyncEngine, request_id: str, ids: list[int], max_tokens: int) -> float:
    """Seconds from ``generate`` to the first output of one greedy online request."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start, first = time.perf_counter(), None
    async for _ in engine.generate(request_id, ids, params, priority=ONLINE_PRIORITY):
        first = first or time.perf_counter()
    return first - start


async def wait_idle(engine: AsyncEngine) -> None:
    while engine.stats().num_running or engine.stats().num_waiting:
        await asyncio.sleep(0.05)


async def scenario(engine: AsyncEngine, args: argparse.Namespace, name: str, concurrency: int,
                   priority: int, cap: int, numbers: itertools.count) -> dict:
    """One row: the probes' TTFTs under ``concurrency`` background requests at ``priority``."""
    engine.config.scheduler.max_background_prefill_tokens = cap  # read at every step
    rng = random.Random(0)
    background = Background(engine, args, concurrency, priority, numbers)
    await asyncio.sleep(args.settle_s if concurrency else 0)
    tokens_before, start = background.tokens, time.perf_counter()
    times = []
    for i, ids in enumerate(probe_prompts(engine, args.probes)):
        await asyncio.sleep(rng.uniform(0, args.max_gap_s))
        times.append(await ttft(engine, f"{name}-{i}", ids, args.probe_max_tokens))
    wall = time.perf_counter() - start
    background_tok_s = (background.tokens - tokens_before) / wall
    await background.stop()
    await wait_idle(engine)
    return {"scenario": name, "concurrency": concurrency, "priority": priority,
            "cap": cap if priority > ONLINE_PRIORITY else None,
            "ttft_p50_ms": percentile_ms(times, 50), "ttft_p90_ms": percentile_ms(times, 90),
            "background_tok_s": background_tok_s if concurrency else None,
            "ttft_ms": [round(t * 1e3, 1) for t in times]}


async def run_all(engine: AsyncEngine, args: argparse.Namespace) -> list[dict]:
    """Every scenario ``--repeats`` times, round-robin (so that a slow spell of a shared machine
    hits all of them); one row per scenario over the probes of all rounds."""
    numbers = itertools.count()
    caps = [int(c) for c in args.caps.split(",")]
    plan = [("idle", 0, ONLINE_PRIORITY, 0)]
    for c in [int(c) for c in args.concurrency.split(",")]:
        plan += [(f"batch cap {cap}", c, BATCH_PRIORITY, cap) for cap in caps]
        plan += [("batch no cap", c, BATCH_PRIORITY, 0), ("no priority", c, ONLINE_PRIORITY, 0)]
    await scenario(engine, args, "warm-up", 4, BATCH_PRIORITY, caps[0], numbers)  # not reported
    runs: dict[tuple, list[dict]] = {}
    for round_ in range(args.repeats):
        print(f"round {round_ + 1} of {args.repeats}", flush=True)
        for name, c, priority, cap in plan:
            row = await scenario(engine, args, name, c, priority, cap, numbers)
            runs.setdefault((name, c), []).append(row)
            print_rows([row])
    return [merge(rows) for rows in runs.values()]


def merge(rows: list[dict]) -> dict:
    """One scenario's rounds as one row: percentiles over all probes, the median round's
    background tokens/s, and each round's figures."""
    times = [t / 1e3 for r in rows for t in r["ttft_ms"]]
    background = [r["background_tok_s"] for r in rows if r["background_tok_s"] is not None]
    return {**rows[0], "ttft_p50_ms": percentile_ms(times, 50),
            "ttft_p90_ms": percentile_ms(times, 90),
            "background_tok_s": statistics.median(background) if background else None,
            "ttft_ms": [t for r in rows for t in r["ttft_ms"]],
            "rounds": [{k: r[k] for k in ("ttft_p50_ms", "ttft_p90_ms", "background_tok_s")}
                       for r in rows]}


def print_rows(rows: list[dict], idle_ms: float | None = None) -> None:
    for r in rows:
        ratio = f"{r['ttft_p50_ms'] / idle_ms:6.2f}x" if idle_ms else ""
        bg = f"{r['background_tok_s']:8.1f}" if r["background_tok_s"] is not None else f"{'-':>8}"
        print(f"{r['scenario']:<16} {r['concurrency']:>3} {r['ttft_p50_ms']:>9.1f} "
              f"{r['ttft_p90_ms']:>9.1f} {ratio:>7} {bg}", flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--concurrency", default="8,16", help="background requests in flight")
    p.add_argument("--caps", default="64", help="max_background_prefill_tokens values to run")
    p.add_argument("--probes", type=int, default=20, help="online requests per scenario and round")
    p.add_argument("--repeats", type=int, default=2, help="rounds over all scenarios")
    p.add_argument("--probe-max-tokens", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=100, help="background prompt tokens, about")
    p.add_argument("--max-tokens", type=int, default=64, help="background output tokens")
    p.add_argument("--settle-s", type=float, default=3.0)
    p.add_argument("--max-gap-s", type=float, default=0.2, help="random pause before a probe")
    p.add_argument("--out", type=Path,
                   default=Path(__file__).parent / "results" / "batch_priority.json")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    machine = [machine_check()]
    print(f"machine now: {machine[0]}", flush=True)
    engine = AsyncEngine.from_config(EngineConfig(model=ModelConfig(model=args.model)))
    engine.start()
    try:
        print(f"{'scenario':<16} {'c':>3} {'TTFT p50':>9} {'TTFT p90':>9} {'':>7} "
              f"{'bg tok/s':>8}   (ms)")
        rows = asyncio.run(run_all(engine, args))
    finally:
        engine.shutdown()
    machine.append(machine_check())
    idle_ms = next(r["ttft_p50_ms"] for r in rows if r["scenario"] == "idle")
    for r in rows:
        r["ttft_p50_over_idle"] = r["ttft_p50_ms"] / idle_ms
        r["ttft_p90_over_idle"] = r["ttft_p90_ms"] / idle_ms
    print(f"\nmodel {args.model}, {os.cpu_count()} CPUs, probes {args.probes} x "
          f"{args.probe_max_tokens} tokens, background prompts ~{args.prompt_len} tokens -> "
          f"{args.max_tokens} tokens; machine before / after: {machine[0]} / {machine[1]}")
    print(f"ratio = TTFT p50 / idle TTFT p50 ({idle_ms:.1f} ms); p50, p90 over the probes of all "
          f"{args.repeats} rounds, background tok/s of the median round")
    print(f"{'scenario':<16} {'c':>3} {'TTFT p50':>9} {'TTFT p90':>9} {'ratio':>7} "
          f"{'bg tok/s':>8}   (ms)")
    print_rows(rows, idle_ms)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                    "idle_ttft_ms": idle_ms, "machine_before_after": machine,
                                    "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
