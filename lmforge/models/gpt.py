"""The GPT family: GPT-1 (Radford et al. 2018, "Improving Language Understanding by Generative
Pre-Training") and GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners"), as Hugging Face's ``modeling_openai.py`` and ``modeling_gpt2.py`` compute them.

Decoder blocks of multi-head attention and a 4x MLP with learned absolute position embeddings
(no rotary), LayerNorm, biases everywhere, and an LM head tied to the token embedding. GPT-1 puts
the LayerNorm after each residual add (post-norm) and has no final norm; GPT-2 moves it in front
of each sublayer (pre-norm) and adds ``ln_f``. Module names equal the Hugging Face checkpoint
names (``transformer.h.0.attn.c_attn``), so loading is a name table and PEFT adapters (targets
``c_attn``, ``c_proj``, ``c_fc``) interoperate.

As ``models/llama.py``, the model runs over a flat batch of T tokens from many requests and the
paged KV cache (``lmforge.models.attention``); a token's position comes from the engine's
``positions`` (T,), never from its row. It knows nothing of LoRA, packing or quantization: those
swap its linears from outside by name.

HF stores GPT's projections as ``Conv1D`` with (in, out) weights; ours are ``nn.Linear`` with
(out, in) weights: ``models/gpt_hf.py`` converts checkpoints both ways.

Training (``lmforge pretrain``) uses the same classes: ``GPTConfig.dropout`` adds HF's embedding
and residual dropout (``embd_pdrop``, ``resid_pdrop``; attention probabilities are never dropped,
``attn_pdrop`` 0) and ``init_weights_`` is GPT-2's initialization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.attention import AttentionMetadata, paged_attention, write_kv
from lmforge.models.layers import embedding

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (n_head, num_slots, head_dim)

# HF ``ACT2FN`` names -> functions. ``gelu_new`` is the tanh approximation both GPTs were trained
# with; ``gelu`` is the exact erf form (GPT-1's ``afn: gelu`` is gelu_new: gpt_hf.gpt_config_from_hf)
ACTIVATIONS = {"gelu_new": partial(F.gelu, approximate="tanh"),
               "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
               "gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu}

@dataclass
class GPTConfig:
    """The hyperparameters of a GPT-1 / GPT-2 checkpoint (HF GPT-2 ``config.json`` names).

    The engine reads every model's config by Llama's names (``num_hidden_layers``,
    ``head_dim``...); the properties below give them, as HF's ``attribute_map`` does.
    """

    vocab_size: int
    n_positions: int  # learned positions: the longest context
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int | None = None  # MLP width; None = 4 * n_embd (always, for GPT-1)
    activation_function: str = "gelu_new"  # a key of ACTIVATIONS
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True  # scores / sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # and / (layer index + 1) (GPT-2 option)
    tie_word_embeddings: bool = True
    architecture: str = "gpt2"  # "gpt2" (pre-norm, ln_f) or "openai-gpt" (post-norm)
    # training only: embedding and residual dropout probability (HF's embd_pdrop, resid_pdrop).
    # Checkpoints load with 0 whatever their config says: serving never drops
    dropout: float = 0.0
    initializer_range: float = 0.02  # std of the normal init (``init_weights_``)

    @property
    def pre_norm(self) -> bool:
        return self.architecture == "gpt2"

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def intermediate_size(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head  # plain multi-head attention: one KV head per query head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions


def _dropout(cfg: GPTConfig) -> nn.Module:
    return nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()


class GPTAttention(nn.Module):
    """Causal multi-head attention over the paged KV cache; q|k|v come out of one ``c_attn``."""

    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.scale = self.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = _dropout(cfg)

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
                ) -> torch.Tensor:
        t, h, d = x.shape[0], self.n_head, self.head_dim
        qkv = self.c_attn(x).view(t, 3 * h, d)  # (T, 3H, D): HF splits q | k | v, then heads
        q, k, v = qkv.split(h, dim=1)  # (T, H, D) each
        k_cache, v_cache = kv_cache
        write_kv(k_cache, meta.slot_mapping, k)
        write_kv(v_cache, meta.slot_mapping, v)
        o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)  # (T, H, D)
        return self.resid_dropout(self.c_proj(o.reshape(t, h * d)))


class GPTMLP(nn.Module):
    """``c_proj(act(c_fc(x)))``: (T, n_embd) -> (T, n_embd) through (T, intermediate_size)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation_function]
        self.dropout = _dropout(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPTBlock(nn.Module):
    """One decoder block: pre-norm for GPT-2, post-norm for GPT-1 (same modules, same names)."""

    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = GPTAttention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = GPTMLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
                ) -> torch.Tensor:
        if self.pre_norm:  # GPT-2: x + f(LN(x))
            x = x + self.attn(self.ln_1(x), kv_cache, meta)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, kv_cache, meta))  # GPT-1: LN(x + f(x))
        return self.ln_2(x + self.mlp(x))


