"""The evaluation's report for people who would rather look than read: ``report.json`` (every
number with its 95% interval and ``n``), ``report.png`` (bar charts: Q&A shares per model, and
each model's win rate against the others), ``report.html`` (the chart inlined and the tables;
one self-contained file), and a per-round chart for ``iterate``.

matplotlib (Agg backend) is imported on first use only.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _err(entry: dict) -> tuple[float, float]:
    return entry["value"] - entry["low"], entry["high"] - entry["value"]


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.png`` and ``report.html`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "png": out_dir / "report.png",
             "html": out_dir / "report.html"}
    paths["json"].write_text(json.dumps(report, indent=2))
    chart(report, paths["png"])
    paths["html"].write_text(html_report(report, paths["png"].read_bytes()), encoding="utf-8")
    return paths


def chart(report: dict, path: Path) -> Path:
    """Left: share of summaries with >= 3 and >= 4 correct answers per model; right: each
    model's win rate against every other (0.5 = even). Error bars are the 95% intervals."""
    plt = _pyplot()
    models = list(report["models"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    try:
        width = 0.38
        for offset, key, label in ((-width / 2, "share_ge3", ">= 3 correct"),
                                   (width / 2, "share_ge4", ">= 4 correct")):
            entries = [report["models"][m][key] for m in models]
            left.bar([i + offset for i in range(len(models))], [e["value"] for e in entries],
                     width, yerr=list(zip(*map(_err, entries))), capsize=3, label=label)
        left.set_xticks(range(len(models)), [_short(m) for m in models], rotation=15)
        left.set_ylim(0, 1)
        n = report["models"][models[0]]["share_ge3"]["n"]
        left.set_title(f"Q&A accuracy of summaries (n={n} articles)")
        left.legend()
        pairs = [(a, b) for a in models for b in models if a != b and models.index(a) >
                 models.index(b)] or [(a, b) for a in models for b in models if a != b]
        entries = [report["win_rate"][a][b] for a, b in pairs]
        right.barh(range(len(pairs)), [e["value"] for e in entries],
                   xerr=list(zip(*map(_err, entries))), capsize=3, color="tab:green")
        right.axvline(0.5, linestyle="--", color="gray")
        right.set_yticks(range(len(pairs)), [f"{_short(a)}\nvs {_short(b)}" for a, b in pairs])
        right.set_xlim(0, 1)
        right.set_title("win rate (P(win) + 0.5 P(tie))")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[:12] + "..." + name[-13:]


def _fmt(entry: dict) -> str:
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}] (n={entry['n']})"


def html_report(report: dict, png: bytes) -> str:
    """One self-contained HTML page: the chart (inlined PNG) and the two tables."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(m)}</td>" + "".join(f"<td>{_fmt(v[k])}</td>" for k in (
            "share_ge3", "share_ge4", "mean_score", "compression", "mean_words")) + "</tr>"
        for m, v in report["models"].items())
    models = list(report["models"])
    matrix = "".join(
        f"<tr><th>{esc(a)}</th>" + "".join(
            "<td>-</td>" if a == b else f"<td>{_fmt(report['win_rate'][a][b])}</td>"
            for b in models) + "</tr>" for a in models)
    image = base64.b64encode(png).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lmforge preference evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}</style></head><body>
<h1>Preference evaluation</h1>
<p>Judge: {esc(str(report.get('judge')))}; {report['num_questions']} questions per article;
values are estimates with 95% intervals and the number of articles they rest on.</p>
<img alt="chart" src="data:image/png;base64,{image}">
<h2>Per model</h2><table><tr><th>model</th><th>share &ge; 3 correct</th><th>share &ge; 4
correct</th><th>mean score</th><th>compression</th><th>words</th></tr>{rows}</table>
<h2>Win rate of the row model against the column model</h2>
<table><tr><th></th>{''.join(f'<th>{esc(m)}</th>' for m in models)}</tr>{matrix}</table>
</body></html>
"""


def rounds_chart(rounds: list[dict], path: Path) -> Path:
    """``iterate``'s chart: share >= 3 correct, and the win rate against the base model, per
    round (round 0 = the base), with 95% intervals."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        xs = [r["round"] for r in rounds]
        for key, label in (("share_ge3", "share >= 3 correct"),
                           ("win_rate_vs_base", "win rate vs base")):
            entries = [r[key] for r in rounds]
            ax.errorbar(xs, [e["value"] for e in entries], yerr=list(zip(*map(_err, entries))),
                        marker="o", capsize=3, label=label)
        ax.axhline(0.5, linestyle=":", color="gray")
        ax.set_xticks(xs)
        ax.set_xlabel("DPO round")
        ax.set_ylim(0, 1)
        ax.set_title("Iterative DPO")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
