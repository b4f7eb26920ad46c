"""Building blocks shared by the model families: RMSNorm, rotary embeddings, gated MLP, and the
fusion of sibling linear layers into one for inference."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), statistics in float32 like HF Llama.

    ``y = weight * x / sqrt(mean(x^2) + eps)``; x: (..., hidden) -> (..., hidden).

    Computed as ``LayerNorm([x, -x])[..., :hidden]``: the doubled vector has mean 0 and variance
    mean(x^2), so LayerNorm's one fused kernel (float32 statistics for bf16 input) gives exactly
    the RMS normalization. PyTorch's ``F.rms_norm`` is not one kernel on the CPU (a pow, mean,
    rsqrt, mul chain after casting to float32). Timed inside a 16-sequence decode step (cold
    caches) it takes 40 instead of 60 us per call; hot in ``benchmarks/cpu_kernels.py`` it is 1.3x
    faster at 1 row, even at 16 and 1.4x slower at 512 (prefill), which costs <1% of a prefill.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x.shape[-1]
        doubled = torch.cat((x, -x), dim=-1)  # (..., 2 * hidden), mean 0 up to rounding
        normed = F.layer_norm(doubled, (2 * hidden,), eps=self.eps)[..., :hidden]
        return self.weight * normed


class GatedMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): ``down(silu(gate(x)) * up(x))``. Names follow HF.

    For inference, ``LlamaForCausalLM.fuse_projections_`` replaces gate_proj and up_proj by one
    ``gate_up_proj``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.gate_up_proj: nn.Module | None = None  # set by fuse_projections_ for inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def concat_linears(*linears: nn.Linear) -> nn.Linear:
    """One ``nn.Linear`` whose output is the outputs of ``linears`` side by side (same input).

    A projection split into fewer, wider matmuls: on the CPU each call costs ~17 us before any
    arithmetic, and SmolLM2's 210 linear layers per step become 120; the whole stack in prepacked
    bf16 takes 17.1 instead of 19.9 ms at 16 rows, 11.0 instead of 13.9 at 4
    (``benchmarks/cpu_kernels.py``).
    The result has no gradient; the model keeps the unfused layers for training.
    """
    first = linears[0]
    out_features = sum(lin.out_features for lin in linears)
    fused = nn.Linear(first.in_features, out_features, bias=first.bias is not None,
                      device="meta")  # no random init: the parameters are set below

    def cat(tensors: list[torch.Tensor]) -> nn.Parameter:
        if tensors[0].is_meta:  # structure only (models.loader.build_model with fused=True):
            # torch.cat's meta kernel is Python code whose first use imports torch._dynamo (2 s)
            shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
            joined = torch.empty(shape, dtype=tensors[0].dtype, device="meta")
        else:
            joined = torch.cat([t.detach() for t in tensors])
        return nn.Parameter(joined, requires_grad=False)

    fused.weight = cat([lin.weight for lin in linears])
    if first.bias is not None:
        fused.bias = cat([lin.bias for lin in linears])
    return fused


def fuse_linears_(root: nn.Module, fused_name: str,
                  part_names: Sequence[str]) -> list[tuple[str, int]]:
    """Replace the sibling linears ``part_names`` of ``root`` by one ``concat_linears`` layer
    named ``fused_name``, in place; the parts are deleted.

    Names are full module names under ``root`` (``model.layers.0.mlp.gate_proj``), every part
    under the parent of ``fused_name``.

    Returns:
        [(part name, output size)] in the fused layer's output order: which slice of its output
        each part computes (the 4-bit loader and multi-LoRA address the parts by it).
    """
    parent_name, _, fused_attr = fused_name.rpartition(".")
    parent = root.get_submodule(parent_name)
    parts = [root.get_submodule(name) for name in part_names]
    setattr(parent, fused_attr, concat_linears(*parts))
    for name in part_names:
        delattr(parent, name.rpartition(".")[2])
    return [(name, part.out_features) for name, part in zip(part_names, parts)]


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """``nn.Embedding(num_embeddings, embedding_dim)``, N(0, 1) initialized as PyTorch does,
    except on the meta device (``models.loader.build_model``), where the weight is left empty for
    the checkpoint's: ``normal_`` of a meta tensor runs a Python reference whose first use
    imports torch._dynamo, 2 s of every server start."""
    weight = torch.empty(num_embeddings, embedding_dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(num_embeddings, embedding_dim, _weight=weight)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) of RoPE (Su et al. 2021), with optional scaling.

    Supported ``scaling`` (the HF ``rope_scaling`` / ``rope_parameters`` dict):
    ``default``; ``linear`` (positions divided by ``factor``); ``llama3`` (Llama 3.1's
    frequency-dependent smoothing, as HF ``_compute_llama3_parameters``).

    Raises:
        ValueError: for any other rope type, naming it.
    """
    # float32 throughout, exactly as HF computes it, so greedy decoding matches token for token;
    # on the CPU even under a meta-device context (models.loader.build_model), where the meta
    # kernels of these ops are Python code whose first use imports torch._refs (~1.5 s)
    arange = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu")
    inv_freq = 1.0 / (theta ** (arange.float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: "
                     "default, linear, llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for rotary position embeddings, HF's rotate-half layout.

    ``table(positions (T,))`` gathers the step's (cos, sin), once for all layers;
    ``apply(x (T, heads, D), table)`` rotates every head of x (the model passes q and k heads
    side by side, so both turn in one pass) and returns a new (T, heads, D) tensor.

    Rotate-half pairs dim i with dim i + D/2: ``[x1 cos - x2 sin, x2 cos + x1 sin]``. The tables
    hold ``cos = [cos, cos]`` and ``sin = [-sin, sin]`` over the full head_dim, so the rotation
    is ``x * cos + roll(x, D/2) * sin``, computed in float32: three kernels instead of seven,
    1.2-1.3x faster than the halves formula from 1 to 512 tokens (``benchmarks/cpu_kernels.py``).
    The tables are computed on the CPU (``rope_inv_freq``) and move with the module.
    """

    def __init__(self, head_dim: int, max_position: int, theta: float,
                 scaling: dict | None = None, freq_factors: torch.Tensor | None = None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        if freq_factors is not None:  # GGUF `rope_freqs`: per-frequency divisors (Llama 3.1)
            inv_freq = inv_freq / freq_factors.float()
        t = torch.arange(max_position, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq)  # (max_position, D/2)
        cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)  # (P, D)
        self.register_buffer("sin", torch.cat((-sin, sin), dim=-1), persistent=False)

    def table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (T, 1, D) each, broadcast over heads
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cos, sin = table
        xf = x.float()
        return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, dims=-1), sin).to(x.dtype)