class GPT2Model(nn.Module):
    """GPT-2's trunk: ``wte(ids) + wpe(positions)``, the blocks, the final ``ln_f``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte = embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = embedding(cfg.n_positions, cfg.n_embd)
        self.drop = _dropout(cfg)
        self.h = nn.ModuleList(GPTBlock(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def forward(self, input_ids, positions, kv_caches, meta):
        x = self.drop(self.wte(input_ids) + self.wpe(positions))  # (T, n_embd)
        for block, kv_cache in zip(self.h, kv_caches):
            x = block(x, kv_cache, meta)
        return self.ln_f(x)


class OpenAIGPTModel(nn.Module):
    """GPT-1's trunk: ``tokens_embed(ids) + positions_embed(positions)``, the blocks, no final
    norm (each post-norm block already ends in one)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tokens_embed = embedding(cfg.vocab_size, cfg.n_embd)
        self.positions_embed = embedding(cfg.n_positions, cfg.n_embd)
        self.drop = _dropout(cfg)
        self.h = nn.ModuleList(GPTBlock(cfg, i) for i in range(cfg.n_layer))

    def forward(self, input_ids, positions, kv_caches, meta):
        x = self.drop(self.tokens_embed(input_ids) + self.positions_embed(positions))  # (T, n_embd)
        for block, kv_cache in zip(self.h, kv_caches):
            x = block(x, kv_cache, meta)
        return x


class GPTLMHeadModel(nn.Module):
    """GPT-1 or GPT-2 (``cfg.architecture``) over the paged KV cache, the engine's model interface.

    ``forward(input_ids (T,), positions (T,), kv_caches, meta) -> hidden (T, n_embd)``, HF's
    ``last_hidden_state`` (after ``ln_f`` for GPT-2); ``compute_logits(hidden (N, n_embd)) ->
    (N, vocab)`` float32. Positions index the learned table, so they must be < ``n_positions``
    (the engine caps ``max_model_len`` there).
    """

    # HF's checkpoint stores Conv1D layers, so PEFT marks adapters for it ``fan_in_fan_out``; the
    # LoRA A (r, in) and B (out, r) are shaped as for a Linear either way (peft's lora.Linear)
    fan_in_fan_out = True
    # LoRA's targets when a fine-tuning job names none: every linear of a block (as QLoRA)
    default_lora_targets = ("c_attn", "c_proj", "c_fc")

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Model(cfg) if cfg.pre_norm else OpenAIGPTModel(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.get_input_embeddings().weight
        # no fusion: c_attn already holds q|k|v, and adapters target it as one layer (as PEFT)
        self.fused_parts: dict[str, list[tuple[str, int]]] = {}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        return self.transformer(input_ids, positions, kv_caches, meta)

    def get_input_embeddings(self) -> nn.Embedding:
        t = self.transformer
        return t.wte if isinstance(t, GPT2Model) else t.tokens_embed

    @torch.no_grad()
    def init_weights_(self) -> None:
        """GPT-2's initialization (HF's ``GPT2PreTrainedModel._init_weights``): linear and
        embedding weights ~ N(0, initializer_range), biases 0, LayerNorms (1, 0), and every
        ``c_proj`` (the layers that add into the residual stream) ~ N(0, initializer_range /
        sqrt(2 * n_layer)) (Radford et al. 2019, sec. 2.3). Uses torch's global RNG."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scaled = name.endswith("c_proj")
                module.weight.normal_(0.0, std / math.sqrt(2 * self.config.n_layer) if scaled
                                      else std)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)

    def fuse_projections_(self) -> None:
        """Nothing to fuse (``c_attn`` is q|k|v already); the loader calls it for every family."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def kv_cache_shape(self, num_slots: int) -> tuple[int, int, int]:
        """Shape of one layer's K (or V) cache: (n_head, num_slots, head_dim), head-major."""
        return self.config.n_head, num_slots, self.config.head_dim
