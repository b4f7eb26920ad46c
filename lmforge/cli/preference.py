"""``lmforge preference``: synthetic preference data with an LLM judge (``lmforge.preference``)::

    lmforge preference generate --config pipeline.yaml           # questions -> ... -> pairs
    lmforge fine-tune create --method dpo --training RUN/train.jsonl --validation RUN/valid.jsonl
    lmforge preference evaluate --config pipeline.yaml --models smollm2-135m-instruct,ft:...
    lmforge preference iterate --config pipeline.yaml --rounds 2

The judge and the policy are the config's endpoints (any OpenAI-compatible server); a rerun of
any command resumes where the last one stopped.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from lmforge.preference.config import ConfigError, PipelineConfig, load_config
from lmforge.preference.errors import PipelineError
from lmforge.training.corpora import CorpusUnavailableError

_CONFIG = click.option("--config", "config_path", required=True,
                       type=click.Path(exists=True, dir_okay=False, path_type=Path),
                       help="The pipeline's YAML (see lmforge.preference.config).")
_RUN_DIR = click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
                        default=None, help="Write here instead of the config's run_dir.")


def _load(config_path: Path, run_dir: Path | None, **data: object) -> PipelineConfig:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if run_dir is not None:
        config.run_dir = run_dir
    for key, value in data.items():
        if value is not None:
            setattr(config.data, key, value)
    return config


def _run(coroutine) -> object:
    try:
        return asyncio.run(coroutine)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    except (PipelineError, CorpusUnavailableError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def preference() -> None:
    """Synthetic preference data: an LLM judge scores the policy's candidates into DPO pairs."""


@preference.command()
@_CONFIG
@_RUN_DIR
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False),
              default=None, help="A JSONL file of articles instead of the config's corpus.")
@click.option("--text-field", default=None, help="The article's field in --input (article).")
@click.option("--limit", type=int, default=None, help="Articles to make pairs from.")
def generate(config_path: Path, run_dir: Path | None, input_path: str | None,
             text_field: str | None, limit: int | None) -> None:
    """Questions -> candidate summaries -> judge scores -> chosen/rejected pairs."""
    from lmforge.preference.generate import generate as run

    config = _load(config_path, run_dir, input=input_path, text_field=text_field, limit=limit)
    result = _run(run(config))
    pairs = result.report["pairs"]
    table = Table(title=f"preference data in {result.run_dir}")
    for column in ("stage", "requests", "errors", "via", "lines", "seconds"):
        table.add_column(column)
    for name, stage in result.report["stages"].items():
        table.add_row(name, str(stage["requests"]), str(stage["errors"]), stage["via"],
                      str(stage["lines"]), f"{stage['seconds']:.1f}")
    Console().print(table)
    click.echo(f"pairs: {pairs['train']} train ({pairs['train_articles']} articles), "
               f"{pairs['valid']} valid ({pairs['valid_articles']} articles); "
               f"{pairs['articles_without_pairs']} articles gave no pair")
    click.echo(f"next: lmforge fine-tune create --method dpo --training {result.train_file}"
               + (f" --validation {result.valid_file}" if pairs["valid"] else ""))


@preference.command()
@_CONFIG
@_RUN_DIR
@click.option("--models", required=True,
              help="Comma-separated model names: on the policy server, or keys of "
                   "evaluate.models (another endpoint).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The report's directory (default RUN_DIR/eval).")
def evaluate(config_path: Path, run_dir: Path | None, models: str, out: Path | None) -> None:
    """Q&A accuracy, compression and win rates of models on the held-out articles."""
    from lmforge.preference.evaluate import evaluate as run

    config = _load(config_path, run_dir)
    names = [m.strip() for m in models.split(",") if m.strip()]
    report = _run(run(config, names, out))
    table = Table(title=f"evaluation on {report['articles']['scored']} articles")
    for column in ("model", ">= 3 correct", ">= 4 correct", "mean score", "compression"):
        table.add_column(column)
    for name, row in report["models"].items():
        table.add_row(name, *(_cell(row[k]) for k in ("share_ge3", "share_ge4", "mean_score",
                                                       "compression")))
    Console().print(table)
    for a, row in report["win_rate"].items():
        for b, entry in row.items():
            click.echo(f"win rate {a} vs {b}: {_cell(entry)}")
    click.echo(f"report: {(out or config.run_dir / 'eval') / 'report.html'}")


@preference.command()
@_CONFIG
@_RUN_DIR
@click.option("--rounds", type=click.IntRange(1), default=1, show_default=True,
              help="DPO rounds, each on the previous round's model.")
def iterate(config_path: Path, run_dir: Path | None, rounds: int) -> None:
    """Generate with the current policy, train DPO on it, serve, evaluate; repeat."""
    from lmforge.preference.iterate import iterate as run

    config = _load(config_path, run_dir)
    table_rows = _run(run(config, rounds))
    table = Table(title="iterative DPO")
    for column in ("round", "model", "pairs", ">= 3 correct", "win rate vs base"):
        table.add_column(column)
    for row in table_rows:
        table.add_row(str(row["round"]), row["model"], str(row.get("pairs") or "-"),
                      _cell(row["share_ge3"]), _cell(row["win_rate_vs_base"]))
    Console().print(table)
    click.echo(f"chart: {config.run_dir / 'rounds.png'}; rounds: "
               f"{json.dumps([r['model'] for r in table_rows])}")


def _cell(entry: dict) -> str:
    return f"{entry['value']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}] n={entry['n']}"
