"""Pretraining benchmark: training tokens/s by model shape and dtype, the validation loss a
ten-minute run reaches, and serving a GPT-2-shaped model next to transformers.

1. ``throughput``: optimizer steps (forward, backward, AdamW) of ``training.pretraining``'s loss
   on random tokens, for a ~10M-parameter GPT-2 and a GPT-2-small-shaped one (12 x 768, 12 heads,
   context 1024, SmolLM2's 49,152-token vocabulary, 124M-ish parameters), in float32 and with
   bfloat16 autocast (on a CPU without native bf16, ~30x slower: one step of the small model
   only); the median of ``--steps`` timed steps after one warm-up step. Beside them the same
   step of ``transformers``' ``GPT2LMHeadModel`` in float32, the peer.
2. ``ten_minutes``: ``lmforge pretrain`` with its default settings on the whole Shakespeare
   corpus for ``--minutes`` (10), as the README's command runs it: steps, tokens, validation loss
   and perplexity against the unigram baseline.
3. ``serve``: ``benchmarks/serve.py`` on a GPT-2-small-shaped checkpoint (random weights, written
   by ``save_gpt_pretrained``): lmforge's server against ``transformers.generate`` on the same
   weights, output tokens/s at each concurrency.

    python benchmarks/pretrain.py                       # all three (~20 minutes on 2 cores)
    python benchmarks/pretrain.py --parts throughput --steps 3

Results are printed and written as JSON to ``--out``; no test asserts them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmforge.models.gpt import GPTConfig, GPTLMHeadModel
from lmforge.models.gpt_hf import save_gpt_pretrained
from lmforge.training.pretraining import PretrainConfig, pretrain
from lmforge.training.pretraining.devices import cpu_has_native_bf16
from lmforge.training.pretraining.prepare import build_optimizer
from lmforge.training.pretraining.run import next_token_loss

SMALL_10M = {"n_layer": 6, "n_head": 6, "n_embd": 384, "n_positions": 256, "vocab_size": 8192}
GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024,
              "vocab_size": 49152}
SHAPES = {"gpt2-10m": (SMALL_10M, 16), "gpt2-small": (GPT2_SMALL, 2)}  # config, batch size


def time_steps(sizes: dict, batch: int, amp: torch.dtype | None, steps: int,
               warmup: int = 1) -> dict:
    """Median seconds of one optimizer step of ``batch`` x ``n_positions`` random tokens, after
    ``warmup`` untimed steps."""
    torch.manual_seed(0)
    model = GPTLMHeadModel(GPTConfig(**sizes))
    model.init_weights_()
    optimizer = build_optimizer(PretrainConfig(), model)
    times = []
    for _ in range(steps + warmup):
        ids = torch.randint(0, sizes["vocab_size"], (batch, sizes["n_positions"] + 1))
        start = time.perf_counter()
        next_token_loss(model, ids[:, :-1], ids[:, 1:], amp).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    median = statistics.median(times[warmup:])
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"parameters": params, "batch": batch, "context": sizes["n_positions"],
            "step_s": median, "tokens_per_s": batch * sizes["n_positions"] / median}


def time_hf_steps(sizes: dict, batch: int, steps: int) -> dict:
    """The same step on ``transformers``' ``GPT2LMHeadModel`` (SDPA attention, float32): the
    peer for our training path (the engine's flat batch with one SDPA call per sequence)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**sizes, attn_implementation="sdpa", resid_pdrop=0.0,
                                       bos_token_id=0, eos_token_id=0,
                                       embd_pdrop=0.0, attn_pdrop=0.0))
    optimizer = build_optimizer(PretrainConfig(), model)
    times = []
    for _ in range(steps + 1):
        ids = torch.randint(0, sizes["vocab_size"], (batch, sizes["n_positions"]))
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    median = statistics.median(times[1:])
    return {"batch": batch, "context": sizes["n_positions"], "step_s": median,
            "tokens_per_s": batch * sizes["n_positions"] / median}


def throughput(args: argparse.Namespace) -> dict:
    native = cpu_has_native_bf16()
    results = {"cpu_native_bf16": native, "threads": torch.get_num_threads()}
    for name, (sizes, batch) in SHAPES.items():
        for label, amp in (("float32", None), ("bfloat16", torch.bfloat16)):
            steps = args.steps
            if amp is not None and not native:  # emulated bf16: ~30x slower, time the small one
                if name != "gpt2-10m":
                    print(f"{name:11s} {label:9s} skipped: no native bf16 on this CPU", flush=True)
                    continue
                steps, warmup = 1, 0
            else:
                warmup = 1
            row = time_steps(sizes, batch, amp, steps, warmup)
            results[f"{name}/{label}"] = row
            print(f"{name:11s} {label:9s} {row['parameters'] / 1e6:6.1f}M params  "
                  f"{row['tokens_per_s']:9,.0f} tokens/s  ({row['step_s']:.2f} s/step)",
                  flush=True)
        row = time_hf_steps(sizes, batch, args.steps)
        results[f"{name}/transformers-float32"] = row
        print(f"{name:11s} transformers float32    {row['tokens_per_s']:9,.0f} tokens/s  "
              f"({row['step_s']:.2f} s/step)", flush=True)
    return results


def ten_minutes(args: argparse.Namespace) -> dict:
    from lmforge.training.corpora import shakespeare_texts

    out = args.work / "shakespeare-gpt"
    result = pretrain(train=[str(p) for p in shakespeare_texts()], out=str(out),
                      max_minutes=args.minutes, show_progress=not args.quiet)
    row = {"minutes": args.minutes, "steps": result.steps, "tokens": result.tokens,
           "parameters": result.num_parameters, "val_loss": result.val_loss,
           "val_perplexity": result.val_perplexity, "unigram_entropy": result.unigram_entropy,
           "out": str(out)}
    print(f"{args.minutes} min: {result.steps} steps, {result.tokens:,} tokens; validation loss "
          f"{result.val_loss:.3f} (perplexity {result.val_perplexity:.1f}); unigram baseline "
          f"{result.unigram_entropy:.3f}", flush=True)
    return row


def serve(args: argparse.Namespace) -> dict:
    from lmforge.models.loader import resolve_model_path
    from lmforge.tokenizer import Tokenizer

    directory = args.work / "gpt2-small-random"
    torch.manual_seed(0)
    model = GPTLMHeadModel(GPTConfig(**GPT2_SMALL))
    model.init_weights_()
    tokenizer = Tokenizer.from_gguf(resolve_model_path("smollm2-135m-instruct")[0]).hf
    tokenizer.save_pretrained(str(directory))
    save_gpt_pretrained(model, directory, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    out = args.work / "serve-gpt2-small.json"
    command = [sys.executable, str(Path(__file__).parent / "serve.py"), "--model",
               str(directory), "--concurrency", args.concurrency, "--max-tokens", "64",
               "--hf-dtype", "float32", "--repeats", "1", "--out", str(out)]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


PARTS = {"throughput": throughput, "ten_minutes": ten_minutes, "serve": serve}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per shape/dtype")
    p.add_argument("--minutes", type=float, default=10.0, help="the pretraining run's budget")
    p.add_argument("--concurrency", default="1,8", help="serving levels (serve.py)")
    p.add_argument("--work", type=Path, default=Path("benchmarks/results/pretrain"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pretrain.json"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for part in args.parts.split(","):
        print(f"== {part}", flush=True)
        results[part] = PARTS[part](args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
