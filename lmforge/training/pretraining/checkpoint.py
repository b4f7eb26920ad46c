"""A pretraining run's checkpoints: ``<out>/checkpoints/step-<N>.pt``, written atomically.

One file holds the model's state dict, the optimizer's, and the run state (step, elapsed
seconds, the schedule's horizon; what identifies the run is ``pretrain_run.json``, checked
before). It is written to a temporary name and renamed, so a ``kill -9`` at any moment leaves
either the old checkpoint or the new one, never half of one; the newest ``KEEP`` are kept. The
data order and dropout masks are functions of ``(seed, step)`` (``tokens.TokenStream``), so
nothing else is needed to resume.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
import torch

KEEP = 2  # checkpoints kept (the newest); older ones are deleted after each save
NAME = re.compile(r"^step-(\d+)\.pt$")


@dataclass
class RunState:
    """Where a run is: what a checkpoint stores besides the weights and the optimizer."""

    step: int = 0  # optimizer steps done
    elapsed_s: float = 0.0  # wall-clock seconds spent in the training loop, all invocations
    horizon: int | None = None  # the step the learning-rate schedule ends at, once known
    tokens: int = 0  # training tokens seen


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def save_checkpoint(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: RunState) -> Path:
    """Write ``step-<state.step>.pt`` atomically, delete all but the newest ``KEEP``; its path."""
    directory = checkpoint_dir(out)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{state.step:07d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "state": asdict(state)}, tmp)
    os.replace(tmp, path)
    for old in _checkpoints(directory)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of the run in ``out``, or None."""
    found = _checkpoints(checkpoint_dir(out))
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                    ) -> RunState:
    """Restore ``model`` and ``optimizer`` in place from ``path``; the run state."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(data["model"])
    optimizer.load_state_dict(data["optimizer"])
    return RunState(**data["state"])


def _checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found)]
