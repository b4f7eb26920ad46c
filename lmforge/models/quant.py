"""4-bit weights straight from a GGUF file, for the small batches of decoding on the CPU.

A decode step at batch 1 reads every weight once to compute one row: it is bound by memory
bandwidth, so reading 4-bit weights instead of bf16 ones is the lever (llama.cpp's whole design).
GGUF's Q4_0 and Q4_1 blocks hold 32 weights as 4-bit codes ``q`` in 0..15 with one f16 scale
``d`` (and, for Q4_1, an f16 minimum ``m``):

    Q4_0: w = (q - 8) * d          Q4_1: w = q * d + m

PyTorch's CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``, the one torchao's int4
weight-only path uses) computes ``w = (q - 8) * scale + zero`` per group of 32 along the input
dimension, so both block types map onto it exactly: ``scale = d`` and ``zero = 8d + m`` (Q4_1) or
``zero = 0`` (Q4_0); only the rounding of scale and zero to bf16 differs from llama.cpp.

The kernel wins only at a few rows: a stack of SmolLM2's linear layers (fused as the engine runs
them) takes 4.3 ms at 1 row against 13.4 ms for prepacked bf16, 6.8 vs 11.0 ms at 4 rows, 11.6
vs 13.6 ms at 8, and loses from 12 rows on (17.9 vs 14.9 ms; ``benchmarks/cpu_kernels.py``). ``Int4DecodeLinear`` therefore keeps both: the 4-bit weights for up
to ``max_rows`` rows and the dense bf16 layer for prefills and large batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

GROUP_SIZE = 32  # weights per GGUF Q4 block = the int4 kernel's group size
INT4_MAX_ROWS = 8  # rows up to which the 4-bit kernel beats prepacked bf16 (see module doc)


@dataclass
class Q4Weight:
    """A 4-bit weight in the int4 kernel's terms: ``w[n, k] = (codes[n, k] - 8) * s + z``.

    ``codes``: (N, K) uint8 in 0..15; ``scale``, ``zero``: (N, K / 32) float32, one per group.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The dense (N, K) float32 weight."""
        n, k = self.codes.shape
        groups = self.codes.view(n, k // GROUP_SIZE, GROUP_SIZE).float()
        return ((groups - 8) * self.scale[..., None] + self.zero[..., None]).view(n, k)

    def map_rows(self, fn) -> Q4Weight:
        """Apply a row permutation ``fn`` ((N, ...) -> (N, ...)) to codes, scale and zero."""
        return Q4Weight(fn(self.codes), fn(self.scale), fn(self.zero))


def concat_rows(weights: list[Q4Weight]) -> Q4Weight:
    """Stack 4-bit weights along the output dimension (for a fused q|k|v or gate|up layer)."""
    return Q4Weight(*(torch.cat([getattr(w, f) for w in weights])
                      for f in ("codes", "scale", "zero")))


def read_q4_blocks(data: np.ndarray, type_name: str) -> Q4Weight | None:
    """Decode GGUF Q4_0 / Q4_1 blocks into codes, scales and zeros; None for any other type.

    Args:
        data: (N, K / 32 * block_bytes) uint8, a GGUF tensor's raw rows (``ReaderTensor.data``).
        type_name: the GGML type name, ``"Q4_0"`` or ``"Q4_1"`` (anything else returns None).

    Block layouts follow ggml's ``block_q4_0`` (f16 d, 16 bytes of codes) and ``block_q4_1``
    (f16 d, f16 m, 16 bytes); byte j holds code j in its low nibble and code j + 16 in its high.
    """
    if type_name not in ("Q4_0", "Q4_1"):
        return None
    header = 2 if type_name == "Q4_0" else 4
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(rows, -1, header + 16)  # (N, K/32, bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, K/32)
    if type_name == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = 8 * d + m
    else:
        zero = np.zeros_like(d)
    packed = blocks[..., header:]  # (N, K/32, 16)
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)  # (N, K)
    return Q4Weight(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(zero))


def can_use_int4(dtype: torch.dtype, device: torch.device) -> bool:
    """The CPU int4 kernel is fast for bf16 activations only (its fp32 path is a slow reference)."""
    return (dtype == torch.bfloat16 and device.type == "cpu"
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


class Int4DecodeLinear(nn.Module):
    """A linear layer that computes small batches from 4-bit weights and large ones densely.

    ``x: (T, in_features) bf16 -> (T, out_features) bf16``. Rows ``T <= max_rows`` go through
    ``aten._weight_int4pack_mm_for_cpu`` with the checkpoint's own 4-bit weights; larger T go
    through ``dense`` (the bf16 layer, prepacked or not). The two agree to bf16 rounding.

    Args:
        dense: the bf16 layer (``nn.Linear`` or ``PackedLinear``); its bias is reused.
        weight: the same weight in 4-bit form, (out_features, in_features) codes.
        max_rows: the largest batch that takes the 4-bit path.
    """

    def __init__(self, dense: nn.Module, weight: Q4Weight, max_rows: int = INT4_MAX_ROWS):
        super().__init__()
        self.dense, self.max_rows = dense, max_rows
        self.out_features, self.in_features = weight.codes.shape
        self.register_buffer("packed_codes", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            weight.codes.int().contiguous(), 1))  # (N, K / 2) uint8
        scale_zero = torch.stack([weight.scale.t(), weight.zero.t()], dim=-1)  # (K/32, N, 2)
        self.register_buffer("scale_zero", scale_zero.to(torch.bfloat16).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows:
            return self.dense(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed_codes, GROUP_SIZE,
                                                      self.scale_zero)
        bias = getattr(self.dense, "bias", None)
        return y if bias is None else y + bias


def attach_int4_(model: nn.Module, weights: dict[str, Q4Weight],
                 max_rows: int = INT4_MAX_ROWS) -> int:
    """Wrap each linear layer that has a 4-bit weight in an ``Int4DecodeLinear``, in place.

    Args:
        model: the loaded (bf16, possibly prepacked) model.
        weights: HF parameter name (``model.layers.0.self_attn.q_proj.weight``) -> its Q4Weight.

    Returns:
        the number of layers wrapped.
    """
    for name, weight in weights.items():
        parent_name, _, child = name.removesuffix(".weight").rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Int4DecodeLinear(getattr(parent, child), weight, max_rows))
    return len(weights)
