"""SchedulerOutput -> input tensors + attention metadata -> logits. Owns the KV-cache tensors.

The flat batch puts single-token queries (decodes) first, then each multi-token chunk
(prefills); ``execute`` returns a ``ModelOutput``: logits only for the requests that sample this
step, in the order of ``SchedulerOutput.sampling_requests()``, plus the prompt rows' logits of
requests that asked for prompt logprobs.
"""

from __future__ import annotations

import math
import mmap
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from lmforge.config import CacheConfig
from lmforge.engine.block_manager import BlockManager
from lmforge.engine.request import Request
from lmforge.engine.scheduler import SchedulerOutput
from lmforge.models.attention import (
    AttentionMetadata,
    ContextChunk,
    PrefillChunk,
    block_rows,
)
from lmforge.models.interface import CausalLM
from lmforge.models.multi_lora import LoRAManager


def num_kv_blocks(model: CausalLM, cache: CacheConfig) -> int:
    """``cache.num_blocks``, else the blocks that hold ``cache.kv_cache_tokens``, else those
    that fit in ``cache.kv_cache_memory_mb``."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if cache.kv_cache_tokens is not None:
        return -(-cache.kv_cache_tokens // cache.block_size)
    return max(2, cache.kv_cache_memory_mb * 2**20
               // kv_block_bytes(model, cache.block_size, cache.kv_cache_dtype))


def kv_block_bytes(model: CausalLM, block_size: int, kv_dtype: str = "auto") -> int:
    """Bytes of one KV block: K and V of ``block_size`` tokens in every layer."""
    cfg = model.config
    return (2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim
            * torch.finfo(kv_cache_dtype(model, kv_dtype)).bits // 8)


def kv_cache_dtype(model: CausalLM, name: str) -> torch.dtype:
    """``CacheConfig.kv_cache_dtype`` resolved: ``auto`` is the model's dtype."""
    return next(model.parameters()).dtype if name == "auto" else getattr(torch, name)


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor; on the CPU an anonymous memory map: fresh zero pages from the OS that
    become resident only when written, so a KV cache costs memory as it fills, not at start-up
    (``torch.zeros`` writes every page: 0.4 s and 1 GiB of RSS for the default 1 GiB cache).

    The map is marked ``MADV_NOHUGEPAGE``: with transparent huge pages, one write would make a
    whole 2 MiB page resident (numpy's ``zeros`` asks for huge pages, and a 720 MiB cache 30%
    written was 100% resident)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = max(1, math.prod(shape) * torch.empty((), dtype=dtype).element_size())
    pages = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    flat = torch.frombuffer(pages, dtype=torch.uint8)  # keeps the map alive
    return flat[:math.prod(shape) * torch.empty((), dtype=dtype).element_size()].view(dtype).view(shape)


@dataclass
class ModelOutput:
    """What one step computed.

    ``logits``: (num_sampling_requests, vocab) float32, in ``SchedulerOutput.sampling_requests()``
    order. ``prompt_logits``: for each request that still needs prompt logprobs, (first target
    position p, (m, vocab) float32 logits) whose row i predicts the prompt token at position
    p + i.
    """

    logits: torch.Tensor
    prompt_logits: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)


