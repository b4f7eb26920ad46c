"""Charts of a training run, for people who would rather look than read: loss curves as PNG.

matplotlib (Agg backend, no display needed) is imported on first use only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def loss_chart(rows: Sequence[dict], path: str | Path, *, title: str = "Loss",
               baseline: float | None = None, baseline_label: str = "baseline") -> Path:
    """Plot training loss (``rows`` with ``step`` and ``loss``) and validation loss (rows with
    ``step`` and ``val_loss``) against the optimizer step; a dashed line at ``baseline``.

    Returns:
        ``path``, a PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1, alpha=0.8)
        if valid:
            ax.plot(*zip(*valid), label="validation", marker="o", markersize=3)
        if baseline is not None:
            ax.axhline(baseline, linestyle="--", color="gray", label=baseline_label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Path(path)
