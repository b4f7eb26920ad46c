"""Batch-invariant kernels: a row's result does not depend on the other rows of its batch, nor
on how a prompt was cut into chunks (``--deterministic``).

Why outputs drift otherwise (Thinking Machines' "Defeating Nondeterminism in LLM Inference",
2025; SGLang's ``--enable-deterministic-inference``, vLLM's batch-invariant mode): a GEMM picks
its kernel and its reduction order from the shape, so row r of ``x @ W^T`` changes in the last
bits when the batch has 1, 2 or 16 rows (measured on this project's CPUs: a 1-row call differs
from a 16-row call; inside one 16-row call a row's result does not depend on its position or on
the other rows), and attention reduces over a context whose padding and split follow the batch.
Each kernel here makes every call the same shape:

- ``BatchInvariantLinear``: rows in tiles of ``TILE_ROWS``, the last one zero-padded, one fixed
  (TILE_ROWS, in) x (in, out) GEMM per tile.
- ``invariant_attention``: a request's query rows in tiles of ``TILE_ROWS``, its keys in chunks
  of ``KEY_CHUNK`` read from the paged cache, an online softmax (Milakov and Gimelshein 2018)
  over the chunks in order: a chunk past a row's position is masked to exact zeros, so a row's
  numbers depend only on its own position and context.

What it costs (README, "Benchmarks"): ``benchmarks/decode_profile.py --serve-args=--deterministic``
and ``benchmarks/serve.py --serve-args=--deterministic``. The tile size is a trade: a 16-row GEMM
costs about what a 2- or 8-row one does on the 2-core CPUs measured, but 1-row decodes lose the
GEMV kernel (~3x faster per row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TILE_ROWS = 16  # rows per GEMM call
KEY_CHUNK = 64  # keys per online-softmax step


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                 ) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed in fixed (TILE_ROWS, in) tiles.

    x: (T, in) -> (T, out), each row bit-identical whatever T and the other rows are.
    """
    t = x.shape[0]
    pad = -t % TILE_ROWS
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    out = torch.cat([F.linear(tile, weight, bias) for tile in x.split(TILE_ROWS)])
    return out[:t] if pad else out


class BatchInvariantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is ``tiled_linear`` (inference only; same parameters)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BatchInvariantLinear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tiled_linear(x, self.weight, self.bias)


def make_batch_invariant_(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` under ``module`` (or ``module`` itself) by a
    ``BatchInvariantLinear`` sharing its parameters; returns the module or its replacement."""
    if type(module) is nn.Linear:
        return BatchInvariantLinear.from_linear(module)
    for name, child in list(module.named_children()):
        setattr(module, name, make_batch_invariant_(child))
    return module


def invariant_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        position: int, scale: float) -> torch.Tensor:
    """Causal grouped-query attention of one request's consecutive query rows over its context.

    Args:
        q: (n, n_heads, head_dim), the queries of positions ``position .. position + n - 1``.
        keys, values: (n_kv_heads, L, head_dim), the context from position 0, L >= position + n
            (positions past a row's own are masked, whatever they hold, if finite).
        position: the position of the first query row.
        scale: the softmax scale.

    Returns:
        (n, n_heads, head_dim); row i equal to the last bit whatever n, ``position`` of the
        first row and L are, for the same query, position and keys up to it.
    """
    n, n_heads, head_dim = q.shape
    n_kv, length, _ = keys.shape
    group = n_heads // n_kv
    tiles = -(-n // TILE_ROWS)
    rows = tiles * TILE_ROWS
    # (tiles, n_kv, TILE_ROWS * group, D): a tile's rows for one KV head, its query heads inside
    qt = F.pad(q, (0, 0, 0, 0, 0, rows - n)).view(tiles, TILE_ROWS, n_kv, group, head_dim)
    qt = qt.permute(0, 2, 1, 3, 4).reshape(tiles, n_kv, TILE_ROWS * group, head_dim)
    q_pos = position + torch.arange(rows, device=q.device).view(tiles, 1, TILE_ROWS, 1)
    q_pos = q_pos.expand(tiles, 1, TILE_ROWS, group).reshape(tiles, 1, TILE_ROWS * group, 1)
    chunks = -(-(position + n) // KEY_CHUNK)
    pad = chunks * KEY_CHUNK - min(length, chunks * KEY_CHUNK)
    keys = F.pad(keys[:, :chunks * KEY_CHUNK], (0, 0, 0, pad))
    values = F.pad(values[:, :chunks * KEY_CHUNK], (0, 0, 0, pad))
    shape = (tiles, n_kv, TILE_ROWS * group)
    m = torch.full(shape, float("-inf"), device=q.device)
    denom = torch.zeros(shape, device=q.device)
    acc = torch.zeros(*shape, head_dim, device=q.device)
    qt = qt.float()
    for c in range(chunks):
        kc = keys[:, c * KEY_CHUNK:(c + 1) * KEY_CHUNK].float()  # (n_kv, C, D)
        vc = values[:, c * KEY_CHUNK:(c + 1) * KEY_CHUNK].float()
        s = torch.matmul(qt, kc.transpose(1, 2)) * scale  # (tiles, n_kv, R, C)
        k_pos = c * KEY_CHUNK + torch.arange(KEY_CHUNK, device=q.device)
        s = s.masked_fill(k_pos > q_pos, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - safe[..., None])  # exact zeros where masked
        correction = torch.exp(m - safe)
        denom = denom * correction + p.sum(-1)
        acc = acc * correction[..., None] + torch.matmul(p, vc)
        m = m_new
    out = acc / denom[..., None]  # (tiles, n_kv, TILE_ROWS * group, D)
    out = out.view(tiles, n_kv, TILE_ROWS, group, head_dim).permute(0, 2, 1, 3, 4)
    return out.reshape(rows, n_heads, head_dim)[:n].to(q.dtype)