class ModelRunner:
    """Runs the model on one scheduled step.

    Args:
        model: the loaded model (on its device, in its dtype).
        block_manager: source of each request's block table.
        num_blocks, block_size: KV cache geometry; K and V per layer are
            (n_kv_heads, num_blocks * block_size, head_dim) tensors in the model's dtype.
        loras: the LoRA adapters requests may name (``Request.lora_name``); each step's
            forward pass runs inside ``loras.applying``, which tells the model's LoRA layers
            which rows use which adapter.
        deterministic: attend through ``models.invariant`` (a row's result independent of the
            batch and of chunking; the model's linears must be batch-invariant too).
        kv_dtype: the caches' dtype (default: the model's); attention casts what it reads.
    """

    def __init__(self, model: CausalLM, block_manager: BlockManager, num_blocks: int,
                 block_size: int, loras: LoRAManager | None = None, deterministic: bool = False,
                 kv_dtype: torch.dtype | None = None):
        self.model = model
        self.deterministic = deterministic
        self.loras = loras
        self.block_manager = block_manager
        self.block_size, self.num_blocks = block_size, num_blocks
        self.num_kv_heads = model.config.num_key_value_heads
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        shape = model.kv_cache_shape(num_blocks * block_size)
        layers = model.config.num_hidden_layers
        caches = zeroed((2 * layers, *shape), kv_dtype or self.dtype, self.device)
        self.kv_caches = [(caches[2 * i], caches[2 * i + 1]) for i in range(layers)]
        self.kv_cache_bytes = caches.numel() * caches.element_size()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelOutput:
        """Compute one step: logits of the sampling requests (and of prompt positions for the
        requests that want prompt logprobs)."""
        order = sorted(range(len(out.requests)), key=lambda i: out.num_new_tokens[i] != 1)
        reqs = [out.requests[i] for i in order]
        counts = [out.num_new_tokens[i] for i in order]
        input_ids, positions, meta, last_rows = self._prepare(reqs, counts)
        with self._adapters(reqs, counts):
            hidden = self.model(input_ids, positions, self.kv_caches, meta)  # (T, hidden)
        # logits only for the last row of each sampling request, in the scheduler's order
        row_of = {id(r): row for r, row in zip(reqs, last_rows)}
        rows = [row_of[id(r)] for r in out.sampling_requests()]
        logits = (self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
                  if rows else torch.empty(0, self.model.config.vocab_size, device=self.device))
        return ModelOutput(logits, self._prompt_logits(hidden, reqs, counts, last_rows))

    def _adapters(self, reqs: list[Request], counts: list[int]) -> AbstractContextManager:
        """Each request's LoRA adapter on its rows for the forward pass inside the block."""
        if self.loras is None:
            return nullcontext()
        return self.loras.applying([r.lora_name for r in reqs], counts)

    def _prompt_logits(self, hidden: torch.Tensor, reqs: list[Request], counts: list[int],
                       last_rows: list[int]) -> dict[str, tuple[int, torch.Tensor]]:
        """Logits of the rows whose next token is a prompt token, for requests that want them.

        A chunk over positions [s, s + n) predicts positions s + 1 .. s + n; those up to the last
        prompt position P - 1 are prompt tokens.
        """
        out = {}
        for r, n, last in zip(reqs, counts, last_rows):
            if not r.needs_prompt_logprobs:
                continue
            s = r.num_computed_tokens
            m = max(0, min(n, r.num_prompt_tokens - 1 - s))
            if m:
                first = last - n + 1
                out[r.request_id] = (s + 1, self.model.compute_logits(hidden[first:first + m]))
        return out

    def _prepare(self, reqs: list[Request], counts: list[int]):
        tables = [self.block_manager.block_table(r.request_id) for r in reqs]
        width = max(len(t) for t in tables)
        block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables])  # (B, width)
        starts = torch.tensor([r.num_computed_tokens for r in reqs])
        n = torch.tensor(counts)
        ctx_lens = starts + n  # (B,) context length after this step

        tokens, last_rows, row = [], [], 0
        for r, c in zip(reqs, counts):
            tokens.extend(r.all_token_ids[r.num_computed_tokens:r.num_computed_tokens + c])
            row += c
            last_rows.append(row - 1)
        req_of_row = torch.repeat_interleave(torch.arange(len(reqs)), n)  # (T,)
        row_start = torch.cumsum(n, 0) - n
        positions = starts[req_of_row] + torch.arange(len(tokens)) - row_start[req_of_row]
        slot_mapping = self._slots(block_table[req_of_row], positions[:, None])[:, 0]

        to, bs = self.device, self.block_size
        if self.deterministic:
            meta = self._invariant_meta(block_table, starts, ctx_lens, row_start, slot_mapping)
            return torch.tensor(tokens, device=to), positions.to(to), meta, last_rows
        num_decodes = sum(1 for c in counts if c == 1)
        decode_rows = decode_bias = None
        if num_decodes:
            width = -(-int(ctx_lens[:num_decodes].max()) // bs)  # blocks in the longest context
            decode_tables = block_table[:num_decodes, :width].contiguous()
            decode_rows = self._rows(decode_tables)
            padding = torch.arange(width * bs)[None, :] >= ctx_lens[:num_decodes, None]  # (Bd, L)
            decode_bias = torch.zeros(padding.shape).masked_fill_(padding, float("-inf"))
            decode_bias = decode_bias[:, None, None, :]  # (Bd, 1, 1, L)
        prefills = [self._prefill_chunk(block_table[i], int(starts[i]), counts[i],
                                        int(row_start[i]))
                    for i in range(num_decodes, len(reqs))]
        meta = AttentionMetadata(
            slot_mapping=slot_mapping.to(to), block_size=bs, num_decodes=num_decodes,
            decode_rows=None if decode_rows is None else decode_rows.to(to),
            decode_bias=None if decode_bias is None else decode_bias.to(to), prefills=prefills)
        if num_decodes:
            meta.decode_tables = decode_tables.to(to)
            meta.decode_lens = ctx_lens[:num_decodes].to(to)
        return torch.tensor(tokens, device=to), positions.to(to), meta, last_rows

    def _invariant_meta(self, block_table: torch.Tensor, starts: torch.Tensor,
                        ctx_lens: torch.Tensor, row_start: torch.Tensor,
                        slot_mapping: torch.Tensor) -> AttentionMetadata:
        """Batch-invariant mode: each request's rows and its whole context (``ContextChunk``),
        decodes and prefill chunks alike."""
        chunks = [ContextChunk(int(row_start[i]), int(row_start[i] + ctx_lens[i] - starts[i]),
                               int(starts[i]),
                               self._rows(block_table[i, :-(-int(ctx_lens[i]) // self.block_size)]
                                          ).to(self.device))
                  for i in range(len(starts))]
        return AttentionMetadata(slot_mapping=slot_mapping.to(self.device),
                                 block_size=self.block_size, num_decodes=0, decode_rows=None,
                                 decode_bias=None, prefills=[], invariant=chunks)

    def _prefill_chunk(self, table: torch.Tensor, start: int, n: int, row: int) -> PrefillChunk:
        if start == 0:  # no cached prefix: attend to the chunk's own K/V, plain causal
            return PrefillChunk(row, row + n, None, None)
        width = -(-(start + n) // self.block_size)
        pos = torch.arange(width * self.block_size)
        q_pos = torch.arange(start, start + n)
        # (n, W * block_size): causal, offset by the cached prefix; this also masks the padding
        # after the last token, as every padded position lies after every query
        mask = pos[None, :] <= q_pos[:, None]
        return PrefillChunk(row, row + n, self._rows(table[:width]).to(self.device),
                            mask.to(self.device))

    def _rows(self, block_table: torch.Tensor) -> torch.Tensor:
        """Cache rows of these blocks for every KV head (``models.attention.block_rows``)."""
        return block_rows(block_table, self.num_kv_heads, self.num_blocks)

    def _slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat cache slots: ``block_table[r, pos // bs] * bs + pos % bs``.

        block_table: (R, width) int64; positions: (R, L) -> (R, L) slots.
        """
        bs = self.block_size
        return torch.gather(block_table, 1, positions // bs) * bs + positions % bs
