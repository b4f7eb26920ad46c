"""The Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2 (Touvron et al. 2023; Qwen2 adds q/k/v bias).

Pre-norm decoder blocks with RMSNorm, rotary positions, grouped-query attention and a SwiGLU MLP.
Module names equal the Hugging Face checkpoint names (``model.layers.0.self_attn.q_proj``), so
loading a checkpoint is a name table and PEFT adapters interoperate.

The model runs over a flat batch of T tokens from many requests and the paged KV cache; see
``lmforge.models.attention``. It knows nothing of LoRA: ``models/lora.py`` (training) and
``models/multi_lora.py`` (serving) swap its HF-named projections for LoRA layers from outside, as
``models/packing.py`` and ``models/quant.py`` swap in theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.models.attention import AttentionMetadata, paged_attention, write_kv
from lmforge.models.layers import (
    GatedMLP,
    RMSNorm,
    RotaryEmbedding,
    embedding,
    fuse_linears_,
)

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (n_kv_heads, num_slots, head_dim)


@dataclass
class LlamaConfig:
    """The hyperparameters of a Llama-family checkpoint (HF ``config.json`` field names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    tie_word_embeddings: bool = False
    architecture: str = "llama"
    rope_freq_factors: list[float] | None = field(default=None, repr=False)  # GGUF rope_freqs

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


# fused layer (per decoder layer) -> the HF layers it concatenates, in output order
FUSED_PROJECTIONS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj",
                                            "self_attn.v_proj"),
                     "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}

Rope = tuple[torch.Tensor, torch.Tensor]  # this step's (cos, sin), each (T, 1, head_dim)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.scale = self.head_dim ** -0.5
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=False)
        self.qkv_proj: nn.Module | None = None  # set by fuse_projections_ for inference

    def forward(self, rope: Rope, x: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        t, h, h_kv, d = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qk, v = self.qkv_proj(x).split(((h + h_kv) * d, h_kv * d), dim=-1)
        else:
            qk = torch.cat((self.q_proj(x), self.k_proj(x)), dim=-1)
            v = self.v_proj(x)
        qk = RotaryEmbedding.apply(qk.view(t, h + h_kv, d), rope)  # q and k heads in one pass
        q, k = qk.split((h, h_kv), dim=1)  # (T, H, D), (T, Hkv, D)
        v = v.view(t, h_kv, d)
        k_cache, v_cache = kv_cache
        write_kv(k_cache, meta.slot_mapping, k)
        write_kv(v_cache, meta.slot_mapping, v)
        o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)  # (T, H, D)
        return self.o_proj(o.reshape(t, self.n_heads * self.head_dim))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, rope: Rope, x, kv_cache, meta):
        x = x + self.self_attn(rope, self.input_layernorm(x), kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        freq_factors = (torch.tensor(cfg.rope_freq_factors, device="cpu")
                        if cfg.rope_freq_factors is not None else None)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                      cfg.rope_scaling, freq_factors)
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, meta, fused=None):
        x = self.embed_tokens(input_ids)  # (T, hidden)
        if fused is not None and fused.applies(x, kv_caches, meta):  # models/fused_decode.py
            return self.norm(fused(x, positions, kv_caches, meta))
        rope = self.rotary.table(positions)  # gathered once per step, shared by every layer
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(rope, x, kv_cache, meta)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM over the paged KV cache.

    ``forward(input_ids (T,), positions (T,), kv_caches, meta) -> hidden (T, hidden)``;
    ``compute_logits(hidden (N, hidden)) -> (N, vocab)`` (float32), called only on the rows that
    sample, so the vocabulary projection is not paid for every prefill token.
    """

    # LoRA's targets when a fine-tuning job names none: every linear of a block (as QLoRA)
    default_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj")
    fan_in_fan_out = False  # HF's Llama layers are nn.Linear

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # fused layer name -> [(HF part name, output size)] in output order; fuse_projections_
        # fills it (``model.layers.0.self_attn.qkv_proj`` -> [(``...q_proj``, 576), ...])
        self.fused_parts: dict[str, list[tuple[str, int]]] = {}
        # decode steps in one compiled call, where the loader could build one
        # (models/fused_decode.py); None = every step through the layers below
        self.fused_decoder = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta, self.fused_decoder)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def fuse_projections_(self) -> None:
        """Fuse q|k|v and gate|up into one linear layer each, in place (inference only).

        Names after fusion: ``FUSED_PROJECTIONS``, and ``fused_parts`` lists what each fused
        layer holds; the HF-named layers are gone, so fuse after loading a checkpoint and never
        before training.
        """
        for i in range(len(self.model.layers)):
            prefix = f"model.layers.{i}."
            for fused_name, parts in FUSED_PROJECTIONS.items():
                self.fused_parts[prefix + fused_name] = fuse_linears_(
                    self, prefix + fused_name, [prefix + part for part in parts])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def kv_cache_shape(self, num_slots: int) -> tuple[int, int, int]:
        """Shape of one layer's K (or V) cache: (n_kv_heads, num_slots, head_dim), head-major."""
        return self.config.num_key_value_heads, num_slots, self.config.head_dim
