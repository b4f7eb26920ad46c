"""Which linear-layer kernels a loaded model runs, and why the faster ones are off: the line
``lmforge serve`` prints at start-up (``LoadedModel.kernels``)."""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig
from lmforge.models.packing import can_pack
from lmforge.models.quant import can_use_int4


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kernel_path(dtype: torch.dtype, device: torch.device, cfg: ModelConfig, has_q4: bool) -> str:
    """Which linear-layer kernels ``load_model`` chose, and why the faster ones are off."""
    if device.type != "cpu":
        return f"{dtype_name(dtype)} dense on {device}"
    if dtype != torch.bfloat16:
        return (f"{dtype_name(dtype)} dense (no oneDNN-prepacked or 4-bit kernels: they need "
                "bfloat16, which --dtype auto picks only on CPUs with AVX512-BF16 or AMX)")
    parts = ["bfloat16 prepacked (oneDNN)" if can_pack(dtype, device)
             else "bfloat16 dense (this CPU has no oneDNN bf16 reorder)"]
    if has_q4 and cfg.gguf_int4 and can_use_int4(dtype, device):
        parts.append("the GGUF's 4-bit weights for batches of up to 8 rows")
    elif has_q4:
        parts.append("4-bit kernel off (--no-gguf-int4 or no int4 kernel in this PyTorch)")
    return ", ".join(parts)
