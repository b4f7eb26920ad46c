"""The corpus as one memory-mapped array of token ids, tokenized once (nanoGPT's ``train.bin``).

``tokenize_corpus`` encodes the text files in order, each followed by the end-of-text token
(GPT-2's document separator), into a flat ``uint16`` file (``uint32`` above 65,535 ids) with a
JSON sidecar naming the files, their sizes and the tokenizer; a later call with the same inputs
reuses it. ``TokenStream`` reads windows from it: random ``(x, y)`` training batches drawn from
``(seed, step, micro_batch)`` alone, so a resumed run reads exactly the data an uninterrupted
one would, and a fixed set of evenly spaced validation windows, so every evaluation scores the
same text.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


def tokenize_corpus(files: Sequence[str | Path], tokenizer, eot_id: int, path: Path,
                    *, show_progress: bool = True) -> np.ndarray:
    """Token ids of ``files`` in order, ``eot_id`` after each, memory-mapped from ``path``.

    Args:
        tokenizer: a ``transformers`` tokenizer; its ``tokenizer.json`` content is part of the
            cache key.

    Returns:
        (N,) uint16 or uint32, read-only.
    """
    key = _cache_key(files, tokenizer)
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == key:
        return np.memmap(path, dtype=key["dtype"], mode="r")
    dtype = np.dtype(key["dtype"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for f in tqdm(list(files), desc=f"Tokenizing {path.stem}", unit="file",
                      disable=not show_progress):
            text = Path(f).read_text(encoding="utf-8", errors="replace")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            np.asarray([*ids, eot_id], dtype=dtype).tofile(out)
    os.replace(tmp, path)
    meta_path.write_text(json.dumps(key))
    return np.memmap(path, dtype=dtype, mode="r")


def _cache_key(files: Sequence[str | Path], tokenizer) -> dict:
    state = tokenizer.backend_tokenizer.to_str().encode()
    stats = [[str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns]
             for f in files]  # lists, as the JSON sidecar reads back
    return {"files": stats, "tokenizer": hashlib.sha256(state).hexdigest(),
            "dtype": "uint16" if len(tokenizer) <= 65536 else "uint32"}


def unigram_cross_entropy(train: np.ndarray, valid: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``valid`` under the unigram distribution of ``train``
    (add-one smoothed): the loss of a model that ignores context, which a model that learned
    anything from context must beat."""
    counts = np.bincount(np.asarray(train), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(valid)].mean())


class TokenStream:
    """Windows of ``context + 1`` tokens from a token array: input ``x`` and next-token ``y``.

    Raises (constructor):
        ValueError: fewer than ``context + 1`` tokens.
    """

    def __init__(self, tokens: np.ndarray, context: int):
        if len(tokens) < context + 1:
            raise ValueError(f"{len(tokens)} tokens are fewer than one window of "
                             f"{context + 1}; give more text or a shorter context")
        self.tokens, self.context = tokens, context

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, batch_size: int, seed: int, step: int, micro: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` windows at random offsets drawn from ``(seed, step, micro)``; (x, y),
        each (batch_size, context) int64."""
        rng = np.random.default_rng([seed, step, micro])
        starts = rng.integers(0, len(self.tokens) - self.context, size=batch_size)
        return self._windows(starts)

    def eval_batches(self, n_windows: int, batch_size: int
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Up to ``n_windows`` windows evenly spaced over the array (non-overlapping when the
        array is long enough), in batches of ``batch_size``; the same every call."""
        last = len(self.tokens) - self.context - 1
        n = max(1, min(n_windows, last // self.context + 1))
        starts = np.linspace(0, last, n).astype(np.int64)
        return [self._windows(starts[i:i + batch_size]) for i in range(0, n, batch_size)]

    def _windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.tokens[s:s + self.context + 1] for s in starts]).astype(np.int64)
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]
