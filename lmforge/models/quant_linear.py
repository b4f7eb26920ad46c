"""Linear layers whose weights stay quantized: 4-, 5- or 8-bit codes in groups; float32
activations, or int8 ones as llama.cpp's (``int8_activations``).

A float32 decode step on a CPU without bf16 math reads 4 bytes per weight; a GGUF's own codes
are 0.5-1 byte. ``QuantLinear`` keeps them (converted from any GGUF block type by
``models/gguf_quant.py``) and computes with the compiled kernel of ``csrc/quant_linear.cpp``:

    w[n, k] = codes[n, k] * scale[n, k // G] + zero[n, k // G]     y = x @ w.T (+ bias)

Rows up to ``kernel_max_rows(ext)`` (decoding, short prefills) run the kernel, which
dequantizes each group in registers; larger batches (prefills) dequantize the weight once and run one float32 GEMM. The
pure-PyTorch reference (``QuantWeight.dequantize`` + ``F.linear``) is the fallback and the
test oracle; both agree to float32 summation order.

Measured on a 2-core AVX2 VM, a stack of SmolLM2-135M's fused projections (30 layers, weights
far larger than the caches): 4.5 ms per token at 1 row against 33 ms for float32, 7.7 vs 45 ms
at 4 rows, 33 vs 54 ms at 16 rows (4-bit); 8-bit codes 7.7 / 15 / 36 ms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_MAX_ROWS = 32  # rows up to which the kernel beats dequantize + float32 GEMM (AVX2)
# AVX-512 builds tile from 16 rows on (csrc/quant_kernels.h) and stay ahead far longer: 1.3-2.6x
# faster than dequantize + GEMM at 64-128 rows, 1.15-1.25x at 256, even at 512 (three of
# SmolLM2's and Qwen2.5-0.5B's projection shapes, 2 threads)
TILED_KERNEL_MAX_ROWS = 256
ACT_GROUP = 32  # activation values per int8 scale (llama.cpp's Q8_0 block)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """``x (M, K) float32`` rounded to int8 codes in groups of 32, returned dequantized (M, K).

    llama.cpp's Q8_0 activations (``ggml-quants.c``: ``quantize_row_q8_0``): per group,
    ``d = amax / 127`` and ``q = round(x * (1 / d))`` half to even (0 where ``d`` is 0); the
    values are ``q * d``. The compiled kernel (``csrc/q8_kernels.h``) computes the same codes bit
    for bit and multiplies them as integers.

    Raises:
        ValueError: ``K`` is not a multiple of 32.
    """
    m, k = x.shape
    if k % ACT_GROUP:
        raise ValueError(f"int8 activations need in_features a multiple of {ACT_GROUP}, got {k}")
    groups = x.float().reshape(m, k // ACT_GROUP, ACT_GROUP)
    d = groups.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(groups * inv) * d).reshape(m, k)


def kernel_max_rows(ext) -> int:
    """Rows up to which ``ext``'s kernel runs a batch (more: dequantize + GEMM); 0 without it."""
    if ext is None:
        return 0
    return TILED_KERNEL_MAX_ROWS if ext.isa() == "AVX-512" else KERNEL_MAX_ROWS


