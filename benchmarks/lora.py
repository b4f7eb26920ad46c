"""Decode step time with 0, 1 and 4 distinct LoRA adapters in a batch of 8 on SmolLM2.

Random rank-``--rank`` adapters on all seven projections are written in PEFT format to a
temporary directory; 8 requests (~32-token prompts, greedy, ``ignore_eos``) decode together
through ``LLMEngine`` with none, one or four adapters spread over them. The median time of the
pure-decode steps is printed and written as JSON (``benchmarks/results/lora.json``).

    .venv/bin/python benchmarks/lora.py [--model smollm2-135m-instruct] [--rank 8] [--steps 48]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.config import CacheConfig, EngineConfig, ModelConfig
from lmforge.engine.llm_engine import LLMEngine
from lmforge.engine.request import SamplingParams
from lmforge.models.lora import (
    CONFIG_FILE,
    PEFT_PREFIX,
    SUPPORTED_TARGETS,
    WEIGHTS_FILE,
    LoRAConfig,
    peft_config_dict,
)

BATCH = 8


def write_adapter(directory: Path, engine: LLMEngine, rank: int, seed: int) -> None:
    """A random PEFT adapter for every projection of the engine's model."""
    cfg = engine.model_runner.model.config
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"self_attn.q_proj": (cfg.hidden_size, q), "self_attn.k_proj": (cfg.hidden_size, kv),
              "self_attn.v_proj": (cfg.hidden_size, kv), "self_attn.o_proj": (q, cfg.hidden_size),
              "mlp.gate_proj": (cfg.hidden_size, cfg.intermediate_size),
              "mlp.up_proj": (cfg.hidden_size, cfg.intermediate_size),
              "mlp.down_proj": (cfg.intermediate_size, cfg.hidden_size)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(cfg.num_hidden_layers):
        for name, (n_in, n_out) in shapes.items():
            key = f"{PEFT_PREFIX}model.layers.{i}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * 0.01
    directory.mkdir(parents=True)
    save_file(tensors, directory / WEIGHTS_FILE)
    config = LoRAConfig(r=rank, lora_alpha=2 * rank, target_modules=SUPPORTED_TARGETS)
    (directory / CONFIG_FILE).write_text(json.dumps(peft_config_dict(config, "benchmark")))


def decode_step_ms(engine: LLMEngine, loras: list[str | None], steps: int, tag: str) -> float:
    """Median wall time (ms) of the pure-decode steps of BATCH requests with these adapters."""
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i, lora in enumerate(loras):
        prompt = [(i * 977 + j * 13) % 40000 + 100 for j in range(32)]
        engine.add_request(f"{tag}-{i}", prompt, params, lora=lora)
    times = []
    while engine.has_unfinished_requests():
        decoding = all(r.num_computed_tokens >= r.num_prompt_tokens
                       for r in engine.scheduler.requests.values())
        start = time.perf_counter()
        engine.step()
        if decoding and len(engine.scheduler.running) == BATCH:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/lora.json")
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=args.model),
                                    cache=CacheConfig(enable_prefix_caching=False)))
    layouts = {0: [None] * BATCH, 1: ["a0"] * BATCH,
               4: [f"a{i % 4}" for i in range(BATCH)]}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(4):
            write_adapter(Path(tmp) / f"a{i}", engine, args.rank, seed=i)
            engine.add_lora(f"a{i}", str(Path(tmp) / f"a{i}"))
        decode_step_ms(engine, layouts[4], 4, "warmup")
        results = {n: [] for n in layouts}
        for r in range(args.repeats):
            for n, loras in layouts.items():
                results[n].append(decode_step_ms(engine, loras, args.steps, f"{r}-{n}"))
    dtype = str(next(engine.model_runner.model.parameters()).dtype)
    print(f"{args.model} ({dtype}), batch {BATCH}, rank {args.rank}, median decode step (ms)")
    summary = {}
    for n, ms in results.items():
        summary[n] = statistics.median(ms)
        print(f"  {n} distinct adapters: {summary[n]:.2f} ms  (runs: "
              f"{', '.join(f'{m:.2f}' for m in ms)})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "dtype": dtype, "batch": BATCH,
                               "rank": args.rank, "median_step_ms": summary,
                               "runs_ms": results}, indent=2))


if __name__ == "__main__":
    main()
