"""``lmforge fine-tune ...``: LoRA fine-tuning jobs, over ``lmforge.client.FineTune``::

    lmforge fine-tune create --training data.jsonl --suffix pirate --n-epochs 3 --follow
    lmforge fine-tune create --method dpo --beta 0.1 --training prefs.jsonl --follow
    lmforge fine-tune run dpo.yaml     # offline, in this process, from an Anyscale llmforge YAML
    lmforge fine-tune events ftjob-abc123 --follow
    lmforge chat --model ft:smollm2-135m-instruct:pirate:ftjob-abc123

``--follow`` shows the job's messages and a live loss bar on stderr, so that stdout holds only
the final job (a table, or JSON with ``--json``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from lmforge.cli.common import (
    api_options,
    base_model,
    echo_json,
    json_option,
    local_time,
    model_option,
    show,
    show_list,
)
from lmforge.client import BatchJobStatus, FineTune, LLMFineTuneEvent

JOB_COLUMNS = (("id", "id"), ("status", "status"), ("base model", "model"),
               ("fine-tuned model", "fine_tuned_model"), ("created", "created_at"))
# the create options that become method.supervised.hyperparameters: (option, key, type, help)
_HYPERPARAMETERS = (
    ("--n-epochs", "n_epochs", int, "Passes over the training file (1 to 50; default auto)."),
    ("--batch-size", "batch_size", int, "Examples per optimizer step (1 to 256; default auto)."),
    ("--learning-rate-multiplier", "learning_rate_multiplier", float,
     "The peak learning rate is --learning-rate times this (0 to 10; default auto)."),
    ("--lora-r", "lora_r", int, "LoRA rank (1 to 256)."),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha (the update is scaled by alpha / r)."),
    ("--learning-rate", "learning_rate", float, "Base learning rate of AdamW (default 2e-4)."),
    ("--max-seq-len", "max_seq_len", int, "Tokens per example; longer ones are cut at the end."),
    ("--beta", "beta", float, "DPO: strength of the pull towards the reference model "
     "(default 0.1)."),
)


@click.group("fine-tune")
def fine_tune() -> None:
    """Fine-tune the base model with LoRA (/v1/fine_tuning/jobs)."""


def _hyperparameter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for flag, key, kind, text in reversed(_HYPERPARAMETERS):
        command = click.option(flag, key, type=kind, default=None, help=text)(command)
    return command


def _follow_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option("--poll", type=float, default=2.0, show_default=True, metavar="S",
                           help="Seconds between polls with --follow.")(command)
    return click.option("--follow", is_flag=True,
                        help="Follow the job until it ends: messages and a loss bar on "
                             "stderr, then the final job; exit 1 unless it succeeded.")(command)


@fine_tune.command("create")
@model_option
@click.option("--training", "training_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A local JSONL (or CSV) file: uploaded first (purpose fine-tune), then used.")
@click.option("--training-file", default=None, help="An uploaded file of purpose fine-tune.")
@click.option("--validation", "validation_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A local file for the validation loss (default: 10% of the training rows).")
@click.option("--validation-file", default=None, help="An uploaded file of purpose fine-tune.")
@click.option("--suffix", default=None, help="Part of the model name: ft:<base>:<suffix>:<job>.")
@click.option("--seed", type=int, default=None, help="For a reproducible run (default: random).")
@click.option("--method", type=click.Choice(["supervised", "sft", "dpo"]), default="supervised",
              show_default=True, help="supervised (SFT) on examples, or dpo on preference "
              "pairs (--training holds chosen/rejected rows).")
@_hyperparameter_options
@_follow_options
@json_option
@api_options
def create(model: str | None, training_path: Path | None, training_file: str | None,
           validation_path: Path | None, validation_file: str | None, suffix: str | None,
           seed: int | None, method: str, follow: bool, poll: float, as_json: bool,
           **hyperparameters: Any) -> None:
    """Start a fine-tuning job and print it (with --follow: follow it to the end)."""
    method = "supervised" if method == "sft" else method
    if hyperparameters.get("beta") is not None and method != "dpo":
        raise click.UsageError("--beta is a DPO hyperparameter: add --method dpo")
    if (training_file is None) == (training_path is None):
        raise click.UsageError("give exactly one of --training and --training-file")
    if validation_file is not None and validation_path is not None:
        raise click.UsageError("give at most one of --validation and --validation-file")
    given = {k: v for k, v in hyperparameters.items() if v is not None}
    job = FineTune.create(model or base_model(), training_path or training_file,
                          validation_path or validation_file, hyperparameters=given,
                          suffix=suffix, method=method,
                          **({"seed": seed} if seed is not None else {}))
    if follow:
        _follow(job.id, poll, as_json)
    else:
        show(job, as_json)


@fine_tune.command("run")
@click.argument("config_file", metavar="CONFIG.yaml",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="The Ray cluster of a YAML with logprob_processor_scaling_config, "
                   "worker_resources or num_devices above 1 (default: $RAY_ADDRESS, else a "
                   "local one).")
def run(config_file: Path, ray_address: str | None) -> None:
    """Fine-tune offline, in this process, from an Anyscale llmforge YAML (seed 002's keys:
    model_id, train_path, valid_path, task, context_length, learning_rate, num_epochs,
    preference_tuning_config.beta, lora_config, ...; see lmforge/training/llmforge_config.py).
    Writes OUTPUT_DIR/checkpoints/ and the best PEFT adapter in OUTPUT_DIR/adapter; a rerun
    resumes after the last checkpoint. With preference_tuning_config.
    logprob_processor_scaling_config the DPO reference log-probs are computed on Ray actors
    while training runs; with worker_resources the training runs as a Ray task
    (lmforge/cluster/reference_logprobs.py); with num_devices above 1 on that many Ray workers,
    data-parallel (lmforge/cluster/data_parallel.py)."""
    from lmforge.errors import LMForgeError
    from lmforge.models.lora_merge import export_adapter
    from lmforge.training.events import MessageEvent
    from lmforge.training.llmforge_config import read_llmforge_config
    from lmforge.training.trainer import train

    try:
        plan = read_llmforge_config(config_file)
    except LMForgeError as e:
        raise click.UsageError(f"{config_file}: {e.message}") from None
    for note in plan.notes:
        click.echo(note, err=True)

    def on_event(event: Any) -> None:
        if isinstance(event, MessageEvent) and event.message:
            tqdm.write(event.message, file=sys.stderr)

    try:
        if plan.on_ray:
            from lmforge.cluster.ray_env import RayUnavailableError
            from lmforge.cluster.reference_logprobs import run_on_ray
            try:
                result = run_on_ray(plan, address=ray_address, on_event=on_event)
            except RayUnavailableError as e:
                raise click.ClickException(str(e)) from None
        else:
            result = train(plan.model, plan.train_path, plan.valid_path, plan.config,
                           plan.output_dir / "checkpoints", on_event=on_event, resume=True)
    except LMForgeError as e:
        raise click.ClickException(e.message) from None
    target = plan.output_dir / "adapter"
    export_adapter(result.best_checkpoint, target)
    click.echo(f"{target} (validation loss {result.best_eval_loss:.4f}, {result.steps} steps)")


@fine_tune.command("get")
@click.argument("job_id")
@json_option
@api_options
def get(job_id: str, as_json: bool) -> None:
    """Show the fine-tuning job JOB_ID."""
    show(FineTune.get(job_id), as_json)


@fine_tune.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="At most N jobs (the newest).")
@json_option
@api_options
def list_jobs(limit: int | None, as_json: bool) -> None:
    """List fine-tuning jobs, newest first."""
    show_list(FineTune.list().jobs[:limit], as_json, JOB_COLUMNS, "fine-tuning jobs")


@fine_tune.command("cancel")
@click.argument("job_id")
@json_option
@api_options
def cancel(job_id: str, as_json: bool) -> None:
    """Cancel JOB_ID (a running job stops at its next step) and print it. Exits 1 when the
    job had already succeeded or failed."""
    result = FineTune.cancel(job_id)
    if not result.success:
        ended = result.job.server_status if result.job is not None else "finished"
        raise click.ClickException(f"fine-tuning job {job_id} already {ended}; nothing to "
                                   "cancel")
    show(result.job, as_json)


@fine_tune.command("events")
@click.argument("job_id")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              metavar="N", help="The newest N events (without --follow).")
@_follow_options
@json_option
@api_options
def events(job_id: str, limit: int, follow: bool, poll: float, as_json: bool) -> None:
    """Print JOB_ID's events, oldest first: local time, level, message."""
    if follow:
        _follow(job_id, poll, as_json)
        return
    newest = FineTune.get_events(job_id).events[-limit:]
    if as_json:
        echo_json([e.model_dump(mode="json") for e in newest])
        return
    for event in newest:
        click.echo(_event_line(event))


