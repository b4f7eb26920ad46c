"""GGUF's quantized blocks as ``QuantWeight``s: the codes, scales and zeros the kernel reads.

Every supported block type is rewritten exactly (no requantization) as ``w = q * scale + zero``
per group of 16 or 32 weights; the float32 products ``d * sc`` of an f16 scale and a 6- or 8-bit
sub-scale are exact. Layouts follow ggml's ``block_*`` structs (ggml-common.h) and
``dequantize_row_*`` (ggml-quants.c); the tests compare every type with ``gguf.quants.dequantize``.

| type | bytes / 32 w | kept as | group | zero |
|---|---|---|---|---|
| Q4_0 | 18 | 4-bit | 32 | -8 d |
| Q4_1 | 20 | 4-bit | 32 | m |
| Q4_K | 18 | 4-bit | 32 | -dmin * m_j |
| Q5_0 | 22 | 5-bit | 32 | -16 d |
| Q5_1 | 24 | 5-bit | 32 | m |
| Q5_K | 22 | 5-bit | 32 | -dmin * m_j |
| Q6_K | 26.25 | 8-bit (q - 32) | 16 | none |
| Q8_0 | 34 | 8-bit | 32 | none |

4-bit codes with an f32 scale and zero per 32 weights take 6 bits a weight (GGUF's Q4_K: 4.5),
5-bit ones 7 (Q5_0: 5.5), 8-bit ones 9-10. Other types (F16, F32, BF16, Q2_K, Q3_K, IQ*) return None: they stay dense.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.models.quant_linear import QuantWeight

SUPPORTED = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")


def read_quant(data: np.ndarray, type_name: str) -> QuantWeight | None:
    """Convert a GGUF tensor's raw rows to a ``QuantWeight``; None for an unsupported type.

    Args:
        data: (N, bytes per row) uint8, the tensor's blocks row by row (``ReaderTensor.data``).
        type_name: the GGML type name (``"Q4_K"``, ...).
    """
    if type_name not in SUPPORTED:
        return None
    size = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34,
            "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[type_name]
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(rows, -1, size)  # (N, blocks, bytes)
    codes, scale, zero = _DECODERS[type_name](blocks)
    high = np.zeros(0, np.int32)
    if codes.dtype == np.uint8:  # 4/5-bit: low nibbles as GGUF's Q4_0 (j low, j + 16 high)
        g = codes.reshape(rows, -1, 32)
        if type_name.startswith("Q5"):  # the fifth bits, bit j of a group's int32 for code j
            high = np.packbits(g >> 4, axis=-1, bitorder="little").view("<u4").view(np.int32)
            g = g & 0x0F
        codes = g[..., :16] | (g[..., 16:] << 4)
    empty = np.zeros(0, np.float32)
    return QuantWeight(*(torch.from_numpy(np.ascontiguousarray(a).reshape(rows, -1) if a.size
                                          else a)
                         for a in (codes, scale, empty if zero is None else zero, high)))


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The f16 at byte ``at`` of each block, as float32: (N, blocks)."""
    return blocks[..., at:at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) codes: low nibbles first (the 32-weight blocks' order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4 bytes of fifth bits -> (..., 32) values 0 or 16 (bit j for weight j)."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")  # (..., 32)
    return bits.astype(np.uint8) << 4


def _q4_0(b):
    d = _f16(b, 0)
    return _nibbles(b[..., 2:18]), d, -8 * d


def _q4_1(b):
    return _nibbles(b[..., 4:20]), _f16(b, 0), _f16(b, 2)


def _q5_0(b):
    d = _f16(b, 0)
    return _nibbles(b[..., 6:22]) | _high_bits(b[..., 2:6]), d, -16 * d


def _q5_1(b):
    return _nibbles(b[..., 8:24]) | _high_bits(b[..., 4:8]), _f16(b, 0), _f16(b, 2)


def _q8_0(b):
    return b[..., 2:34].copy().view(np.int8), _f16(b, 0), None


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's twelve bytes at 4..16 -> (sc, m): (N, blocks, 8) 6-bit sub-scales and mins
    (ggml's ``get_scale_min_k4``)."""
    q = b[..., 4:16].astype(np.uint8)
    sc = np.concatenate([q[..., 0:4] & 63, (q[..., 8:12] & 0x0F) | ((q[..., 0:4] >> 6) << 4)], -1)
    m = np.concatenate([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], -1)
    return sc.astype(np.float32), m.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 128) bytes -> (..., 256) codes: 4 chunks of 32 bytes, each giving 32 low-nibble
    codes then 32 high-nibble ones (Q4_K/Q5_K order)."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=-1).reshape(*qs.shape[:-1], 256)


def _k_scale_zero(b):
    sc, m = _k_scales(b)
    d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
    return d * sc, -(dmin * m)  # (N, blocks, 8) each, one per 32 weights


def _q4_k(b):
    scale, zero = _k_scale_zero(b)
    return _k_low_nibbles(b[..., 16:144]), scale, zero


def _q5_k(b):
    scale, zero = _k_scale_zero(b)
    qh = b[..., 16:48]  # bit 2j of qh[l] -> weight 64j + l, bit 2j + 1 -> weight 64j + 32 + l
    bits = np.unpackbits(qh[..., None], axis=-1, bitorder="little")  # (N, blocks, 32, 8)
    high = np.moveaxis(bits, -1, -2).reshape(*qh.shape[:-1], 256) << 4  # bit i -> 32i + l
    return _k_low_nibbles(b[..., 48:176]) | high, scale, zero


def _q6_k(b):
    ql, qh = b[..., 0:128], b[..., 128:192]
    halves = []
    for h in range(2):  # 128 weights each: 4 runs of 32, from ql's nibbles and qh's bit pairs
        lo, hi = ql[..., 64 * h:64 * h + 32], ql[..., 64 * h + 32:64 * h + 64]
        high = qh[..., 32 * h:32 * h + 32]
        runs = [(lo & 0x0F) | ((high & 3) << 4), (hi & 0x0F) | (((high >> 2) & 3) << 4),
                (lo >> 4) | (((high >> 4) & 3) << 4), (hi >> 4) | (((high >> 6) & 3) << 4)]
        halves.append(np.concatenate(runs, axis=-1))
    q = np.concatenate(halves, axis=-1).astype(np.int8) - 32
    sc = b[..., 192:208].copy().view(np.int8).astype(np.float32)  # one per 16 weights
    return q.astype(np.int8), _f16(b, 208)[..., None] * sc, None


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q5_0": _q5_0, "Q5_1": _q5_1,
             "Q5_K": _q5_k, "Q6_K": _q6_k, "Q8_0": _q8_0}
