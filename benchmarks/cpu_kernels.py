"""Kernel micro-benchmarks behind the engine's CPU choices; prints microseconds per call, writes JSON.

Each section compares the way lmforge does it with the obvious alternative, on SmolLM2-135M's
shapes (576 hidden, 9 query / 3 KV heads of 64, 1536 MLP, 30 layers):

1. ``kv_gather``: reading decode contexts out of the paged cache. Advanced indexing per slot vs
   ``index_select`` per slot vs ``index_select`` of whole blocks from the head-major cache.
2. ``decode_attention``: one query per sequence, bf16, over 30 layers' caches (so the KV comes
   from memory, as in a real step), gather included: the previous slot-major layout (per-slot
   gather, K/V copied by the permuted matmuls) vs the head-major block gather and two batched
   matmuls (``decode_attention``) vs bf16 and fp32 SDPA on the same gathered blocks.
3. ``prefill_sdpa``: a causal bf16 chunk through SDPA with 3-D vs 4-D operands.
4. ``linear_stack``: every linear layer of the model, distinct weights (cold, as in a step), by
   batch rows: 210 unfused prepacked bf16 layers vs the 120 fused ones the engine runs, in bf16
   and as 4-bit GGUF weights through PyTorch's int4 kernel.
5. ``linear``: one bf16 layer, ``F.linear`` vs prepacked.
6. ``rms_norm`` and ``rope``: the float32 chains of the reference formulas vs ours (RoPE on q
   and k heads that the fused projection already put side by side; the reference concatenates).

    python benchmarks/cpu_kernels.py [--out benchmarks/results/kernels.json]

Timings on a shared 2-core VM move by 10% between runs; compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.models.attention import block_rows, decode_attention, gather_blocks
from lmforge.models.layers import RMSNorm, RotaryEmbedding
from lmforge.models.packing import PackedLinear, can_pack
from lmforge.models.quant import GROUP_SIZE, can_use_int4

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS = 576, 9, 3, 64, 1536, 30
BLOCK, NUM_BLOCKS = 16, 2048
LINEAR_SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, 192), (HIDDEN, 192), (HIDDEN, HIDDEN),
                 (HIDDEN, MLP), (HIDDEN, MLP), (MLP, HIDDEN)]  # (in, out): q k v o gate up down
FUSED_SHAPES = [(HIDDEN, HIDDEN + 2 * 192), (HIDDEN, HIDDEN), (HIDDEN, 2 * MLP),
                (MLP, HIDDEN)]  # what the engine runs: qkv o gate_up down


def timed(fn, repeats: int = 100, trials: int = 5) -> float:
    """Best-of-``trials`` mean microseconds per call, after a warm-up."""
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats * 1e6)
    return best


def per_layer_cold(fn, caches: list[torch.Tensor], trials: int = 9) -> float:
    """Median microseconds of ``fn(cache)`` per layer, each trial sweeping every layer once."""
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        for cache in caches:
            fn(cache)
        times.append((time.perf_counter() - start) / len(caches) * 1e6)
    return statistics.median(times)


def kv_gather_rows() -> list[dict]:
    slot_major = [torch.randn(NUM_BLOCKS * BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
                  for _ in range(LAYERS)]
    head_major = [c.transpose(0, 1).contiguous() for c in slot_major]
    rows = []
    for batch, length in [(1, 130), (16, 130), (64, 130)]:
        width = -(-length // BLOCK)
        table = torch.randperm(NUM_BLOCKS)[:batch * width].view(batch, width)
        slots = (table[:, :, None] * BLOCK + torch.arange(BLOCK)).view(batch, -1)[:, :length]
        flat, rows_ = slots.reshape(-1), block_rows(table, KV_HEADS, NUM_BLOCKS)
        rows.append({
            "kernel": "kv_gather", "batch": batch, "context": length,
            "advanced_index_us": per_layer_cold(lambda c: c[slots], slot_major),
            "index_select_slots_us": per_layer_cold(lambda c: c.index_select(0, flat), slot_major),
            "index_select_blocks_us": per_layer_cold(lambda c: gather_blocks(c, rows_, BLOCK),
                                                     head_major)})
    return rows


def slot_major_attention(q, k_cache, slots, bias):
    """The previous layout: (num_slots, n_kv, D) cache, per-slot gather, matmuls on permuted K/V."""
    batch, length = slots.shape
    kv = k_cache.index_select(0, slots.reshape(-1)).view(batch, length, KV_HEADS, HEAD_DIM)
    qg = q.view(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    scores = torch.matmul(qg, kv.permute(0, 2, 3, 1)) * HEAD_DIM ** -0.5  # copies K
    probs = torch.softmax(scores.float() + bias, dim=-1).to(q.dtype)
    return torch.matmul(probs, kv.transpose(1, 2))  # copies V


def decode_attention_rows() -> list[dict]:
    caches = [torch.randn(KV_HEADS, NUM_BLOCKS * BLOCK, HEAD_DIM, dtype=torch.bfloat16)
              for _ in range(LAYERS)]
    slot_major = [c.transpose(0, 1).contiguous() for c in caches]
    rows = []
    for batch, length in [(1, 130), (4, 130), (8, 130), (16, 130), (64, 130)]:
        width = -(-length // BLOCK)
        table = torch.randperm(NUM_BLOCKS)[:batch * width].view(batch, width)
        index = block_rows(table, KV_HEADS, NUM_BLOCKS)
        q = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16)
        bias = torch.zeros(batch, 1, 1, width * BLOCK)
        bias[..., length:] = float("-inf")

        def context(cache):
            return gather_blocks(cache, index, BLOCK).view(batch, KV_HEADS, -1, HEAD_DIM)

        def bmm(cache):
            kv = context(cache)
            return decode_attention(q, kv, kv, bias, HEAD_DIM ** -0.5)

        def sdpa_bf16(cache):
            kv = context(cache)
            return F.scaled_dot_product_attention(q.unsqueeze(2), kv, kv, attn_mask=bias,
                                                  scale=HEAD_DIM ** -0.5, enable_gqa=True)

        def sdpa_fp32(cache):
            kv = context(cache).float()
            return F.scaled_dot_product_attention(q.float().unsqueeze(2), kv, kv, attn_mask=bias,
                                                  scale=HEAD_DIM ** -0.5, enable_gqa=True)

        slots = (table[:, :, None] * BLOCK + torch.arange(BLOCK)).view(batch, -1)
        rows.append({"kernel": "decode_attention", "batch": batch, "context": length,
                     "slot_major_bmm_bf16_us": per_layer_cold(
                         lambda c: slot_major_attention(q, c, slots, bias), slot_major),
                     "two_bmm_bf16_us": per_layer_cold(bmm, caches),
                     "sdpa_bf16_us": per_layer_cold(sdpa_bf16, caches),
                     "sdpa_fp32_us": per_layer_cold(sdpa_fp32, caches)})
    return rows


def prefill_sdpa_rows() -> list[dict]:
    rows = []
    for n in (64, 512):
        q = torch.randn(HEADS, n, HEAD_DIM, dtype=torch.bfloat16)
        k, v = (torch.randn(KV_HEADS, n, HEAD_DIM, dtype=torch.bfloat16) for _ in range(2))
        rows.append({"kernel": "prefill_sdpa", "tokens": n, "sdpa_3d_us": timed(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            repeats=5), "sdpa_4d_us": timed(
            lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                                   enable_gqa=True), repeats=5)})
    return rows


def _stack(shapes: list[tuple[int, int]], int4: bool) -> list[tuple]:
    """LAYERS copies of ``shapes`` as (in_features, packed bf16 layer, int4 weight, scales)."""
    layers = []
    for _ in range(LAYERS):
        for n_in, n_out in shapes:
            packed = PackedLinear(torch.nn.Linear(n_in, n_out, bias=False).to(torch.bfloat16))
            codes = torch.randint(0, 16, (n_out, n_in), dtype=torch.int32)
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1) if int4 else None
            scale_zero = torch.randn(n_in // GROUP_SIZE, n_out, 2, dtype=torch.bfloat16) * 0.01
            layers.append((n_in, packed, weight, scale_zero))
    return layers


def linear_stack_rows() -> list[dict]:
    fused, unfused = _stack(FUSED_SHAPES, int4=True), _stack(LINEAR_SHAPES, int4=False)
    rows = []
    for batch in (1, 4, 8, 12, 16, 32):
        x = {n: torch.randn(batch, n, dtype=torch.bfloat16) for n in (HIDDEN, MLP)}

        def run_packed(stack):
            for n_in, layer, _, _ in stack:
                layer(x[n_in])

        def run_int4():
            for n_in, _, weight, scale_zero in fused:
                torch.ops.aten._weight_int4pack_mm_for_cpu(x[n_in], weight, GROUP_SIZE,
                                                           scale_zero)

        rows.append({"kernel": "linear_stack", "batch": batch,
                     "unfused_packed_bf16_us": timed(lambda: run_packed(unfused), repeats=5),
                     "packed_bf16_us": timed(lambda: run_packed(fused), repeats=5),
                     "int4_us": timed(run_int4, repeats=5)})
    return rows


def linear_rows() -> list[dict]:
    rows = []
    for n_in, n_out in [(HIDDEN, MLP), (MLP, HIDDEN), (HIDDEN, 49152)]:
        layer = torch.nn.Linear(n_in, n_out, bias=False).to(torch.bfloat16)
        packed = PackedLinear(layer)
        for batch in (1, 16, 64):
            x = torch.randn(batch, n_in, dtype=torch.bfloat16)
            rows.append({"kernel": f"linear {n_in}x{n_out}", "batch": batch,
                         "f_linear_us": timed(lambda: F.linear(x, layer.weight)),
                         "packed_us": timed(lambda: packed(x))})
    return rows


def norm_and_rope_rows() -> list[dict]:
    norm = RMSNorm(HIDDEN, 1e-5).to(torch.bfloat16)
    rotary = RotaryEmbedding(HEAD_DIM, 8192, 100000.0)
    cos_half, sin_half = rotary.cos[:, :HEAD_DIM // 2], rotary.sin[:, HEAD_DIM // 2:]

    def rms_reference(x):  # HF Llama's formula, F.rms_norm for the statistics
        return norm.weight * F.rms_norm(x.float(), (HIDDEN,), eps=1e-5).to(x.dtype)

    def rope_reference(q, k, positions):  # rotate-half with separate halves, as in HF
        cos, sin = cos_half[positions].unsqueeze(1), sin_half[positions].unsqueeze(1)
        x1, x2 = torch.cat((q, k), dim=1).float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(q.dtype)

    rows = []
    for tokens in (1, 16, 512):
        x = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16)
        q = torch.randn(tokens, HEADS, HEAD_DIM, dtype=torch.bfloat16)
        k = torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
        qk = torch.cat((q, k), dim=1)  # the model's fused q|k|v output gives q and k side by side
        positions = torch.randint(0, 2048, (tokens,))
        rows.append({"kernel": "rms_norm", "tokens": tokens,
                     "rms_norm_chain_us": timed(lambda: rms_reference(x)),
                     "layer_norm_of_x_and_minus_x_us": timed(lambda: norm(x))})
        rows.append({"kernel": "rope", "tokens": tokens,
                     "halves_us": timed(lambda: rope_reference(q, k, positions)),
                     "roll_addcmul_us": timed(
                         lambda: RotaryEmbedding.apply(qk, rotary.table(positions)))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    sections = [kv_gather_rows, decode_attention_rows, prefill_sdpa_rows, norm_and_rope_rows]
    if can_pack(torch.bfloat16, torch.device("cpu")):
        sections.append(linear_rows)
        if can_use_int4(torch.bfloat16, torch.device("cpu")):
            sections.append(linear_stack_rows)
    rows = []
    for section in sections:
        for row in section():
            print("  ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in row.items()), flush=True)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
