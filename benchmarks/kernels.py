"""Kernel micro-benchmarks behind two engine choices; prints microseconds per call, writes JSON.

1. Decode attention (one query per sequence, SmolLM2's 9 query / 3 KV heads): PyTorch SDPA vs
   ``lmforge.models.attention.decode_attention`` (two batched matmuls).
2. Linear layers in bf16: ``F.linear`` vs ``lmforge.models.packing.PackedLinear``.

    python benchmarks/kernels.py [--out benchmarks/results/kernels.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.models.attention import decode_attention
from lmforge.models.packing import PackedLinear, can_pack


def timed(fn, repeats: int = 100) -> float:
    """Mean microseconds per call after a short warm-up."""
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def attention_rows(dtype: torch.dtype) -> list[dict]:
    rows = []
    for batch, length in [(1, 100), (16, 200), (64, 200)]:
        q = torch.randn(batch, 9, 64, dtype=dtype)
        k, v = (torch.randn(batch, length, 3, 64, dtype=dtype) for _ in range(2))
        bias = torch.zeros(batch, 1, 1, length)
        mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        sdpa = timed(lambda: F.scaled_dot_product_attention(
            q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True))
        ours = timed(lambda: decode_attention(q, k, v, bias, 0.125))
        rows.append({"kernel": "decode_attention", "dtype": str(dtype), "batch": batch,
                     "context": length, "sdpa_us": sdpa, "lmforge_us": ours})
    return rows


def linear_rows() -> list[dict]:
    rows = []
    for n_in, n_out in [(576, 1536), (1536, 576), (576, 49152)]:
        layer = torch.nn.Linear(n_in, n_out, bias=False).to(torch.bfloat16)
        packed = PackedLinear(layer)
        for batch in (1, 16, 64):
            x = torch.randn(batch, n_in, dtype=torch.bfloat16)
            rows.append({"kernel": f"linear {n_in}x{n_out}", "dtype": "torch.bfloat16",
                         "batch": batch, "f_linear_us": timed(lambda: F.linear(x, layer.weight)),
                         "packed_us": timed(lambda: packed(x))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels.json"))
    args = parser.parse_args()
    rows = attention_rows(torch.float32) + attention_rows(torch.bfloat16)
    if can_pack(torch.bfloat16, torch.device("cpu")):
        rows += linear_rows()
    for row in rows:
        print("  ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
