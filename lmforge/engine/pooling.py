"""Embeddings: mean-pooled, L2-normalized final hidden states, computed in bounded pieces.

An embedding is the mean over a prompt's tokens of the model's last hidden state (the final
decoder layer's output after the final norm, Hugging Face's ``LlamaModel(...).last_hidden_state``),
L2-normalized, as the Chinese-LLaMA-Alpaca OpenAI server does. No ``lm_head`` is applied.

``EmbeddingTask`` runs the model forward over the prompts of one request in pieces of at most
``max_piece_tokens`` tokens (the scheduler's ``max_num_batched_tokens``), so a caller that
alternates ``task.step()`` with ``LLMEngine.step()`` never holds generation up for more than one
budget's worth of compute. Short prompts are packed into one piece; a prompt longer than the
budget is split into chunks that attend to their earlier chunks, as chunked prefill does. The
K/V go to a scratch cache owned by the task, never to the engine's paged KV cache, so the
scheduler's block accounting and the prefix cache are untouched; the scratch holds at most the
longest prompt plus one piece and is freed when the task finishes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import ContextLengthExceededError, InvalidRequestError
from lmforge.models.attention import AttentionMetadata, PrefillChunk, block_rows
from lmforge.models.interface import CausalLM, KVCache

MAX_EMBEDDING_INPUTS = 2048  # prompts per request, the OpenAI API's limit


def mean_pool(hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Mean over each prompt's tokens, then L2 normalization.

    Args:
        hidden: (T, hidden_size) hidden states of several prompts, one after another, with no
            padding; T = sum(lengths).
        lengths: tokens of each prompt, each >= 1.

    Returns:
        (B, hidden_size) float32, B = len(lengths), each row of unit L2 norm (a zero mean stays
        zero: the norm is clamped at 1e-12, as ``F.normalize``). The naive equivalent:
        ``F.normalize(torch.stack([h.float().mean(0) for h in hidden.split(lengths)]), dim=-1)``.
    """
    counts = torch.tensor(lengths, device=hidden.device)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), counts)
    sums = torch.zeros(len(lengths), hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, segment, hidden.float())  # (B, hidden_size), summed in fp32
    return F.normalize(sums / counts[:, None], dim=-1)


def validate_embedding_inputs(prompts: list[list[int]], vocab_size: int,
                              max_model_len: int) -> None:
    """Check the token-id prompts of one embeddings request.

    Raises:
        InvalidRequestError: no prompts, more than ``MAX_EMBEDDING_INPUTS``, an empty prompt, or
            a token id outside ``[0, vocab_size)`` (param ``input``).
        ContextLengthExceededError: a prompt longer than ``max_model_len`` (the message gives
            both numbers).
    """
    if not prompts:
        raise InvalidRequestError("input must not be empty", param="input")
    if len(prompts) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequestError(
            f"input has {len(prompts)} items; send at most {MAX_EMBEDDING_INPUTS} per request",
            param="input")
    for i, prompt in enumerate(prompts):
        where = f"input[{i}]" if len(prompts) > 1 else "input"
        if not prompt:
            raise InvalidRequestError(f"{where} is empty; send at least one token", param="input")
        bad = next((t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab_size),
                   None)
        if bad is not None:
            raise InvalidRequestError(
                f"{where} has token id {bad!r}, outside the vocabulary [0, {vocab_size})",
                param="input")
        if len(prompt) > max_model_len:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {max_model_len} tokens. However, "
                f"{where} has {len(prompt)} tokens. Please reduce the length of the input.",
                param="input")