@dataclass
class QuantWeight:
    """An (N, K) weight as codes in groups of G along K.

    All contiguous. ``codes``: (N, K / 2) uint8 for 4 and 5 bits (group g's 32 codes in bytes
    16g..16g+15, low nibble code j, high nibble code j + 16, GGUF's Q4_0 order), (N, K) int8 for
    8 bits. ``scale``: (N, K / G) float32. ``zero``: (N, K / G) float32, or a 0-element tensor
    for zero = 0. ``high``: for 5 bits, (N, K / 32) int32 whose bit j is the fifth bit of code
    32g + j (GGUF's Q5_0 order); else a 0-element tensor.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    high: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))

    @property
    def bits(self) -> int:
        """4 (uint8 codes, two a byte), 5 (the same plus ``high``) or 8 (int8 codes)."""
        if self.codes.dtype != torch.uint8:
            return 8
        return 5 if self.high.numel() else 4

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the dense weight."""
        return self.codes.shape[0], self.codes.shape[1] * (1 if self.bits == 8 else 2)

    @property
    def group_size(self) -> int:
        """G, the weights along K that share a scale and zero (16 or 32)."""
        return self.shape[1] // self.scale.shape[1]

    def int_codes(self) -> torch.Tensor:
        """The (N, K) codes as int16 (4-bit ones unpacked, 0..15; 5-bit ones 0..31)."""
        if self.bits == 8:
            return self.codes.to(torch.int16)
        n, k = self.shape
        packed = self.codes.view(n, k // 32, 16)
        codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1).to(torch.int16)  # (N, K/32, 32)
        if self.bits == 5:
            bit = (self.high[..., None] >> torch.arange(32, dtype=torch.int32)) & 1
            codes = codes | (bit.to(torch.int16) << 4)
        return codes.view(n, k)

    def dequantize(self) -> torch.Tensor:
        """The dense (N, K) float32 weight (the reference the kernel is tested against)."""
        n, k = self.shape
        g = self.group_size
        w = self.int_codes().float().view(n, k // g, g) * self.scale[..., None]
        if self.zero.numel():
            w = w + self.zero[..., None]
        return w.view(n, k)

    def map_rows(self, fn) -> QuantWeight:
        """Apply a row permutation ``fn`` ((N, ...) -> (N, ...)) to every tensor."""
        return QuantWeight(*(fn(t) if t.numel() else t
                             for t in (self.codes, self.scale, self.zero, self.high)))

    def widened(self, group_size: int, with_zero: bool) -> QuantWeight:
        """The same weight as 8-bit codes in groups of ``group_size`` (dividing G), with an
        explicit zero if ``with_zero``: exact, for fusing parts of different formats."""
        n, _ = self.shape
        repeat = self.group_size // group_size
        scale = self.scale.repeat_interleave(repeat, dim=1)
        zero = (self.zero.repeat_interleave(repeat, dim=1) if self.zero.numel()
                else torch.zeros_like(scale) if with_zero else self.zero)
        return QuantWeight(self.int_codes().to(torch.int8), scale, zero)


def concat_rows(weights: list[QuantWeight]) -> QuantWeight:
    """Stack weights along the output dimension (a fused q|k|v or gate|up layer). Parts of
    different formats are first widened to the widest (8 bits, the smallest group, a zero)."""
    same = {(w.bits, w.group_size, bool(w.zero.numel())) for w in weights}
    if len(same) > 1:
        group = min(w.group_size for w in weights)
        with_zero = any(w.zero.numel() for w in weights)
        weights = [w.widened(group, with_zero) for w in weights]
    return QuantWeight(*(torch.cat([getattr(w, f) for w in weights])
                         if getattr(weights[0], f).numel() else getattr(weights[0], f)
                         for f in ("codes", "scale", "zero", "high")))


class QuantLinear(nn.Module):
    """``x (..., in_features) float32 -> (..., out_features) float32`` from a ``QuantWeight``.

    Args:
        weight: the quantized (out_features, in_features) weight.
        bias: (out_features,) or None.
        ext: the compiled module (``cpu_ext.quant_ext()``), or None for the PyTorch reference.

    ``int8_activations`` (False; ``--int8-activations`` sets it): multiply
    ``quantize_activations(x)`` instead of ``x``, as llama.cpp does; the kernel then runs integer
    dot products (``csrc/q8_kernels.h``). Either way every path (kernel, dequantize + GEMM, the
    PyTorch reference) computes the same product up to float32 summation order.

    The codes, scales and zeros are buffers named ``codes``, ``scale``, ``zero``, so the model's
    ``state_dict`` (and the weight cache) holds them instead of a dense ``weight``.
    """

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None, ext=None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        for name in ("codes", "scale", "zero", "high"):
            self.register_buffer(name, getattr(weight, name))
        self.bits = weight.bits  # once: forward runs ~120 times a decode step
        self.max_rows = kernel_max_rows(ext)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.ext = ext
        self.int8_activations = False

    @property
    def weight_q(self) -> QuantWeight:
        """The layer's weight as a ``QuantWeight`` (its buffers, not a copy)."""
        return QuantWeight(self.codes, self.scale, self.zero, self.high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        bits, int8 = self.bits, self.int8_activations
        if self.ext is not None and x2.shape[0] <= self.max_rows:
            y = self.ext.quant_linear(x2, self.codes, self.scale, self.zero, self.high, bits, int8)
            return (y if self.bias is None else y + self.bias).view(*lead, self.out_features)
        if self.ext is None:
            dense = self.weight_q.dequantize()
        else:
            dense = self.ext.dequantize(self.codes, self.scale, self.zero, self.high, bits)
        y = F.linear(quantize_activations(x2) if int8 else x2, dense, self.bias)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        w = self.weight_q
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={w.bits}, group_size={w.group_size}, "
                f"kernel={'compiled' if self.ext is not None else 'pytorch'}"
                + (", int8_activations=True" if self.int8_activations else ""))



def quantize(weight: torch.Tensor, bits: int, group_size: int = 32) -> QuantWeight:
    """Round-to-nearest weight-only quantization of an (N, K) weight in groups of 32 along K.

    8 bits: symmetric absmax per group (``scale = max|w| / 127``, codes -127..127, no zero; the
    per-group form of LLM.int8's weight quantization). 4 bits: asymmetric per group
    (``scale = (max - min) / 15``, ``zero = min``, codes 0..15: GGUF's Q4_1).

    Raises:
        ValueError: K not a multiple of ``group_size``, or a group size other than 32 for 4 bits.
    """
    n, k = weight.shape
    if k % group_size or (bits == 4 and group_size != 32):
        raise ValueError(f"cannot quantize a ({n}, {k}) weight in groups of {group_size}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    if bits == 8:
        scale = w.abs().amax(-1) / 127
        codes = (w / torch.where(scale > 0, scale, 1)[..., None]).round().clamp(-127, 127)
        return QuantWeight(codes.to(torch.int8).view(n, k), scale, torch.zeros(0))
    lo = w.amin(-1)
    scale = (w.amax(-1) - lo) / 15
    codes = ((w - lo[..., None]) / torch.where(scale > 0, scale, 1)[..., None]).round().clamp(0, 15)
    codes = codes.to(torch.uint8)
    return QuantWeight((codes[..., :16] | (codes[..., 16:] << 4)).reshape(n, k // 2), scale, lo)


def quantize_linears_(model: nn.Module, bits: int, ext) -> int:
    """Replace every ``nn.Linear`` of ``model`` whose input size is a multiple of 32 by a
    ``QuantLinear`` of its weight ``quantize``d to ``bits``, in place (embeddings stay dense;
    a head tied to the embedding gets its own codes). Returns the number replaced."""
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and m.in_features % 32 == 0]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantLinear(quantize(linear.weight, bits), linear.bias, ext))
    return len(targets)


class QuantEmbedding(nn.Module):
    """``ids (T,) -> (T, embedding_dim) float32``: the rows of a ``QuantWeight``, dequantized.

    The codes stay shared with a tied ``QuantLinear`` head (one copy of the vocabulary matrix).
    """

    def __init__(self, weight: QuantWeight):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        for name in ("codes", "scale", "zero", "high"):
            self.register_buffer(name, getattr(weight, name))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = QuantWeight(*(t[flat] if t.numel() else t
                             for t in (self.codes, self.scale, self.zero, self.high))).dequantize()
        return rows.view(*ids.shape, self.embedding_dim)


def set_int8_activations_(model: nn.Module) -> int:
    """Turn on ``int8_activations`` in every ``QuantLinear`` of ``model`` (before
    ``attach_fused_decoder_``, which copies the setting); returns how many layers."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.int8_activations = True
    return len(layers)


def attach_quant_(model: nn.Module, weights: dict[str, QuantWeight], ext) -> int:
    """Replace each linear layer (``QuantLinear``) or embedding (``QuantEmbedding``) that has a
    quantized weight, in place; the same ``QuantWeight`` given twice (a tied head) is shared.

    Args:
        model: the loaded (fused) model.
        weights: parameter name (``model.layers.0.self_attn.qkv_proj.weight``) -> QuantWeight.
        ext: the compiled module, or None for the PyTorch reference path.

    Returns:
        the number of modules replaced.
    """
    for name, weight in weights.items():
        parent_name, _, child = name.removesuffix(".weight").rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = (QuantEmbedding(weight) if isinstance(old, nn.Embedding)
               else QuantLinear(weight, getattr(old, "bias", None), ext))
        setattr(parent, child, new)
    return len(weights)


def split_codes(state_dict: dict[str, torch.Tensor], tied_head: bool
                ) -> tuple[dict[str, torch.Tensor], dict[str, QuantWeight]]:
    """Undo ``QuantLinear``'s ``state_dict``: (the other tensors, plus a zero-stride placeholder
    ``<layer>.weight`` of the right shape for ``build_model``; ``<layer>.weight`` -> QuantWeight).
    ``tied_head``: the LM head is tied to the embedding, so it gets no placeholder."""
    parts = ("codes", "scale", "zero", "high")
    dense = {k: v for k, v in state_dict.items() if not k.endswith(tuple(f".{f}" for f in parts))}
    quantized = {}
    for key in state_dict:
        if key.endswith(".codes"):
            layer = key.removesuffix(".codes")
            weight = QuantWeight(*(state_dict[f"{layer}.{f}"] for f in parts))
            quantized[f"{layer}.weight"] = weight
            if not (tied_head and layer == "lm_head"):
                dense[f"{layer}.weight"] = torch.zeros(1).expand(weight.shape)
    return dense, quantized