def _event_line(event: LLMFineTuneEvent) -> str:
    when = local_time(event.timestamp) if event.timestamp is not None else "-"
    return f"{when} {event.level:<5} {event.message}"


class _LossBar:
    """``FineTune.wait``'s ``on_event``: message events as lines, metrics events (step, train
    loss, eval loss, DPO's reward accuracy, learning rate) as a tqdm bar, all on stderr."""

    def __init__(self, bar: tqdm):
        self.bar = bar
        self.eval_loss: float | None = None  # the last epoch's, kept between steps

    def __call__(self, event: LLMFineTuneEvent) -> None:
        if event.type != "metrics":
            self.bar.write(_event_line(event), file=sys.stderr)
            return
        data = event.data or {}
        self.eval_loss = data.get("eval_loss", self.eval_loss)
        self.bar.n = int(data.get("step", self.bar.n))
        self.bar.set_postfix_str(self._losses(data))  # also redraws the bar

    def _losses(self, data: dict[str, Any]) -> str:
        parts = []
        if data.get("train_loss") is not None:
            parts.append(f"train_loss={data['train_loss']:.4f}")
        if self.eval_loss is not None:
            parts.append(f"eval_loss={self.eval_loss:.4f}")
        if data.get("rewards/accuracies") is not None:
            parts.append(f"reward_acc={data['rewards/accuracies']:.2f}")
        if data.get("learning_rate") is not None:
            parts.append(f"lr={data['learning_rate']:.2e}")
        return " ".join(parts)


def _follow(job_id: str, poll: float, as_json: bool) -> None:
    """Follow JOB_ID to its end (``_LossBar`` on stderr) and print the final job on stdout.

    Raises:
        click.ClickException: the job failed (its error message) or was cancelled (exit 1).
    """
    with tqdm(desc=job_id, unit="step", file=sys.stderr) as bar:
        job = FineTune.wait(job_id, poll_interval=poll, on_event=_LossBar(bar))
    show(job, as_json)
    if job.status is BatchJobStatus.FAILURE:
        reason = (job.error or {}).get("message") or "no reason given"
        raise click.ClickException(f"fine-tuning job {job_id} failed: {reason}")
    if job.status is not BatchJobStatus.SUCCESS:
        raise click.ClickException(f"fine-tuning job {job_id} was {job.server_status}")
