"""Attention over the paged KV cache, and the metadata that describes one batch to it.

One engine step runs a flat batch of T tokens from many requests. Each layer's K and V caches are
(n_kv_heads, num_slots, head_dim) tensors, head-major so that a gathered context is contiguous per
head. Each layer writes the new K/V at ``slot_mapping`` (slot = block_id * block_size + offset),
then attends:

- every request with a single new token (a decode, or a 1-token prefill chunk) joins ONE padded,
  batched attention over its gathered context;
- every request with a longer chunk (a prefill) gets its own SDPA call with a causal mask that is
  offset by the tokens already in the cache (chunked prefill, prefix-cache hits).

The metadata is built once per step by the model runner and passed as an argument to every layer
(never a module global), as in vLLM's ``AttentionMetadata``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.models.invariant import invariant_attention

# Up to this many bf16 decodes, fp32 SDPA (after casting the gathered K/V) beats two bf16 bmm:
# 54-88 vs 131-137 us per layer at 1 sequence, 107 vs 179 at 4, about even at 8 and behind
# from 16 on (benchmarks/cpu_kernels.py, two runs)
SDPA_FP32_MAX_DECODES = 4


@dataclass
class PrefillChunk:
    """One request's multi-token chunk inside the flat batch."""

    start: int  # first row of the chunk in the flat batch
    end: int  # one past its last row
    context_rows: torch.Tensor | None  # (n_kv * W,) block rows of its context (``block_rows``);
    # None = no cached prefix, the chunk attends to its own K/V
    mask: torch.Tensor | None  # (n, W * block_size) bool, True = may attend; None = plain causal


@dataclass
class ContextChunk:
    """One request's rows in a batch-invariant step (``--deterministic``): rows
    ``start:end`` of the flat batch hold positions ``position .. position + end - start - 1``,
    and ``context_rows`` (``block_rows``) its context from position 0, this step's K/V
    included."""

    start: int
    end: int
    position: int
    context_rows: torch.Tensor


@dataclass
class AttentionMetadata:
    """How the flat batch of T tokens maps onto the paged KV cache for one step.

    Rows ``[0, num_decodes)`` are single-token queries; prefill chunks follow. Contexts are read
    a whole block at a time (``block_rows``), so a decode context of L tokens is padded to
    W = ceil(Lmax / block_size) blocks and the padding is masked by ``decode_bias``.
    """

    slot_mapping: torch.Tensor  # (T,) int64 cache slot where each new token's K/V is written
    block_size: int  # tokens per KV block
    num_decodes: int  # rows [0, num_decodes) each hold one query token
    decode_rows: torch.Tensor | None  # (Bd * n_kv * W,) int64 block rows of the decode contexts
    decode_bias: torch.Tensor | None  # (Bd, 1, 1, W * block_size) float32: 0, or -inf on padding
    prefills: list[PrefillChunk]
    # the decode rows' contexts for the fused decoder (models/fused_decode.py), which reads the
    # cache slot by slot: (Bd, W) int64 block ids (padded with 0) and (Bd,) int64 lengths, this
    # step's token included
    decode_tables: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None
    # set in batch-invariant mode: every request's rows (decodes and prefills alike) attend
    # through ``models.invariant.invariant_attention`` instead, and the fields above are unused
    invariant: list[ContextChunk] | None = None


def block_rows(block_table: torch.Tensor, n_kv_heads: int, num_blocks: int) -> torch.Tensor:
    """Rows of the (n_kv_heads * num_blocks, block_size * head_dim) view of a cache to gather.

    block_table: (B, W) or (W,) block ids -> (B * n_kv_heads * W,) int64, sequence-major then
    head-major: row ``h * num_blocks + block`` holds block ``block`` of KV head ``h``, and the
    rows of sequence b, head h are ``[(b * n_kv_heads + h) * W, ... + W)``.
    """
    heads = torch.arange(n_kv_heads, device=block_table.device)[:, None] * num_blocks  # (n_kv, 1)
    table = block_table.reshape(-1, 1, block_table.shape[-1])  # (B, 1, W)
    return (table + heads).reshape(-1)


