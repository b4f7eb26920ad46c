"""DPO benchmark: the reference log-prob pass through both paths the issue names, and DPO training.

1. ``reference``: the reference model's summed answer log-probs of ``--pairs`` preference pairs
   (``training.corpora.concise_reply_preferences`` on Shakespeare's dialogue), measured two ways
   on the same model:
   - ``training_forward``: ``methods.dpo.reference_logps``, the trainer's float32 forward under
     ``no_grad`` (what a DPO run uses);
   - ``engine_prompt_logprobs``: the serving engine (``LLM``, continuous batching, its own fused
     kernels and weight format) with ``prompt_logprobs=0`` and ``max_tokens=1`` on every
     ``prompt + answer`` sequence, summing the answer positions.
   Tokens/s counts every token of both sequences of each pair; ``max_abs_diff`` is the largest
   difference between the two paths' log-probs, in nats (the engine's weights may be quantized).
2. ``training``: ``trainer.train`` with the DPO method on the same pairs (reference log-probs
   precomputed), optimizer steps and tokens/s from the first to the last step.

    python benchmarks/dpo.py                          # SmolLM2-135M, 64 pairs
    python benchmarks/dpo.py --model path/to/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf

Results are printed and written as JSON to ``--out``; no test asserts them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lmforge.config import ModelConfig
from lmforge.engine.llm import LLM
from lmforge.engine.request import SamplingParams
from lmforge.models.loader import load_model
from lmforge.training.corpora import concise_reply_preferences, shakespeare_dialogue
from lmforge.training.events import StepEvent
from lmforge.training.methods.dpo import reference_logps
from lmforge.training.preferences import read_preferences
from lmforge.training.trainer import TrainingConfig, pad_token_id, train


def reference_paths(model: str, pairs_file: Path, max_seq_len: int) -> dict:
    loaded = load_model(ModelConfig(model=model, dtype="float32"), for_training=True)
    pairs = read_preferences(pairs_file, loaded.tokenizer, max_seq_len)
    tokens = sum(p.num_tokens for p in pairs)
    start = time.perf_counter()
    trained = reference_logps(loaded.model, pairs, pad_token_id(loaded))
    forward_s = time.perf_counter() - start
    del loaded

    llm = LLM(model, max_model_len=max(max_seq_len + 1, 256))
    sequences = [p.prompt_ids + answer for p in pairs for answer in (p.chosen_ids,
                                                                      p.rejected_ids)]
    start = time.perf_counter()
    outs = llm.generate(sequences, SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                  temperature=0), use_tqdm=False)
    engine_s = time.perf_counter() - start
    engine = torch.tensor([sum(e.logprob for e in out.prompt_logprobs[len(p.prompt_ids):])
                           for p, out in zip([p for p in pairs for _ in (0, 1)], outs)])
    return {"pairs": len(pairs), "tokens": tokens,
            "training_forward": {"seconds": forward_s, "tokens_per_s": tokens / forward_s},
            "engine_prompt_logprobs": {"seconds": engine_s, "tokens_per_s": tokens / engine_s},
            "max_abs_diff": float((engine.view(-1, 2) - trained).abs().max())}


def training_speed(model: str, pairs_file: Path, max_seq_len: int, batch_size: int) -> dict:
    times: list[float] = []

    def on_event(event) -> None:
        if isinstance(event, StepEvent):
            times.append(time.perf_counter())

    config = TrainingConfig(method="dpo", n_epochs=1, batch_size=batch_size,
                            max_seq_len=max_seq_len)
    with tempfile.TemporaryDirectory() as out:
        result = train(model, pairs_file, None, config, out, on_event=on_event, resume=False)
    steps = len(times) - 1  # timed from the end of the first step (warm-up) to the last
    per_step = (times[-1] - times[0]) / max(steps, 1)
    tokens_per_step = result.trained_tokens / result.steps
    return {"steps": result.steps, "batch_size": batch_size, "seconds_per_step": per_step,
            "tokens_per_s": tokens_per_step / per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dpo.json"))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        pairs_file = Path(tmp) / "pairs.jsonl"
        rows = concise_reply_preferences(shakespeare_dialogue(), limit=args.pairs)
        pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        results = {"model": args.model, "threads": torch.get_num_threads(),
                   "reference": reference_paths(args.model, pairs_file, args.max_seq_len),
                   "training": training_speed(args.model, pairs_file, args.max_seq_len,
                                              args.batch_size)}
    ref = results["reference"]
    print(f"reference pass, {ref['pairs']} pairs, {ref['tokens']} tokens:")
    for path in ("training_forward", "engine_prompt_logprobs"):
        print(f"  {path:<24} {ref[path]['tokens_per_s']:>9,.0f} tokens/s "
              f"({ref[path]['seconds']:.1f} s)")
    print(f"  max |difference|         {ref['max_abs_diff']:.4f} nats")
    tr = results["training"]
    print(f"DPO training: {tr['tokens_per_s']:,.0f} tokens/s, {tr['seconds_per_step']:.2f} s per "
          f"step of {tr['batch_size']} pairs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
