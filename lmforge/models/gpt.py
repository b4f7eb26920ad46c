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
(out, in) weights, so ``gpt_state_dict_from_hf`` transposes them once at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ModelLoadError
from lmforge.models.attention import AttentionMetadata, paged_attention, write_kv

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (n_head, num_slots, head_dim)

# HF ``architectures`` entry -> our architecture name (HF's ``model_type``)
GPT_ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "OpenAIGPTLMHeadModel": "openai-gpt"}

# HF ``ACT2FN`` names -> functions. ``gelu_new`` is the tanh approximation both GPTs were trained
# with; ``gelu`` is the exact erf form (GPT-1's ``afn: gelu`` means gelu_new, see gpt_config_from_hf)
ACTIVATIONS = {"gelu_new": partial(F.gelu, approximate="tanh"),
               "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
               "gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu}

# the Conv1D layers of a block: their HF weights are (in, out), transposed at load
CONV1D_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# GGUF tensor name (llama.cpp's convert_hf_to_gguf.py, GPT2Model) -> ours ("{i}": block index).
# llama.cpp already stores the Conv1D weights transposed, as (out, in): nothing to undo here
GGUF_NAMES = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",  # absent from newer conversions: the head is tied
    "blk.{i}.attn_norm": "transformer.h.{i}.ln_1",
    "blk.{i}.attn_qkv": "transformer.h.{i}.attn.c_attn",
    "blk.{i}.attn_output": "transformer.h.{i}.attn.c_proj",
    "blk.{i}.ffn_norm": "transformer.h.{i}.ln_2",
    "blk.{i}.ffn_up": "transformer.h.{i}.mlp.c_fc",
    "blk.{i}.ffn_down": "transformer.h.{i}.mlp.c_proj",
}


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

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
                ) -> torch.Tensor:
        t, h, d = x.shape[0], self.n_head, self.head_dim
        qkv = self.c_attn(x).view(t, 3 * h, d)  # (T, 3H, D): HF splits q | k | v, then heads
        q, k, v = qkv.split(h, dim=1)  # (T, H, D) each
        k_cache, v_cache = kv_cache
        write_kv(k_cache, meta.slot_mapping, k)
        write_kv(v_cache, meta.slot_mapping, v)
        o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)  # (T, H, D)
        return self.c_proj(o.reshape(t, h * d))


class GPTMLP(nn.Module):
    """``c_proj(act(c_fc(x)))``: (T, n_embd) -> (T, n_embd) through (T, intermediate_size)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


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
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(GPTBlock(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def forward(self, input_ids, positions, kv_caches, meta):
        x = self.wte(input_ids) + self.wpe(positions)  # (T, n_embd)
        for block, kv_cache in zip(self.h, kv_caches):
            x = block(x, kv_cache, meta)
        return self.ln_f(x)


class OpenAIGPTModel(nn.Module):
    """GPT-1's trunk: ``tokens_embed(ids) + positions_embed(positions)``, the blocks, no final
    norm (each post-norm block already ends in one)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tokens_embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.positions_embed = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(GPTBlock(cfg, i) for i in range(cfg.n_layer))

    def forward(self, input_ids, positions, kv_caches, meta):
        x = self.tokens_embed(input_ids) + self.positions_embed(positions)  # (T, n_embd)
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

    def fuse_projections_(self) -> None:
        """Nothing to fuse (``c_attn`` is q|k|v already); the loader calls it for every family."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def kv_cache_shape(self, num_slots: int) -> tuple[int, int, int]:
        """Shape of one layer's K (or V) cache: (n_head, num_slots, head_dim), head-major."""
        return self.config.n_head, num_slots, self.config.head_dim


# --- loading Hugging Face checkpoints -------------------------------------------------------

def gpt_config_from_hf(hf: dict, architecture: str) -> GPTConfig:
    """GPTConfig from an HF ``config.json`` dict of a GPT-2 or OpenAI GPT (GPT-1) checkpoint.

    Raises:
        ModelLoadError: an activation outside ``ACTIVATIONS``, or cross-attention layers.
    """
    if architecture == "openai-gpt":
        afn = hf.get("afn", "gelu")
        # modeling_openai.ACT_FNS maps "gelu" to gelu_new (the tanh form GPT-1 was trained with)
        activation = "gelu_new" if afn == "gelu" else afn
        n_inner = None  # GPT-1's MLP is always 4 * n_embd
    else:
        activation, n_inner = hf.get("activation_function", "gelu_new"), hf.get("n_inner")
    if activation not in ACTIVATIONS:
        raise ModelLoadError(f"activation {activation!r} of this {architecture} checkpoint is not "
                             f"supported; supported: {', '.join(ACTIVATIONS)}")
    if hf.get("add_cross_attention"):
        raise ModelLoadError("GPT-2 checkpoints with cross-attention (add_cross_attention) are "
                             "encoder-decoder parts, not causal LMs; use a plain GPT2LMHeadModel")
    return GPTConfig(
        vocab_size=hf["vocab_size"], n_positions=hf.get("n_positions", 1024),
        n_embd=hf["n_embd"], n_layer=hf["n_layer"], n_head=hf["n_head"], n_inner=n_inner,
        activation_function=activation,
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        scale_attn_weights=hf.get("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", True), architecture=architecture)


def gpt_state_dict_from_hf(state_dict: dict[str, torch.Tensor], config: GPTConfig
                           ) -> dict[str, torch.Tensor]:
    """HF GPT weights -> ours: Conv1D (in, out) weights transposed to nn.Linear's (out, in).

    Also accepts the original checkpoints saved from the trunk alone (``h.0.attn.c_attn.weight``,
    no ``transformer.`` prefix), and drops what is not a weight: the causal-mask buffers
    ``attn.bias`` / ``attn.masked_bias`` that old GPT-2 files carry, and a tied ``lm_head``.
    """
    out = {}
    for name, w in state_dict.items():
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith(tuple(f"{layer}.weight" for layer in CONV1D_LAYERS)):
            w = w.t().contiguous()  # Conv1D (in, out) -> Linear (out, in)
        out[name] = w
    return out


def gpt_config_from_gguf(field, tensor_names: set[str]) -> GPTConfig:
    """GPTConfig of a ``general.architecture = gpt2`` GGUF (llama.cpp's converter writes GPT-2's
    hyperparameters as ``gpt2.*`` keys; the activation is gelu_new, the only one it converts).

    Args:
        field: ``field(key, default)`` -> a metadata value of the file.
        tensor_names: the file's tensor names; an ``output.weight`` means an untied head.
    """
    return GPTConfig(
        vocab_size=field("gpt2.vocab_size") or len(field("tokenizer.ggml.tokens")),
        n_positions=field("gpt2.context_length", 1024), n_embd=field("gpt2.embedding_length"),
        n_layer=field("gpt2.block_count"), n_head=field("gpt2.attention.head_count"),
        n_inner=field("gpt2.feed_forward_length"),
        layer_norm_epsilon=field("gpt2.attention.layer_norm_epsilon", 1e-5),
        tie_word_embeddings="output.weight" not in tensor_names, architecture="gpt2")
