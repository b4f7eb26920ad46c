"""Two LoRA adapters, one after the other: folding one into the weights, and writing two as one.

Training on a fine-tuned model (OpenAI's SFT, then DPO on the ``ft:`` model) needs both:

- ``merge_adapter_(model, directory)`` adds an adapter's update into the linears it targets,
  ``W <- W + scaling * B @ A`` (PEFT's ``merge_and_unload``), so the model *is* the fine-tuned
  model: the frozen reference of a DPO run on it, and the base its new adapter trains on.
- ``stack_adapters(first, second, target)`` writes the adapter whose update is the sum of both,
  ``s1 B1 A1 + s2 B2 A2 = [s1 B1, s2 B2] @ [A1; A2]``: rank ``r1 + r2``, ``lora_alpha = r1 + r2``
  (scaling 1), a module that only one of them targets getting zeros in the other's block. The
  serving engine applies one adapter per request to the base, so this is what it serves: exactly
  the base with both applied, as the training saw it.

``export_adapter`` writes what a training checkpoint serves as: its adapter alone, or stacked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from lmforge.models.lora import (
    CONFIG_FILE,
    PEFT_PREFIX,
    WEIGHTS_FILE,
    LoRAConfig,
    adapter_pairs,
    load_peft_adapter,
    write_peft_adapter,
)


@torch.no_grad()
def merge_adapter_(model: nn.Module, directory: str) -> LoRAConfig:
    """Fold the PEFT adapter in ``directory`` into ``model``'s linears, in place; returns its
    config. ``model``: the unfused, HF-named model (``load_model(for_training=True)``), before
    ``inject_lora``.

    Raises:
        ModelLoadError: an unreadable adapter (``load_peft_adapter``).
        ValueError: a module the adapter names is not a linear of ``model``, or its shape
            differs.
    """
    config, weights = load_peft_adapter(directory)
    modules = dict(model.named_modules())
    for name, (a, b) in adapter_pairs(weights, directory).items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear) or linear.weight.shape != (b.shape[0], a.shape[1]):
            raise ValueError(f"adapter {directory}: {name} is not a linear of this model with "
                             f"shape {(b.shape[0], a.shape[1])}")
        update = (b.float() @ a.float()) * config.scaling
        linear.weight += update.to(linear.weight.dtype)
    return config


def stack_adapters(first: str, second: str, target: str, base_model_name_or_path: str) -> None:
    """Write to ``target`` (PEFT files) the adapter equal to ``first`` then ``second`` applied
    together (module docstring). Both must be adapters of the same base model.

    Raises:
        ModelLoadError: an unreadable adapter.
        ValueError: the two disagree on a module's input or output size.
    """
    (c1, w1), (c2, w2) = load_peft_adapter(first), load_peft_adapter(second)
    p1, p2 = adapter_pairs(w1, first), adapter_pairs(w2, second)
    weights = {}
    for name in sorted(set(p1) | set(p2)):
        a1, b1 = p1.get(name) or _zeros(p2[name], c1.r)
        a2, b2 = p2.get(name) or _zeros(p1[name], c2.r)
        if a1.shape[1] != a2.shape[1] or b1.shape[0] != b2.shape[0]:
            raise ValueError(f"{first} and {second} disagree on the shape of {name}")
        weights[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.cat([a1, a2]).float()
        weights[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.cat(
            [b1.float() * c1.scaling, b2.float() * c2.scaling], dim=1)
    rank = c1.r + c2.r
    config = LoRAConfig(r=rank, lora_alpha=rank, target_modules=tuple(
        dict.fromkeys(c1.target_modules + c2.target_modules)),
        fan_in_fan_out=c1.fan_in_fan_out)
    write_peft_adapter(weights, config, target, base_model_name_or_path)


def _zeros(pair: tuple[torch.Tensor, torch.Tensor], rank: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero block of ``rank`` for a module the other adapter targets alone."""
    a, b = pair
    return a.new_zeros(rank, a.shape[1]), b.new_zeros(b.shape[0], rank)


def export_adapter(checkpoint: str | Path, target: str | Path,
                   base_adapter: str | Path | None = None) -> None:
    """Write the PEFT adapter of a training ``checkpoint`` directory to ``target`` (its two
    PEFT files only: a trainer's resume state stays behind), through a temporary sibling that
    is then renamed (never partial). With ``base_adapter`` (the run trained on top of that
    adapter) the two are stacked into one adapter of the base (``stack_adapters``)."""
    checkpoint, target = Path(checkpoint), Path(target)
    if base_adapter is not None:
        base_name = json.loads((checkpoint / CONFIG_FILE).read_text()).get(
            "base_model_name_or_path", "")
        stack_adapters(str(base_adapter), str(checkpoint), str(target), base_name)
        return
    temp = target.with_name(target.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy2(checkpoint / name, temp / name)
    shutil.rmtree(target, ignore_errors=True)
    temp.rename(target)
