"""The cost of structured output: decode time per token, constrained vs free, in the engine.

At concurrency c, c requests for the default model (SmolLM2-135M-Instruct GGUF) decode
``--max-tokens`` tokens each, greedy: once free (``ignore_eos``), once under a JSON schema
whose strings and arrays are long enough that no request finishes early (the grammar's mask is
computed for every row of every step, and the sampled token fed back). We time every engine step
once all prompts are prefilled and report the median decode step and the time per output token;
the difference is constrained / free - 1, and, because that difference of two medians swings by
+-10% between runs on a shared VM, the grammar's own time per step (mask + feeding tokens back,
timed directly) over the free step is printed as its share. Prefill, HTTP and detokenization are
the same in both and left out. Run in-process (``LLMEngine.step``), warm-up run first.

    python benchmarks/structured.py                     # concurrency 1 and 16
    python benchmarks/structured.py --concurrency 1,4,16,64 --max-tokens 96

Results are printed and written as JSON to ``--out``; no test asserts them. The issue's aim:
under 10% extra time per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from lmforge.config import CacheConfig, EngineConfig, ModelConfig
from lmforge.engine.llm_engine import LLMEngine
from lmforge.engine.request import SamplingParams, StructuredOutput

# A realistic schema (nested object, enum, bounded integers, arrays of strings) with room for
# --max-tokens tokens: no request completes it early.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "genre": {"enum": ["drama", "comedy", "documentary"]},
        "cast": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "role": {"type": "string"}},
            "required": ["name", "role"]}},
        "summary": {"type": "string"},
    },
    "required": ["title", "year", "genre", "cast", "summary"],
}


class GrammarClock:
    """Wall time spent in the grammar's share of a step: the mask (``Sampler._constrain``) and
    feeding tokens back (``LLMEngine._advance_grammar``), measured directly by wrapping those
    two methods on this engine instance. The difference of two step medians is too noisy on a
    shared VM (+-10% between runs); this is the cost itself."""

    def __init__(self, engine: LLMEngine):
        self.seconds = 0.0
        for owner, name in ((engine.sampler, "_constrain"), (engine, "_advance_grammar")):
            setattr(owner, name, self._timed(getattr(owner, name)))

    def _timed(self, method):
        def timed(*args):
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def run(engine: LLMEngine, concurrency: int, max_tokens: int, constrained: bool,
        clock: GrammarClock | None = None) -> dict:
    """Decode ``concurrency`` requests together; per-step times once all are decoding."""
    structured = StructuredOutput(json_schema=SCHEMA) if constrained else None
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=not constrained,
                            structured=structured)
    prompt = "Describe a film as JSON with a long summary and a large cast."
    for i in range(concurrency):
        engine.add_request(f"r{i}", engine.tokenizer.encode(f"Film {i}. {prompt}"), params)
    steps, grammar, tokens, finished_early = [], [], 0, 0
    while engine.has_unfinished_requests():
        decoding = all(r.output_token_ids for r in engine.scheduler.running) and \
            not engine.scheduler.waiting
        grammar_before = clock.seconds if clock else 0.0
        start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        if decoding and len(outputs) == concurrency:
            steps.append(elapsed)
            grammar.append((clock.seconds if clock else 0.0) - grammar_before)
            tokens += len(outputs)
        finished_early += sum(o.finished and o.num_output_tokens < max_tokens for o in outputs)
    return {"median_step_ms": statistics.median(steps) * 1e3,
            "grammar_ms_per_step": statistics.mean(grammar) * 1e3,
            "ms_per_token": sum(steps) / max(tokens, 1) * 1e3,
            "steps": len(steps), "finished_early": finished_early}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; median kept")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                        "structured.json")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=args.model, max_model_len=1024),
                                    cache=CacheConfig(num_blocks=max(64, 8 * max(levels)))))
    clock = GrammarClock(engine)
    run(engine, 2, 8, True)  # warm-up: kernels and the grammar library's tokenizer
    results = []
    print(f"{'c':>4} {'free ms/step':>13} {'json ms/step':>13} {'difference':>11} "
          f"{'grammar ms/step':>16} {'grammar share':>14}")
    for c in levels:
        cell = {}
        for constrained in (False, True):
            runs = [run(engine, c, args.max_tokens, constrained, clock)
                    for _ in range(args.repeats)]
            best = sorted(runs, key=lambda r: r["median_step_ms"])[len(runs) // 2]
            cell["json" if constrained else "free"] = best
        overhead = cell["json"]["median_step_ms"] / cell["free"]["median_step_ms"] - 1
        share = cell["json"]["grammar_ms_per_step"] / cell["free"]["median_step_ms"]
        results.append({"concurrency": c, **cell, "difference": overhead, "grammar_share": share})
        print(f"{c:>4} {cell['free']['median_step_ms']:>13.2f} "
              f"{cell['json']['median_step_ms']:>13.2f} {overhead:>10.1%} "
              f"{cell['json']['grammar_ms_per_step']:>16.3f} {share:>13.1%}"
              + (f"  ({cell['json']['finished_early']} finished early)"
                 if cell["json"]["finished_early"] else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "max_tokens": args.max_tokens,
                                    "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
