"""A GGUF model's fused weights, cached as safetensors and memory-mapped back: dequantized, or
(the ``"codes"`` variant) with the quantized modules' codes, scales and zeros.

Reading a GGUF means dequantizing every tensor and then fusing q|k|v and gate|up with copies:
1.6 s of the default model's start-up on a 2-core VM. The result depends only on the file,
the dtype and lmforge's loader, so ``load_model`` saves it once under
``$LMFORGE_CACHE/weights/<key>.safetensors`` and later starts load it with ``safetensors``'
zero-copy memory map (~0.05 s; the pages are file-backed, read in on first use, and the kernel
may drop them under memory pressure instead of swapping). The key hashes the resolved path,
size and mtime of the GGUF, the dtype and ``FORMAT``, which changes whenever the loader
computes different weights. A cache that cannot be written (read-only or full disk) only costs
the time; a corrupt one is deleted and rebuilt.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from lmforge.config import file_cache_key, lmforge_cache

logger = logging.getLogger(__name__)

# bump when the loader's output for the same file changes (names, fusing, dequantization)
FORMAT = 3


def cache_path(gguf_path: Path, dtype: torch.dtype, variant: str = "dense") -> Path:
    """Where the weights of ``gguf_path`` in ``dtype`` are cached; ``variant``: ``"dense"``
    (every weight dequantized) or ``"codes"`` (projections kept as ``QuantLinear`` codes)."""
    key = file_cache_key(gguf_path, dtype, FORMAT, variant)
    return lmforge_cache() / "weights" / f"{key}.safetensors"


def load(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached state dict (memory-mapped, copy-on-write), or None when there is none or it
    cannot be read (then it is deleted)."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, RuntimeError) as e:
        logger.warning("dropping an unreadable weight cache %s (%s)", path, e)
        path.unlink(missing_ok=True)
        return None


def save(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Write ``state_dict`` (CPU tensors, no two sharing memory) to a temporary sibling, then
    rename it into place, so a reader never sees half a file; failures are logged, not raised."""
    from safetensors.torch import save_file

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        logger.warning("could not cache the weights in %s (%s); the next start reads the "
                       "GGUF again", path.parent, e)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
