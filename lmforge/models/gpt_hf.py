"""GPT-1 / GPT-2 checkpoints <-> ``models/gpt.py``: Hugging Face directories both ways, GGUF in.

Reading: ``gpt_config_from_hf`` / ``gpt_state_dict_from_hf`` take ``config.json`` and the
weights of a ``GPT2LMHeadModel`` or ``OpenAIGPTLMHeadModel`` (``modeling_gpt2.py``,
``modeling_openai.py``); ``gpt_config_from_gguf`` reads a ``general.architecture = gpt2`` GGUF
(llama.cpp's ``convert_hf_to_gguf.py``, names in ``GGUF_NAMES``). Writing:
``save_gpt_pretrained`` writes the directory ``transformers.AutoModelForCausalLM.from_pretrained``
loads (``config.json`` with ``architectures``, ``model.safetensors``, ``generation_config.json``),
which is what ``lmforge pretrain`` produces.

HF stores the projections as ``Conv1D`` with (in, out) weights, ours are ``nn.Linear`` (out, in):
the four ``CONV1D_LAYERS`` are transposed on the way in and on the way out.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.errors import ModelLoadError
from lmforge.models.gpt import ACTIVATIONS, GPTConfig, GPTLMHeadModel

# HF ``architectures`` entry -> our architecture name (HF's ``model_type``)
GPT_ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "OpenAIGPTLMHeadModel": "openai-gpt"}
HF_CLASSES = {name: cls for cls, name in GPT_ARCHITECTURES.items()}  # and back

# the Conv1D layers of a block: their HF weights are (in, out)
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


def _is_conv1d(name: str) -> bool:
    return name.endswith(tuple(f"{layer}.weight" for layer in CONV1D_LAYERS))


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
        if _is_conv1d(name):
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


# --- writing Hugging Face checkpoints --------------------------------------------------------

# our activation -> GPT-1's ``afn`` (modeling_openai.ACT_FNS, where "gelu" is the tanh form)
OPENAI_AFN = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu", "silu": "silu"}


def gpt_config_to_hf(config: GPTConfig, *, bos_token_id: int | None = None,
                     eos_token_id: int | None = None) -> dict:
    """The ``config.json`` dict of ``config`` (``GPT2Config`` or ``OpenAIGPTConfig`` keys), with
    ``architectures`` and ``model_type``; ``gpt_config_from_hf`` reads it back to ``config``
    (``dropout`` aside, which loading always sets to 0).

    Raises:
        ModelLoadError: a GPT-1 with an activation HF's GPT-1 cannot express (exact erf gelu).
    """
    arch = config.architecture
    hf = {"architectures": [HF_CLASSES[arch]], "model_type": arch,
          "vocab_size": config.vocab_size, "n_positions": config.n_positions,
          "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
          "layer_norm_epsilon": config.layer_norm_epsilon,
          "initializer_range": config.initializer_range,
          "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": 0.0,
          "tie_word_embeddings": config.tie_word_embeddings, "torch_dtype": "float32"}
    if arch == "openai-gpt":
        if config.activation_function not in OPENAI_AFN:
            raise ModelLoadError(f"GPT-1 checkpoints cannot express the activation "
                                 f"{config.activation_function!r}; use one of "
                                 f"{', '.join(OPENAI_AFN)}")
        hf["afn"] = OPENAI_AFN[config.activation_function]
    else:
        hf.update(n_inner=config.n_inner, activation_function=config.activation_function,
                  scale_attn_weights=config.scale_attn_weights,
                  scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx)
    if bos_token_id is not None:
        hf["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        hf["eos_token_id"] = eos_token_id
    return hf


def gpt_state_dict_to_hf(model: GPTLMHeadModel) -> dict[str, torch.Tensor]:
    """The model's weights under HF names and layouts: ``CONV1D_LAYERS`` transposed to (in, out),
    a tied ``lm_head`` left out (HF ties it again at load); contiguous CPU copies."""
    out = {}
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        w = w.detach().to("cpu")
        out[name] = (w.t() if _is_conv1d(name) else w).contiguous().clone()
    return out


def save_gpt_pretrained(model: GPTLMHeadModel, out_dir: str | Path, *,
                        bos_token_id: int | None = None,
                        eos_token_id: int | None = None) -> None:
    """Write ``config.json``, ``model.safetensors`` and ``generation_config.json`` to ``out_dir``
    (created): ``AutoModelForCausalLM.from_pretrained(out_dir)`` then computes our logits, and
    ``lmforge serve --model out_dir`` serves it (with tokenizer files beside them).

    Raises:
        ModelLoadError: as ``gpt_config_to_hf``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = gpt_config_to_hf(model.config, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    save_file(gpt_state_dict_to_hf(model), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id") if key in config}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
