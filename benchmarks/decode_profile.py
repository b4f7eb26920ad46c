"""Where the time of a decode step goes, at concurrency 1: linear layers, attention, norms and
RoPE, the LM head, the sampler, the model runner's input preparation, the engine's bookkeeping
(scheduler, detokenizer, outputs), and what is left in the model's Python; with ``--http``, the
server's own overhead too (median inter-token latency of one streaming request minus the
offline step).

    python benchmarks/decode_profile.py                         # the default model, 64 steps
    python benchmarks/decode_profile.py --serve-args "--deterministic" --http

Timers wrap the engine's functions (module hooks on the linear and norm layers, wrappers on
``paged_attention``, ``RotaryEmbedding.apply``, the sampler, the runner); each step's parts are
summed over the decode steps of one greedy request and printed per step in ms. Where the
fused decoder runs (a quantized float32 model), its one call holds every decoder layer's
linear layers, attention, norms and RoPE, and is timed as one part. Results go to
``--out`` as JSON; no test asserts them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import time
from collections import defaultdict
from pathlib import Path

FUSED = "decoder layers in one compiled call (models/fused_decode.py)"
LINEAR_TYPES = ("Linear", "PackedLinear", "Int4DecodeLinear", "QuantLinear", "BatchInvariantLinear",
                "MultiLoRALinear")


class Timers:
    """Seconds per category, summed; ``wrap`` times a function, ``hook`` a module's forward."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._starts: list[float] = []

    def wrap(self, fn, category: str):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[category] += time.perf_counter() - start
        return timed

    def hook(self, module, category: str) -> None:
        module.register_forward_pre_hook(lambda *_: self._starts.append(time.perf_counter()))

        def done(*_):
            self.seconds[category] += time.perf_counter() - self._starts.pop()
        module.register_forward_hook(done)


def instrument(llm, timers: Timers) -> None:
    """Wrap the engine's parts in ``timers`` (in place)."""
    import lmforge.models.gpt as gpt
    import lmforge.models.llama as llama
    from lmforge.models.fused_decode import FusedDecoder
    from lmforge.models.layers import RotaryEmbedding

    engine = llm.engine
    model = engine.model_runner.model
    outer: list[str] = []  # linears hooked; a linear inside one (a wrapped base) is not
    for name, module in model.named_modules():  # parents come before their children
        kind = type(module).__name__
        if any(name.startswith(p + ".") for p in outer):
            continue
        if kind in LINEAR_TYPES and name:
            outer.append(name)
            timers.hook(module, "LM head" if name == "lm_head" else "linear layers")
        elif kind in ("RMSNorm", "LayerNorm"):
            timers.hook(module, "norms and RoPE")
    timers.hook(model, "model forward")
    for mod in (llama, gpt):
        if hasattr(mod, "paged_attention"):
            mod.paged_attention = timers.wrap(mod.paged_attention, "attention")
            mod.write_kv = timers.wrap(mod.write_kv, "attention")
    RotaryEmbedding.apply = staticmethod(timers.wrap(RotaryEmbedding.apply, "norms and RoPE"))
    FusedDecoder.__call__ = timers.wrap(FusedDecoder.__call__, FUSED)
    runner = engine.model_runner
    runner.execute = timers.wrap(runner.execute, "execute")
    engine.sampler.sample = timers.wrap(engine.sampler.sample, "sampler")
    engine.step = timers.wrap(engine.step, "step")


def breakdown(seconds: dict[str, float], steps: int) -> dict[str, float]:
    """Per-step milliseconds by part; the composite timers become remainders."""
    ms = {k: v / steps * 1e3 for k, v in seconds.items()}
    parts = {k: ms.get(k, 0.0) for k in (FUSED, "linear layers", "attention", "norms and RoPE",
                                           "LM head", "sampler")}
    parts["other model ops (embedding, residuals, activation, Python)"] = (
        ms.get("model forward", 0.0) - parts[FUSED] - parts["linear layers"] - parts["attention"]
        - parts["norms and RoPE"])
    parts["model runner (inputs, metadata)"] = (ms.get("execute", 0.0) - ms.get("model forward", 0.0)
                                                - parts["LM head"])
    parts["engine (scheduler, detokenizer, outputs)"] = (ms.get("step", 0.0) - ms.get("execute", 0.0)
                                                         - parts["sampler"])
    parts["step total"] = ms.get("step", 0.0)
    return parts


def profile_offline(args: argparse.Namespace) -> tuple[dict[str, float], int]:
    import inspect

    from lmforge.cli.serve import engine_config, serve
    from lmforge.engine.llm import LLM
    from lmforge.engine.request import SamplingParams

    # the same options `lmforge serve` takes, parsed by its own command
    options = serve.make_context("serve", ["--model", args.model, *shlex.split(args.serve_args)]).params
    wanted = inspect.signature(engine_config).parameters
    given = {k: v for k, v in options.items() if k in wanted}
    # no prefix cache: the warm-up's prompt would otherwise skip the profiled request's prefill
    config = engine_config(**{"chat_template": None, **given, "no_prefix_caching": True})
    llm = LLM(args.model, config=config)
    params = SamplingParams(max_tokens=args.steps + 1, temperature=0.0, ignore_eos=True)
    prompt = "Write a story about the ocean. " * 8
    llm.generate([prompt], params, use_tqdm=False)  # warm-up
    plain_ms = decode_steps(llm, prompt, params)[0]
    timers = Timers()
    instrument(llm, timers)
    timers.seconds.clear()
    _, steps = decode_steps(llm, prompt, params, on_prefill=timers.seconds.clear)
    parts = breakdown(timers.seconds, steps)
    parts["step without timers"] = plain_ms
    return parts, steps


def decode_steps(llm, prompt: str, params, on_prefill=lambda: None) -> tuple[float, int]:
    """(ms per decode step, steps) of one request run to the end, its prefill step left out."""
    engine = llm.engine
    engine.add_request(f"profiled-{time.monotonic()}", engine.tokenizer.encode(prompt), params)
    engine.step()  # the prefill: not a decode step
    on_prefill()
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return (time.perf_counter() - start) / steps * 1e3, steps


def http_itl_ms(args: argparse.Namespace) -> float:
    """Median inter-token latency of one streaming request on a real server (benchmarks/serve.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from serve import run_level
    from servers import start_server, stop_server

    proc = start_server(args, args.out.with_suffix(".server.log"))
    try:
        args.max_tokens = args.steps + 1
        return asyncio.run(run_level(args, ["Write a story about the ocean. " * 8], 1))[
            "itl_p50_ms"]
    finally:
        stop_server(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=64, help="decode steps profiled")
    p.add_argument("--serve-args", default="", help="`lmforge serve` options (--deterministic)")
    p.add_argument("--http", action="store_true", help="also measure the server's overhead")
    p.add_argument("--port", type=int, default=8013)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_profile.json"))
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    parts, steps = profile_offline(args)
    if args.http:
        itl = http_itl_ms(args)
        parts["HTTP, asyncio and streaming (server ITL p50 - offline step)"] = (
            itl - parts["step without timers"])
        parts["server ITL p50"] = itl
    total = parts["step total"]
    print(f"{args.model} {args.serve_args!r}: one decode step at concurrency 1, "
          f"mean of {steps} steps")
    for name, value in parts.items():
        share = ("" if name in ("step total", "server ITL p50", "step without timers")
                 else f"{value / total:6.1%}")
        print(f"  {name:<62} {value:7.2f} ms {share}")
    args.out.write_text(json.dumps({"model": args.model, "serve_args": args.serve_args,
                                    "steps": steps, "ms_per_step": parts}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
