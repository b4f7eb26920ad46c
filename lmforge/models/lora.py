"""LoRA: low-rank adapters for training, the PEFT file format, and many adapters in one batch.

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes a linear layer ``W`` and learns a low-rank update:
``y = W x + (B A x) * scaling`` with ``A``: (r, in), ``B``: (out, r), ``scaling = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA). The names, initialization and file layout follow PEFT's
``LoraLayer`` / ``LoraConfig``, so an adapter saved here loads with ``PeftModel.from_pretrained``
on the Hugging Face model, and one saved by PEFT loads here.

Two parts here (serving many adapters in one batch is ``models/multi_lora.py``):

- training: ``LoRAConfig``, ``LoRALinear``, ``inject_lora`` (on the unfused HF-named model),
  ``lora_state_dict``;
- the PEFT format: ``save_peft_adapter`` / ``load_peft_adapter``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.errors import ModelLoadError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model
# PEFT target names (a module's last name): Llama's projections, then GPT's (c_proj is both the
# attention output and the MLP's down projection, as in PEFT)
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj", "c_attn", "c_proj", "c_fc")


@dataclass
class LoRAConfig:
    """The PEFT ``LoraConfig`` fields lmforge uses (same names and meaning).

    ``use_rslora``: rank-stabilized scaling ``lora_alpha / sqrt(r)`` (Kalajdzievski 2023,
    arXiv:2312.03732) instead of ``lora_alpha / r``. ``fan_in_fan_out``: the HF base layers are
    ``Conv1D`` with (in, out) weights (GPT-1/2); it changes only how PEFT merges the update, as
    ``lora_A`` (r, in) and ``lora_B`` (out, r) are shaped the same either way.
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # None = the model family's ``default_lora_targets`` (every linear of a block: Llama's seven
    # projections, GPT's c_attn, c_proj, c_fc), filled in by ``inject_lora``
    target_modules: tuple[str, ...] | None = None
    use_rslora: bool = False
    fan_in_fan_out: bool = False

    @property
    def scaling(self) -> float:
        """The factor on ``B A x``: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def validate(self) -> None:
        """Raises ValueError naming the field and the fix."""
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r ({self.r!r}) must be a positive integer, e.g. 8")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha ({self.lora_alpha}) must be positive, e.g. 2 * r")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout ({self.lora_dropout}) must be in [0, 1), e.g. 0.05")
        if self.target_modules is None:  # the model's default, resolved by inject_lora
            return
        self.target_modules = tuple(self.target_modules)
        bad = [t for t in self.target_modules if t not in SUPPORTED_TARGETS]
        if not self.target_modules or bad:
            raise ValueError(f"target_modules {list(self.target_modules)} must be a non-empty "
                             f"subset of {list(SUPPORTED_TARGETS)}; unsupported: {bad}")


# --- training: one adapter on the unfused model --------------------------------------------

class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update, PEFT's ``lora.Linear`` math.

    ``forward(x (..., in)) -> (..., out) = base(x) + lora_B(lora_A(dropout(x))) * scaling``.
    ``lora_A``: Linear(in, r), Kaiming-uniform (a = sqrt(5), as ``nn.Linear`` and PEFT);
    ``lora_B``: Linear(r, out), zero, so a fresh adapter leaves the outputs unchanged.
    """

    def __init__(self, base: nn.Linear, config: LoRAConfig):
        super().__init__()
        self.base = base
        self.scaling = config.scaling
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, config.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(config.r, base.out_features, bias=False, device=device,
                                dtype=dtype)
        self.lora_dropout = (nn.Dropout(config.lora_dropout) if config.lora_dropout > 0
                             else nn.Identity())
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.enabled = True  # False: the base layer alone (``lora_disabled``)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base: every ``LoRALinear`` computes its base layer alone inside the
    block (PEFT's ``disable_adapter``). DPO's reference model is the policy with its adapter
    off, so no second copy of the weights is needed."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every ``nn.Linear`` whose attribute name is in ``config.target_modules`` in a
    ``LoRALinear``, in place, and freeze every other parameter.

    Works on the unfused model (HF names, ``model.layers.0.self_attn.q_proj``): call it before
    ``fuse_projections_``, never after. ``config.target_modules`` None becomes the model's
    ``default_lora_targets`` (written back into ``config``).

    Returns:
        the replaced modules' names, in model order.

    Raises:
        ValueError: an invalid config, or no module matches ``target_modules``.
    """
    if config.target_modules is None:
        config.target_modules = tuple(model.default_lora_targets)
    config.validate()
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.rpartition(".")[2] in
               config.target_modules]
    if not targets:
        raise ValueError(f"no nn.Linear named one of {list(config.target_modules)} in the model; "
                         "inject LoRA before fuse_projections_ (the fused model has qkv_proj)")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, LoRALinear(module, config))
    return [name for name, _ in targets]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of a model under PEFT's key names.

    ``base_model.model.<module name>.lora_A.weight`` (r, in) and ``....lora_B.weight`` (out, r),
    detached (the tensors share storage with the model).
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return out


def load_lora_state_dict_(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-named LoRA weights (``lora_state_dict``'s keys) into an ``inject_lora``'d model.

    Raises:
        ValueError: a key names no LoRA module of the model, or a shape differs.
    """
    params = {f"{PEFT_PREFIX}{name}": p for name, p in model.named_parameters()}
    with torch.no_grad():
        for key, value in state_dict.items():
            param = params.get(key)
            if param is None or param.shape != value.shape:
                raise ValueError(f"LoRA weight {key} {tuple(value.shape)} does not fit the model "
                                 "(inject_lora with the adapter's config first)")
            param.copy_(value)


# --- the PEFT format -------------------------------------------------------------------------

def save_peft_adapter(model: nn.Module, config: LoRAConfig, directory: str | Path,
                      base_model_name_or_path: str) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT's ``save_pretrained``.

    ``fan_in_fan_out`` is written as the model says (its class attribute ``fan_in_fan_out``,
    True for GPT, whose HF layers are Conv1D), so PEFT reads the file without a warning.

    Written into a temporary sibling directory that is then renamed onto ``directory`` (an
    existing adapter there is replaced), so a reader never sees half an adapter.
    """
    config = dataclasses.replace(
        config, fan_in_fan_out=bool(getattr(model, "fan_in_fan_out", False)))
    write_peft_adapter(lora_state_dict(model), config, directory, base_model_name_or_path)


def write_peft_adapter(weights: dict[str, torch.Tensor], config: LoRAConfig,
                       directory: str | Path, base_model_name_or_path: str) -> None:
    """``save_peft_adapter`` from PEFT-named weights (``lora_state_dict``'s keys) and their
    config, written the same way (a temporary sibling renamed onto ``directory``)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config_dict(config,
                                                                    base_model_name_or_path),
                                                  indent=2, sort_keys=True))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def peft_config_dict(config: LoRAConfig, base_model_name_or_path: str) -> dict:
    """``adapter_config.json`` content for ``config`` (the fields PEFT's LoraConfig reads)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r,
        "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "target_modules": sorted(config.target_modules), "bias": "none",
        "use_rslora": config.use_rslora, "use_dora": False,
        "fan_in_fan_out": config.fan_in_fan_out,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
    }


def read_peft_config(directory: str | Path) -> LoRAConfig:
    """The ``LoRAConfig`` of an adapter directory, refusing options lmforge does not apply.

    Raises:
        ModelLoadError: no directory / config, invalid JSON, not a LoRA adapter, or an
            unsupported option (DoRA, trained biases, per-module rank/alpha patterns,
            ``modules_to_save``, LoRA bias), naming the fix.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ModelLoadError(f"{directory} has no {CONFIG_FILE}: pass a PEFT LoRA adapter "
                             f"directory ({CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
    if raw.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"{directory} holds a {raw.get('peft_type')} adapter; only LoRA "
                             "adapters (peft_type LORA) are supported")
    unsupported = {"use_dora": bool(raw.get("use_dora")),
                   "bias": raw.get("bias", "none") != "none",
                   "lora_bias": bool(raw.get("lora_bias")),
                   "modules_to_save": bool(raw.get("modules_to_save")),
                   "rank_pattern": bool(raw.get("rank_pattern")),
                   "alpha_pattern": bool(raw.get("alpha_pattern"))}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ModelLoadError(f"adapter {directory} uses {', '.join(bad)}, which lmforge does not "
                             "support; retrain with plain LoRA (use_dora false, bias \"none\", no "
                             "modules_to_save, no rank/alpha patterns)")
    targets = raw.get("target_modules") or ()
    # a regex string selects modules by full name: the weights' keys say which (load_peft_adapter)
    targets = tuple(SUPPORTED_TARGETS) if isinstance(targets, str) else tuple(targets)
    config = LoRAConfig(r=raw.get("r", 8), lora_alpha=raw.get("lora_alpha", 8),
                        lora_dropout=raw.get("lora_dropout", 0.0) or 0.0,
                        target_modules=targets, use_rslora=bool(raw.get("use_rslora")),
                        fan_in_fan_out=bool(raw.get("fan_in_fan_out")))
    try:
        config.validate()
    except ValueError as e:
        raise ModelLoadError(f"adapter {directory}: {e}") from e
    return config


