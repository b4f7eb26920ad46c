"""Paged attention against a plain per-sequence reference: block gathers, padding, both decode paths."""

import math

import pytest
import torch

from lmforge.models import attention
from lmforge.models.attention import (
    AttentionMetadata,
    block_rows,
    decode_attention,
    gather_blocks,
    paged_attention,
    write_kv,
)

N_KV, GROUP, HEAD_DIM, BLOCK, NUM_BLOCKS = 2, 3, 8, 4, 40


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query (H, D) over one context (L, n_kv, D), float64 softmax attention with GQA."""
    k = k.double().repeat_interleave(GROUP, dim=1)  # (L, H, D)
    v = v.double().repeat_interleave(GROUP, dim=1)
    scores = torch.einsum("hd,lhd->hl", q.double(), k) / math.sqrt(HEAD_DIM)
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), v)


def paged_batch(lengths: list[int], dtype: torch.dtype, seed: int = 0):
    """Random contexts of ``lengths`` tokens written into a cache at scattered blocks."""
    gen = torch.Generator().manual_seed(seed)
    shape = (N_KV, NUM_BLOCKS * BLOCK, HEAD_DIM)
    k_cache, v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    blocks = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables, contexts = [], []
    for length in lengths:
        table = [blocks.pop() for _ in range(-(-length // BLOCK))]
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(length)])
        k = torch.randn(length, N_KV, HEAD_DIM, generator=gen).to(dtype)
        v = torch.randn(length, N_KV, HEAD_DIM, generator=gen).to(dtype)
        write_kv(k_cache, slots, k)
        write_kv(v_cache, slots, v)
        tables.append(table)
        contexts.append((k, v))
    return k_cache, v_cache, tables, contexts


def decode_meta(lengths: list[int], tables: list[list[int]]) -> AttentionMetadata:
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    padding = torch.arange(width * BLOCK)[None, :] >= torch.tensor(lengths)[:, None]
    bias = torch.zeros(padding.shape).masked_fill_(padding, float("-inf"))[:, None, None, :]
    return AttentionMetadata(slot_mapping=torch.zeros(len(lengths), dtype=torch.long),
                             block_size=BLOCK, num_decodes=len(lengths),
                             decode_rows=block_rows(table, N_KV, NUM_BLOCKS), decode_bias=bias,
                             prefills=[])


def test_gather_blocks_returns_each_heads_blocks_in_table_order():
    k_cache, _, tables, contexts = paged_batch([7, 12], torch.float32)
    table = torch.tensor([tables[0] + [tables[0][0]], tables[1]])  # (2, 3) blocks
    got = gather_blocks(k_cache, block_rows(table, N_KV, NUM_BLOCKS), BLOCK)
    got = got.view(2, N_KV, 3 * BLOCK, HEAD_DIM)  # sequence-major, then head-major
    assert torch.equal(got[0, :, :7], contexts[0][0].transpose(0, 1))
    assert torch.equal(got[1, :, :12], contexts[1][0].transpose(0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_masks_padding(dtype):
    lengths = [5, 13, 1, 9]
    k_cache, v_cache, tables, contexts = paged_batch(lengths, dtype)
    meta = decode_meta(lengths, tables)
    q = torch.randn(len(lengths), N_KV * GROUP, HEAD_DIM).to(dtype)
    shape = (len(lengths), N_KV, -1, HEAD_DIM)
    k = gather_blocks(k_cache, meta.decode_rows, BLOCK).view(shape)
    v = gather_blocks(v_cache, meta.decode_rows, BLOCK).view(shape)
    out = decode_attention(q, k, v, meta.decode_bias, HEAD_DIM ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for i, (kc, vc) in enumerate(contexts):
        torch.testing.assert_close(out[i].double(), reference(q[i], kc, vc), rtol=tol, atol=tol)


@pytest.mark.parametrize("small_batch_limit", [0, 100], ids=["bmm", "sdpa-fp32"])
def test_both_bf16_decode_paths_match_the_reference(monkeypatch, small_batch_limit):
    monkeypatch.setattr(attention, "SDPA_FP32_MAX_DECODES", small_batch_limit)
    lengths = [3, 16, 11]
    k_cache, v_cache, tables, contexts = paged_batch(lengths, torch.bfloat16, seed=1)
    q = torch.randn(len(lengths), N_KV * GROUP, HEAD_DIM).to(torch.bfloat16)
    new_kv = torch.zeros(len(lengths), N_KV, HEAD_DIM, dtype=torch.bfloat16)  # already cached
    out = paged_attention(q, new_kv, new_kv, k_cache, v_cache, decode_meta(lengths, tables),
                          HEAD_DIM ** -0.5)
    for i, (kc, vc) in enumerate(contexts):
        torch.testing.assert_close(out[i].double(), reference(q[i], kc, vc), rtol=3e-2, atol=3e-2)
