"""Attention over the paged KV cache, and the metadata that describes one batch to it.

One engine step runs a flat batch of T tokens from many requests. Each layer writes the new K/V
into the cache at ``slot_mapping`` (slot = block_id * block_size + offset), then attends:

- every request with a single new token (a decode, or a 1-token prefill chunk) joins ONE padded,
  batched SDPA call over its gathered context;
- every request with a longer chunk (a prefill) gets its own SDPA call with a causal mask that is
  offset by the tokens already in the cache (chunked prefill, prefix-cache hits).

The metadata is built once per step by the model runner and passed as an argument to every layer
(never a module global), as in vLLM's ``AttentionMetadata``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """One request's multi-token chunk inside the flat batch."""

    start: int  # first row of the chunk in the flat batch
    end: int  # one past its last row
    context_slots: torch.Tensor | None  # (L,) cache slots of positions 0..L-1; None if no prefix
    mask: torch.Tensor | None  # (n, L) bool, True = may attend; None = plain causal (no prefix)


@dataclass
class AttentionMetadata:
    """How the flat batch of T tokens maps onto the paged KV cache for one step.

    Rows ``[0, num_decodes)`` are single-token queries; prefill chunks follow.
    """

    slot_mapping: torch.Tensor  # (T,) int64 cache slot where each new token's K/V is written
    num_decodes: int  # rows [0, num_decodes) each hold one query token
    decode_slots: torch.Tensor | None  # (Bd, Lmax) int64 context slots, padded with slot 0
    decode_bias: torch.Tensor | None  # (Bd, 1, 1, Lmax) float32: 0, or -inf on padding
    prefills: list[PrefillChunk]


def write_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, new: torch.Tensor) -> None:
    """Scatter new keys or values into the cache.

    Args:
        cache: (num_slots, n_kv_heads, head_dim), updated in place.
        slot_mapping: (T,) int64.
        new: (T, n_kv_heads, head_dim).
    """
    cache.index_copy_(0, slot_mapping, new.to(cache.dtype))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal multi-head (grouped-query) attention of new tokens over their cached context.

    Args:
        q: (T, n_heads, head_dim) queries of the new tokens.
        k, v: (T, n_kv_heads, head_dim) their keys and values (already written to the cache).
        k_cache, v_cache: (num_slots, n_kv_heads, head_dim).
        meta: the step's AttentionMetadata.
        scale: softmax scale, 1/sqrt(head_dim) for Llama.

    Returns:
        (T, n_heads, head_dim) attention output, rows in the same order as ``q``.

    Matches ``softmax(q k^T * scale + causal_mask) v`` per request (Vaswani et al. 2017, with GQA
    from Ainslie et al. 2023), which is what Hugging Face's eager Llama attention computes.
    """
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        kd = k_cache[meta.decode_slots]  # (Bd, Lmax, n_kv, head_dim)
        vd = v_cache[meta.decode_slots]
        if q.dtype == torch.float32:  # SDPA's fp32 kernel is the faster one (benchmarks/kernels.py)
            od = F.scaled_dot_product_attention(
                q[:nd].unsqueeze(2), kd.transpose(1, 2), vd.transpose(1, 2),  # (Bd, H, 1|L, D)
                attn_mask=meta.decode_bias, scale=scale, enable_gqa=True)
            out[:nd] = od.squeeze(2)
        else:
            out[:nd] = decode_attention(q[:nd], kd, vd, meta.decode_bias, scale)
    for chunk in meta.prefills:
        qp = q[chunk.start:chunk.end].transpose(0, 1)  # (n_heads, n, head_dim)
        if chunk.context_slots is None:  # the chunk is the whole context: use K/V as computed
            kp = k[chunk.start:chunk.end].transpose(0, 1)  # (n_kv, n, head_dim)
            vp = v[chunk.start:chunk.end].transpose(0, 1)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale,
                                                enable_gqa=True)
        else:
            kp = k_cache[chunk.context_slots].transpose(0, 1).to(q.dtype)  # (n_kv, L, head_dim)
            vp = v_cache[chunk.context_slots].transpose(0, 1).to(q.dtype)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=chunk.mask, scale=scale,
                                                enable_gqa=True)
        out[chunk.start:chunk.end] = op.transpose(0, 1)
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One query token per sequence against its padded context, grouped-query, softmax in fp32.

    Two batched matmuls instead of SDPA, for bf16/fp16: on CPU, PyTorch's flash kernel is 2-4x
    slower than this for single bf16 queries at batch >= 2 (``benchmarks/kernels.py``), while in
    fp32 SDPA is ~2x faster, so ``paged_attention`` keeps SDPA for fp32.

    Args:
        q: (B, n_heads, head_dim); k, v: (B, L, n_kv_heads, head_dim); bias: (B, 1, 1, L).

    Returns:
        (B, n_heads, head_dim).
    """
    b, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    qg = q.view(b, n_kv, n_heads // n_kv, head_dim)  # (B, Hkv, G, D): heads grouped by KV head
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale  # (B, Hkv, G, L)
    probs = torch.softmax(scores.float() + bias, dim=-1).to(v.dtype)
    return torch.matmul(probs, v.transpose(1, 2)).view(b, n_heads, head_dim)  # (B, Hkv, G, D)