def load_peft_adapter(directory: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Read an adapter that ``save_peft_adapter`` or PEFT's ``save_pretrained`` wrote.

    Returns:
        (config, weights) with PEFT key names (``lora_state_dict``'s), float tensors on the CPU;
        ``config.target_modules`` lists the module names the weights actually cover.

    Raises:
        ModelLoadError: missing or invalid files, unsupported options (``read_peft_config``),
            keys other than ``lora_A`` / ``lora_B`` of Linear modules, A without B, or shapes
            that disagree with the rank.
    """
    from safetensors.torch import load_file

    config = read_peft_config(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ModelLoadError(f"{directory} has no {WEIGHTS_FILE} (adapters saved as .bin are "
                             "not read: re-save with safe_serialization=True)")
    try:
        weights = load_file(path)
    except Exception as e:  # truncated or corrupt safetensors
        raise ModelLoadError(f"could not read {path}: {type(e).__name__}: {e}") from e
    targets = set()
    for module, (a, b) in adapter_pairs(weights, str(directory)).items():
        if a.shape[0] != config.r or b.shape[1] != config.r:
            raise ModelLoadError(f"adapter {directory}: {module} has rank {a.shape[0]}, the "
                                 f"config says r = {config.r}")
        targets.add(module.rpartition(".")[2])
    config.target_modules = tuple(t for t in SUPPORTED_TARGETS if t in targets)
    return config, weights


def adapter_pairs(weights: dict[str, torch.Tensor], where: str
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT-named weights -> {module name: (A (r, in), B (out, r))}; raises ModelLoadError."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        stem = key.removeprefix(PEFT_PREFIX).removesuffix(".weight")
        module, _, kind = stem.rpartition(".")
        if kind not in ("lora_A", "lora_B") or not key.startswith(PEFT_PREFIX) or value.ndim != 2:
            raise ModelLoadError(f"adapter {where}: unsupported tensor {key}; only lora_A / "
                                 "lora_B weights of linear layers are supported")
        found.setdefault(module, {})[kind] = value
    if not found:
        raise ModelLoadError(f"adapter {where} holds no LoRA weights")
    out = {}
    for module, pair in found.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ModelLoadError(f"adapter {where}: {module} has only {list(pair)}")
        out[module] = (pair["lora_A"], pair["lora_B"])
    return out
