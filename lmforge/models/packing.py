"""Prepacked oneDNN weights for bf16 linear layers on the CPU.

``F.linear`` on a bf16 CPU tensor reorders the weight into oneDNN's blocked layout on every call.
Doing that reorder once at load time (what PyTorch's inductor does for CPU linears, through
``torch.ops.mkldnn._reorder_linear_weight`` and ``_linear_pointwise``) gives bit-identical results
and is 2-3x faster for the small batches of decoding (``benchmarks/cpu_kernels.py``: 576x1536 at 1 row,
158 -> 57-93 us; the 49152-wide vocabulary projection, 3.8 -> 1.1-1.3 ms).

Packing replaces each ``nn.Linear`` by a ``PackedLinear`` under the same name, after the loader
has fused q|k|v and gate|up (``LlamaForCausalLM.fuse_projections_``). Packing is for inference:
the packed weight has no gradient and no HF layout, so training uses the plain model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose bf16 weight is prepacked for oneDNN.

    x: (T, in_features) bf16 -> (T, out_features) bf16, equal to ``F.linear(x, w, b)``.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, None))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Packing applies to bf16 on a CPU whose PyTorch build has oneDNN and whose instruction set
    has oneDNN's bf16 reorder (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only CPU has not)."""
    return dtype == torch.bfloat16 and device.type == "cpu" and _cpu_packs_bf16()


@functools.cache
def _cpu_packs_bf16() -> bool:
    """Whether oneDNN can reorder a bf16 weight here. PyTorch offers no query for it, and the
    op raises on CPUs without the instructions, so try it once on a tiny weight."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), None)
    except RuntimeError:
        return False
    return True


def pack_linears_(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` under ``module`` (or ``module`` itself) by a PackedLinear.

    On a whole model this packs the LM head too; a head tied to the embedding gets a packed
    copy, and the embedding keeps its own weight.

    Returns:
        the module, or its replacement when ``module`` itself is an ``nn.Linear``.
    """
    if isinstance(module, nn.Linear):
        return PackedLinear(module)
    for name, child in list(module.named_children()):
        setattr(module, name, pack_linears_(child))
    return module
