"""Where a pretraining run computes: the device, and whether autocast to bfloat16 pays there.

bfloat16 autocast halves the bytes every matmul moves, but it is only faster where the hardware
multiplies bf16 natively: CUDA GPUs from Ampere on (``torch.cuda.is_bf16_supported``), and CPUs
with AMX-BF16 or AVX512-BF16. Elsewhere (an AVX2 laptop, most AVX-512 servers) oneDNN converts
to float32 around every op and autocast is slower, so ``"auto"`` stays in float32 there;
``benchmarks/pretrain.py`` measures both.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from lmforge.errors import InvalidRequestError

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags


def resolve_device(device: str) -> torch.device:
    """``"auto"``: cuda when available, else cpu; otherwise the named device.

    Raises:
        InvalidRequestError: a device torch does not know or this machine lacks.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise InvalidRequestError(f"unknown device {device!r}: {e}", param="device") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device cuda asked for, but no CUDA GPU is available",
                                  param="device")
    return resolved


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``dtype`` ("auto", "float32", "bfloat16") on ``device``; None =
    no autocast (float32 throughout)."""
    if dtype == "float32":
        return None
    if dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX-BF16 or AVX512-BF16; Linux flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)