def write_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, new: torch.Tensor) -> None:
    """Scatter new keys or values into the cache.

    Args:
        cache: (n_kv_heads, num_slots, head_dim), updated in place.
        slot_mapping: (T,) int64.
        new: (T, n_kv_heads, head_dim).
    """
    cache.index_copy_(1, slot_mapping, new.transpose(0, 1).to(cache.dtype))


def gather_blocks(cache: torch.Tensor, rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """Copy whole KV blocks out of the cache.

    Args:
        cache: (n_kv_heads, num_slots, head_dim), num_slots = num_blocks * block_size.
        rows: (R,) from ``block_rows``.

    Returns:
        (R, block_size, head_dim), the blocks in the order of ``rows``. With ``block_rows``'
        order, each (sequence, head) context is one contiguous (L, head_dim) matrix, so the
        result views as (B, n_kv_heads, L, head_dim): the operand batched matmuls take without a
        copy, the query heads of a sequence next to each other as the flat batch has them.
        ``index_select`` is 2-3x faster than advanced indexing; gathering per slot from a
        slot-major cache is faster still (84 vs 122 us per layer at 16 x 130 tokens), but its
        K/V then need a copy each for the matmuls, and the whole decode attention is slower:
        1.2-1.3x at 16 sequences, 1.7-5x at 64 in two runs of ``benchmarks/cpu_kernels.py``.
    """
    n_kv, num_slots, head_dim = cache.shape
    flat = cache.view(n_kv * (num_slots // block_size), block_size * head_dim)
    return flat.index_select(0, rows).view(-1, block_size, head_dim)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal multi-head (grouped-query) attention of new tokens over their cached context.

    Args:
        q: (T, n_heads, head_dim) queries of the new tokens.
        k, v: (T, n_kv_heads, head_dim) their keys and values (already written to the cache).
        k_cache, v_cache: (n_kv_heads, num_slots, head_dim).
        meta: the step's AttentionMetadata.
        scale: softmax scale, 1/sqrt(head_dim) for Llama.

    Returns:
        (T, n_heads, head_dim) attention output, rows in the same order as ``q``.

    Matches ``softmax(q k^T * scale + causal_mask) v`` per request (Vaswani et al. 2017, with GQA
    from Ainslie et al. 2023), which is what Hugging Face's eager Llama attention computes.
    """
    if meta.invariant is not None:
        return _invariant_rows(q, k_cache, v_cache, meta, scale)
    nd = meta.num_decodes
    if nd:
        decoded = _decode_rows(q[:nd], k_cache, v_cache, meta, scale)
        if nd == q.shape[0]:  # a pure decode step, the steady state: nothing to assemble
            return decoded
    out = torch.empty_like(q)
    if nd:
        out[:nd] = decoded
    for chunk in meta.prefills:
        out[chunk.start:chunk.end] = _prefill_chunk(q, k, v, k_cache, v_cache, chunk,
                                                    meta.block_size, scale)
    return out


def _invariant_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Every request's rows through ``invariant_attention`` over its context read from the
    cache; (T, n_heads, head_dim)."""
    out = torch.empty_like(q)
    shape = (k_cache.shape[0], -1, k_cache.shape[2])  # (n_kv, L, D)
    for chunk in meta.invariant:
        keys = gather_blocks(k_cache, chunk.context_rows, meta.block_size).view(shape)
        values = gather_blocks(v_cache, chunk.context_rows, meta.block_size).view(shape)
        out[chunk.start:chunk.end] = invariant_attention(q[chunk.start:chunk.end], keys, values,
                                                         chunk.position, scale)
    return out


def _decode_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention of the step's ``Bd`` decode rows, ``q`` (Bd, n_heads, head_dim), over their
    cached contexts; (Bd, n_heads, head_dim)."""
    nd = q.shape[0]
    shape = (nd, k_cache.shape[0], -1, k_cache.shape[2])  # (Bd, n_kv, L, D)
    kd = gather_blocks(k_cache, meta.decode_rows, meta.block_size).view(shape)
    vd = gather_blocks(v_cache, meta.decode_rows, meta.block_size).view(shape)
    if q.dtype == torch.float32 or nd <= SDPA_FP32_MAX_DECODES:
        # SDPA's fp32 kernel is the fastest for fp32, and for a few bf16 sequences even with
        # the casts (benchmarks/cpu_kernels.py)
        return F.scaled_dot_product_attention(
            q.float().unsqueeze(2), kd.float(), vd.float(),  # (Bd, H | n_kv, 1 | L, D)
            attn_mask=meta.decode_bias, scale=scale,
            enable_gqa=True).squeeze(2).to(q.dtype)
    return decode_attention(q, kd.to(q.dtype), vd.to(q.dtype), meta.decode_bias, scale)


def _prefill_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, chunk: PrefillChunk, block_size: int, scale: float
                   ) -> torch.Tensor:
    """Causal attention of one request's prefill rows ``chunk.start:chunk.end`` of ``q``;
    (n, n_heads, head_dim)."""
    # 4-D (1, heads, n, head_dim) operands: with 3-D ones PyTorch falls back from its CPU flash
    # kernel to the math path, 1.8x slower for a 512-token bf16 chunk (8.1 vs 4.6 ms)
    qp = q[chunk.start:chunk.end].transpose(0, 1)[None]  # (1, n_heads, n, head_dim)
    if chunk.context_rows is None:  # the chunk is the whole context: use K/V as computed
        kp = k[chunk.start:chunk.end].transpose(0, 1)[None]  # (1, n_kv, n, head_dim)
        vp = v[chunk.start:chunk.end].transpose(0, 1)[None]
        op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale,
                                            enable_gqa=True)
    else:
        shape = (1, k_cache.shape[0], -1, k_cache.shape[2])  # (1, n_kv, L, D)
        kp = gather_blocks(k_cache, chunk.context_rows, block_size).view(shape).to(q.dtype)
        vp = gather_blocks(v_cache, chunk.context_rows, block_size).view(shape).to(q.dtype)
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=chunk.mask, scale=scale,
                                            enable_gqa=True)
    return op[0].transpose(0, 1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One query token per sequence against its padded context, grouped-query, softmax in fp32.

    Two batched matmuls over (sequence, kv head) pairs, for bf16/fp16 batches of more than
    ``SDPA_FP32_MAX_DECODES`` sequences: PyTorch's bf16 SDPA on CPU is 2-6x slower than this for
    single queries at 4-64 sequences, and casting to fp32 for its fp32 kernel pays only for a few
    sequences (``benchmarks/cpu_kernels.py``). The scale, the cast to fp32 and the padding bias are
    one ``torch.add``; sequence-major K/V make the query and output reshapes free.

    Args:
        q: (B, n_heads, head_dim); k, v: (B, n_kv_heads, L, head_dim) contiguous, as
            ``gather_blocks`` returns them; bias: (B, 1, 1, L) float32, 0 or -inf on padding.

    Returns:
        (B, n_heads, head_dim).
    """
    b, n_heads, head_dim = q.shape
    _, n_kv, length, _ = k.shape
    group = n_heads // n_kv
    qg = q.reshape(b * n_kv, group, head_dim)  # each KV head's query group
    scores = torch.bmm(qg, k.view(b * n_kv, length, head_dim).transpose(1, 2))  # (B*n_kv, G, L)
    logits = torch.add(bias, scores.view(b, n_kv, group, length), alpha=scale)  # fp32
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    out = torch.bmm(probs.view(b * n_kv, group, length), v.view(b * n_kv, length, head_dim))
    return out.view(b, n_heads, head_dim)