class EmbeddingTask:
    """The embeddings of a list of token-id prompts, computed a piece per ``step()``.

    Args:
        model: the engine's model; only its forward (final hidden states) is used.
        prompts: token ids, already validated (``validate_embedding_inputs``).
        block_size: tokens per block of the scratch KV cache (the engine's, so that the attention
            code reads it exactly as it reads the paged cache).
        max_piece_tokens: most tokens one ``step()`` computes.

    Constructing a task runs no torch op; call ``step()`` only on the thread that runs the model.
    """

    def __init__(self, model: CausalLM, prompts: list[list[int]], block_size: int,
                 max_piece_tokens: int):
        self.model = model
        self.prompts = prompts
        self.block_size = block_size
        self.max_piece_tokens = max_piece_tokens
        self.num_tokens = sum(len(p) for p in prompts)
        self._pooled: list[torch.Tensor] = []  # (B_i, hidden_size) float32, in prompt order
        self._next = 0  # index of the first prompt not yet pooled
        self._offset = 0  # its tokens computed in earlier pieces (> 0 only for a split prompt)
        self._partial: list[torch.Tensor] = []  # their final hidden states, (n, hidden) float32
        self._kv_caches: list[KVCache] | None = None  # scratch, allocated at the first step

    @property
    def finished(self) -> bool:
        return self._next == len(self.prompts)

    @torch.inference_mode()
    def step(self) -> bool:
        """Compute the next piece; returns whether every prompt is now pooled."""
        if self.finished:
            return True
        if self._kv_caches is None:
            self._kv_caches = self._scratch_caches()
        chunks = self._plan()
        input_ids, positions, meta = self._inputs(chunks)
        hidden = self.model(input_ids, positions, self._kv_caches, meta).float()  # (T, hidden)
        (first, start, n), rest = chunks[0], chunks[1:]
        if start + n < len(self.prompts[first]):  # a long prompt goes on in the next piece
            self._partial.append(hidden)
            self._offset = start + n
            return False
        done = torch.cat([*self._partial, hidden])  # whole prompts only, one after another
        self._pooled.append(mean_pool(done, [self._offset + n] + [m for _, _, m in rest]))
        self._next, self._offset, self._partial = first + 1 + len(rest), 0, []
        if self.finished:
            self._kv_caches = None  # free the scratch now, not when the caller drops the task
        return self.finished

    def result(self) -> torch.Tensor:
        """(len(prompts), hidden_size) float32 unit vectors, in prompt order.

        Raises:
            RuntimeError: called before ``step()`` returned True.
        """
        if not self.finished:
            raise RuntimeError("the embedding task has pieces left; call step() until it "
                               "returns True")
        return torch.cat(self._pooled)

    def _plan(self) -> list[tuple[int, int, int]]:
        """This piece's chunks as (prompt index, first position, tokens).

        The first chunk continues (or starts) prompt ``_next`` and takes up to the whole budget;
        only when it finishes its prompt do whole prompts that fit in what is left follow. So
        only a prompt longer than the budget is ever split, and it always starts a piece.
        """
        prompts, budget = self.prompts, self.max_piece_tokens
        i, start = self._next, self._offset
        n = min(len(prompts[i]) - start, budget)
        chunks, budget = [(i, start, n)], budget - n
        if start + n == len(prompts[i]):
            i += 1
            while i < len(prompts) and len(prompts[i]) <= budget:
                chunks.append((i, 0, len(prompts[i])))
                budget -= len(prompts[i])
                i += 1
        return chunks

    def _inputs(self, chunks: list[tuple[int, int, int]]
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat input ids (T,), positions (T,) and the metadata of one piece.

        Row r of the piece writes its K/V at scratch slot ``start_0 + r``: the first chunk's
        slots equal its positions, so a split prompt finds its earlier chunks at slots
        ``[0, start_0)``; the whole prompts after it attend only to their own K/V and merely need
        slots that do not overlap.
        """
        ids, positions, prefills, row = [], [], [], 0
        for i, start, n in chunks:
            ids.extend(self.prompts[i][start:start + n])
            positions.extend(range(start, start + n))
            prefills.append(self._chunk(row, start, n))
            row += n
        first = chunks[0][1]
        device = self._kv_caches[0][0].device
        meta = AttentionMetadata(
            slot_mapping=torch.arange(first, first + row, device=device),
            block_size=self.block_size, num_decodes=0, decode_rows=None, decode_bias=None,
            prefills=prefills)
        return (torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta)

    def _chunk(self, row: int, start: int, n: int) -> PrefillChunk:
        """As ``ModelRunner._prefill_chunk``, over the scratch cache whose block i is block i."""
        if start == 0:  # a whole prompt or a first chunk: plain causal over its own K/V
            return PrefillChunk(row, row + n, None, None)
        bs, (k_cache, _) = self.block_size, self._kv_caches[0]
        width = -(-(start + n) // bs)  # blocks of context, this chunk included
        rows = block_rows(torch.arange(width), k_cache.shape[0], k_cache.shape[1] // bs)
        # (n, width * bs): causal, offset by the earlier chunks; masks the unwritten tail too
        mask = torch.arange(width * bs)[None, :] <= torch.arange(start, start + n)[:, None]
        return PrefillChunk(row, row + n, rows.to(k_cache.device), mask.to(k_cache.device))

    def _scratch_caches(self) -> list[KVCache]:
        """Zeroed K/V per layer: a piece starts at most at the longest split prompt's last
        position, so that plus one budget bounds the slots. Zeros, not ``empty``: the unwritten
        tail of a gathered block is masked, and a masked NaN would still poison ``probs @ V``."""
        budget = self.max_piece_tokens
        longest_split = max((len(p) for p in self.prompts if len(p) > budget), default=0)
        num_slots = -(-(longest_split + budget) // self.block_size) * self.block_size
        param = next(self.model.parameters())
        shape = self.model.kv_cache_shape(num_slots)
        return [(torch.zeros(shape, dtype=param.dtype, device=param.device),
                 torch.zeros(shape, dtype=param.dtype, device=param.device))
                for _ in range(self.model.config.num_hidden_layers)]
