"""GGUF tensors as the model's weights: the Llama and GPT-2 name tables, llama.cpp's Q/K row
permutation undone, and the model config from the GGUF metadata.

Weights come out dequantized (``gguf.quants.dequantize``) and, when asked, also in a quantized
form that the linear layers keep: ``"int4"`` (Q4_0/Q4_1 for PyTorch's bf16 int4 kernel,
``models/quant.py``) or ``"codes"`` (every GGUF block type for lmforge's float32 kernel,
``models/gguf_quant.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmforge.errors import ModelLoadError
from lmforge.models.gguf_file import GGUFFile
from lmforge.models.gguf_quant import SUPPORTED, read_quant
from lmforge.models.gpt import GPTConfig
from lmforge.models.gpt_hf import GGUF_NAMES as GPT_GGUF_NAMES
from lmforge.models.gpt_hf import gpt_config_from_gguf
from lmforge.models.llama import LlamaConfig
from lmforge.models.quant import read_q4_blocks

ModelConfigs = LlamaConfig | GPTConfig  # what a family's config reader returns
GGUF_ARCHITECTURES = ("llama", "qwen2", "gpt2")

# GGUF tensor name -> HF name ("{i}" is the layer index), Llama family; GPT-2's: GPT_GGUF_NAMES
GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}


def gguf_weights(reader: GGUFFile, config: ModelConfigs, *, dense: bool = True,
                 quant: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """(weights, quantized weights), both named as the model's parameters (HF names).

    Args:
        dense: return every tensor dequantized to float32; else only the quantized forms.
        quant: None, ``"int4"`` (Q4_0/Q4_1 projections as ``quant.Q4Weight``) or ``"codes"``
            (projections, LM head and token embedding of any supported block type as
            ``quant_linear.QuantWeight``; their dense weights are then zero-stride placeholders
            of the right shape, as the modules that hold the codes replace them).

    Raises:
        ModelLoadError: for a tensor the name table does not know.
    """
    import gguf

    names = _gguf_name_table(config.num_hidden_layers,
                             GPT_GGUF_NAMES if isinstance(config, GPTConfig) else GGUF_NAMES)
    state_dict: dict[str, torch.Tensor] = {}
    quantized: dict[str, object] = {}
    for t in tqdm(reader.tensors, desc=f"Loading {reader.path.name}", unit="tensor",
                  disable=not dense):
        if t.name == "rope_freqs.weight":
            continue  # consumed by gguf_config
        base, _, suffix = t.name.rpartition(".")
        if base not in names:
            raise ModelLoadError(f"unexpected tensor {t.name} in {reader.path.name}")
        hf_name = f"{names[base]}.{suffix}"
        q = _quantized(t, base, suffix, quant, config)
        if q is not None:
            quantized[hf_name] = q
        if not dense:
            continue
        if q is not None and quant == "codes":
            w = torch.zeros(1).expand(q.shape)  # replaced by the module holding the codes
        elif q is not None and quant == "int4":  # decoded once: the 4-bit weight, dequantized
            w = q.dequantize()
        else:
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            w = _unpermute(w.reshape([int(d) for d in reversed(t.shape)]), base, config)
        state_dict[hf_name] = w.float()
    return state_dict, quantized


def _quantized(t, base: str, suffix: str, quant: str | None, config: ModelConfigs):
    """The tensor ``t`` in the quantized form ``quant`` asks for, rows unpermuted; or None."""
    if quant is None or suffix != "weight":
        return None
    if quant == "int4":
        q = read_q4_blocks(t.data, t.tensor_type.name) if base.startswith("blk.") else None
    else:
        matrix = base in ("output", "token_embd") or (base.startswith("blk.")
                                                          and not base.endswith("norm"))
        q = read_quant(t.data, t.tensor_type.name) if matrix else None
    return None if q is None else q.map_rows(lambda rows: _unpermute(rows, base, config))


def _unpermute(w: torch.Tensor, base: str, config: ModelConfigs) -> torch.Tensor:
    """Llama's Q and K rows back in HF order; any other tensor unchanged."""
    if config.architecture != "llama" or not base.endswith(("attn_q", "attn_k")):
        return w
    return _unpermute_qk(w, config.num_attention_heads if base.endswith("attn_q")
                         else config.num_key_value_heads)


def _gguf_name_table(num_layers: int, names: dict[str, str]) -> dict[str, str]:
    table = {}
    for gguf_name, hf_name in names.items():
        if "{i}" in gguf_name:
            for i in range(num_layers):
                table[gguf_name.format(i=i)] = hf_name.format(i=i)
        else:
            table[gguf_name] = hf_name
    return table


def _unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``convert_hf_to_gguf.permute`` of Q/K rows (interleaved -> rotate-half).

    w: (n_heads * head_dim, ...) -> same shape.
    """
    head_dim = w.shape[0] // n_heads
    return (w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])  # (H, D/2, 2, ...) interleaved
             .transpose(1, 2)  # (H, 2, D/2, ...): halves, as HF's rotate_half expects
             .reshape(w.shape))


def gguf_config(reader: GGUFFile) -> ModelConfigs:
    """The model config from GGUF metadata (``{arch}.block_count`` and friends).

    Raises:
        ModelLoadError: for an architecture other than llama, qwen2 or gpt2.
    """
    def field(key, default=None):
        return reader.fields.get(key, default)

    arch = field("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r}; supported: "
                             f"{', '.join(GGUF_ARCHITECTURES)}")
    tensor_names = {t.name for t in reader.tensors}
    if arch == "gpt2":
        return gpt_config_from_gguf(field, tensor_names)
    heads = field(f"{arch}.attention.head_count")
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    hidden = field(f"{arch}.embedding_length")
    return LlamaConfig(
        vocab_size=field(f"{arch}.vocab_size") or len(field("tokenizer.ggml.tokens")),
        hidden_size=hidden, intermediate_size=field(f"{arch}.feed_forward_length"),
        num_hidden_layers=field(f"{arch}.block_count"), num_attention_heads=heads,
        num_key_value_heads=field(f"{arch}.attention.head_count_kv", heads),
        max_position_embeddings=field(f"{arch}.context_length", 2048),
        head_dim=field(f"{arch}.attention.key_length", hidden // heads),
        rms_norm_eps=field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=field(f"{arch}.rope.freq_base", 10000.0),
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names, architecture=arch,
        rope_freq_factors=rope_freqs.data.tolist() if rope_freqs is not None else None)


def has_quantized_projections(path: Path) -> bool:
    """Whether the GGUF at ``path`` stores any attention or MLP projection in a block type that
    ``gguf_quant.read_quant`` keeps as codes (an F16/F32 file has none); False for a file that
    does not read as a GGUF (loading it then raises the clear error)."""
    try:
        tensors = GGUFFile(path).tensors
    except Exception:  # truncated, foreign, unreadable: the loader's error says which
        return False
    return any(t.tensor_type.name in SUPPORTED for t in tensors
               if t.name.endswith((".attn_q.weight", ".ffn_up.weight", ".ffn_down.weight")))
