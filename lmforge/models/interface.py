"""What the engine and the training loops require of a model family: the ``CausalLM`` protocol.

Every family (``llama.LlamaForCausalLM``, ``gpt.GPTLMHeadModel``) is an ``nn.Module`` that runs a
flat batch of T tokens from many sequences over the paged KV cache (``models.attention``), as
vLLM's model interface does; everything else (LoRA, packing, 4-bit weights) reaches it from
outside by module name. The engine reads its config by Llama's names (``num_hidden_layers``,
``num_key_value_heads``, ``head_dim``, ``max_position_embeddings``, ``vocab_size``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from lmforge.models.attention import AttentionMetadata

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (n_kv_heads, num_slots, head_dim)


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only language model over the paged KV cache."""

    config: Any  # the family's config dataclass, readable by Llama's attribute names
    # fused layer name -> [(original layer name, rows)], filled by ``fuse_projections_``
    fused_parts: dict[str, list[tuple[str, int]]]
    default_lora_targets: ClassVar[tuple[str, ...]]  # LoRA targets when a job names none
    fan_in_fan_out: ClassVar[bool]  # HF stores the targets as Conv1D (in, out) (PEFT's flag)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        """``input_ids`` (T,) and ``positions`` (T,) int64 -> hidden states (T, hidden_size)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden_size) -> (N, vocab_size) float32."""

    def kv_cache_shape(self, num_slots: int) -> tuple[int, int, int]:
        """One layer's K (or V) cache shape: (n_kv_heads, num_slots, head_dim)."""

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (tied to the head when ``tie_word_embeddings``)."""

    def fuse_projections_(self) -> None:
        """Fuse projections for serving (never before LoRA injection or training)."""
