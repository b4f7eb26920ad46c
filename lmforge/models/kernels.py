"""Which linear-layer kernels a loaded model runs (``quant_mode`` chooses how a GGUF's quantized
weights are kept), and why the faster ones are off: the line ``lmforge serve`` prints at start-up
(``LoadedModel.kernels``)."""

from __future__ import annotations

import torch

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import ModelLoadError
from lmforge.models.packing import can_pack
from lmforge.models.quant import can_use_int4
from lmforge.models.quant_linear import QuantLinear


@dataclass
class QuantMode:
    """How a GGUF's quantized projections are kept at serving time.

    ``form``: None (dequantized to ``dtype``), ``"int4"`` (Q4_0/Q4_1 also kept for PyTorch's bf16
    int4 kernel) or ``"codes"`` (every supported block type kept as codes for lmforge's float32
    kernel, ``ext``); ``why_not``: why the kernel is off where it would apply; ``bits``: 8 or 4
    for ``--quantization int8|int4`` of the dense linear layers, else None.
    """

    form: str | None
    ext: object | None
    why_not: str
    bits: int | None = None


def quant_mode(cfg: ModelConfig, path: Path, dtype: torch.dtype, device: torch.device) -> QuantMode:
    """The ``QuantMode`` for serving ``path`` in ``dtype`` on ``device``: ``"int4"`` for bf16 on a
    CPU with PyTorch's int4 kernel, ``"codes"`` for float32 on a CPU once lmforge's kernel
    compiles (``cpu_ext.quant_ext``), else None. ``--no-gguf-int4`` and ``--deterministic``
    turn both off, and an HF directory has no quantized weights.

    Raises:
        ModelLoadError: ``--quantization`` or ``--int8-activations`` with ``--deterministic``,
            or off a float32 CPU model.
    """
    bits = {"int8": 8, "int4": 4}.get(cfg.quantization)
    kernel_ok = not cfg.deterministic and device.type == "cpu" and dtype == torch.float32
    if bits and not kernel_ok:
        raise ModelLoadError(f"--quantization {cfg.quantization} runs float32 activations on the "
                             "CPU, without --deterministic (use --dtype float32 or auto)")
    if cfg.int8_activations and not kernel_ok:
        raise ModelLoadError("--int8-activations runs on lmforge's quantized kernel: float32 on "
                             "the CPU, without --deterministic (use --dtype float32 or auto)")
    if cfg.deterministic or (path.is_dir() and not bits):
        return QuantMode(None, None, "")
    if not cfg.gguf_int4 and not bits:
        return QuantMode(None, None, "--no-gguf-int4")
    if can_use_int4(dtype, device):
        return QuantMode("int4", None, "")
    if device.type != "cpu" or dtype != torch.float32:
        return QuantMode(None, None, "")
    from lmforge.models.cpu_ext import quant_ext

    ext, why = quant_ext()
    form = "codes" if ext is not None and cfg.gguf_int4 and not path.is_dir() else None
    return QuantMode(form, ext, why, bits)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kernel_path(dtype: torch.dtype, device: torch.device, cfg: ModelConfig, mode: QuantMode,
                model: nn.Module, has_q4: bool) -> str:
    """Which linear-layer kernels ``load_model`` chose, and why the faster ones are off."""
    if device.type != "cpu":
        return f"{dtype_name(dtype)} dense on {device}"
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if layers:
        counts = Counter(m.bits for m in layers)
        kinds = [f"{counts[b]} {b}-bit" for b in sorted(counts)]
        what = (f"--quantization {cfg.quantization}" if mode.bits
                else "the GGUF's quantized weights, kept as codes")
        how = ("lmforge's compiled kernel" if mode.ext is not None
               else f"PyTorch reference path, slow: {mode.why_not}")
        acts = ("int8 activations (groups of 32, as llama.cpp)" if layers[0].int8_activations
                else "float32 activations")
        return (f"{acts} on {what} ({how}: {', '.join(kinds[:-1])}"
                f"{' and ' if len(kinds) > 1 else ''}{kinds[-1]} layers)")
    if dtype != torch.bfloat16:
        off = f": {mode.why_not}" if mode.why_not else ""
        int8 = "; --int8-activations has no quantized layer to act on" if cfg.int8_activations else ""
        return f"{dtype_name(dtype)} dense (quantized kernels off{off}){int8}"
    parts = ["bfloat16 prepacked (oneDNN)" if can_pack(dtype, device)
             else "bfloat16 dense (this CPU has no oneDNN bf16 reorder)"]
    if has_q4 and mode.form == "int4":
        parts.append("the GGUF's 4-bit weights for batches of up to 8 rows")
    elif not cfg.gguf_int4:
        parts.append("4-bit kernel off (--no-gguf-int4)")
    return ", ".join(parts)
