"""``pretrain()``: train a GPT-2 or GPT-1 from scratch on text files, resumably, into a Hugging
Face model directory that ``lmforge serve`` serves.

The loop is nanoGPT's (Karpathy, ``train.py``): random windows of the token file, AdamW, warmup
then cosine, gradient accumulation and clipping, autocast to bfloat16 where the hardware computes
it natively. The model is the engine's own ``GPTLMHeadModel`` run through
``training.forward.causal_lm_logits``, so what is trained is exactly what is served.

A run is bounded by ``max_steps`` and/or ``max_minutes`` (wall-clock, summed over invocations).
With a time bound only, the schedule's horizon is estimated from the first ``CALIBRATION_STEPS``
steps and then fixed (saved in the checkpoints). Every ``checkpoint_interval`` steps a checkpoint
is written atomically; running the same command again after a crash or ``kill -9`` resumes from
the newest one and reads the same data and dropout masks an uninterrupted run would (both are
functions of ``(seed, step)``). The first Ctrl-C finishes the current step, saves, exports and
returns with ``interrupted=True``; a second one stops at once.

Outputs in ``out``: the model (``config.json``, ``model.safetensors``,
``generation_config.json``, tokenizer files), ``metrics.jsonl`` (a row per step, and one per
validation pass), ``loss.png`` (train and validation loss against the unigram baseline),
``checkpoints/``, ``data/`` (token files) and ``pretrain_run.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmforge.models.gpt_hf import save_gpt_pretrained
from lmforge.training.charts import loss_chart
from lmforge.training.forward import causal_lm_logits
from lmforge.training.pretraining.checkpoint import (
    RunState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lmforge.training.pretraining.config import PretrainConfig
from lmforge.training.pretraining.devices import autocast_dtype, resolve_device
from lmforge.training.pretraining.prepare import (
    build_model,
    build_optimizer,
    claim_run_dir,
    learning_rate,
    prepare_data,
    prepare_tokenizer,
)

CALIBRATION_STEPS = 10  # steps timed to fix a time-bounded run's schedule horizon


@dataclass
class PretrainResult:
    """How a run ended. Losses in nats/token; ``val_perplexity`` = exp(``val_loss``)."""

    out: Path  # the Hugging Face model directory
    steps: int
    tokens: int  # training tokens seen
    num_parameters: int
    train_loss: float | None  # of the last step (None when this call ran no step)
    val_loss: float
    val_perplexity: float
    unigram_entropy: float  # the context-free baseline on the same validation tokens
    elapsed_s: float  # in the training loop, over every invocation
    resumed_from: int | None  # the checkpoint step this call started from, if any
    interrupted: bool  # stopped by Ctrl-C before its bound


def pretrain(config: PretrainConfig | None = None, /, *, config_file: str | Path | None = None,
             show_progress: bool = True, **settings) -> PretrainResult:
    """Train (or resume) the run ``config`` describes, or ``PretrainConfig.from_sources(
    config_file, **settings)``; e.g. ``pretrain(train=["a.txt"], out="gpt", max_minutes=5)``.

    Raises:
        InvalidRequestError: a bad setting, an ``out`` that holds something else, too little text.
    """
    config = config or PretrainConfig.from_sources(config_file, **settings)
    config.validate()
    return _Run(config, show_progress).run()


def next_token_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token, a scalar) of ``x`` (B, T) int64 against its
    targets ``y`` (B, T), with autocast to ``amp_dtype`` (None = none) on the model's device."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        logits = causal_lm_logits(model, x)  # (B, T, V) float32
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


class _Run:
    def __init__(self, config: PretrainConfig, show_progress: bool):
        self.config, self.show = config, show_progress
        self.out = claim_run_dir(config)
        self.device = resolve_device(config.device)
        self.amp_dtype = autocast_dtype(config.dtype, self.device)
        self.tokenizer, self.eot = prepare_tokenizer(config, self.out, show_progress)
        self.data = prepare_data(config, self.out, self.tokenizer, self.eot, show_progress)
        self.model = build_model(config, len(self.tokenizer), self.device)
        self.optimizer = build_optimizer(config, self.model)
        self.state = RunState(horizon=config.horizon_steps)
        self.resumed_from = self._resume()
        self.stop_requested = False
        self.validated: tuple[int, float] = (-1, math.nan)  # (step, validation loss)
        self.metrics = self.out / "metrics.jsonl"
        self._truncate_metrics()

    def _resume(self) -> int | None:
        path = latest_checkpoint(self.out)
        if path is None:
            return None
        self.state = load_checkpoint(path, self.model, self.optimizer)
        if self.config.max_steps is not None:  # a new step bound moves the horizon
            self.state.horizon = self.config.max_steps
        return self.state.step

    def run(self) -> PretrainResult:
        loss = None
        if not self._done():
            with self._stop_on_sigint():
                loss = self._loop()
        val_loss = self._validate()  # the final step's, unless the loop just measured it
        self._save()
        return PretrainResult(
            out=self.out, steps=self.state.step, tokens=self.state.tokens,
            num_parameters=self._num_params(),
            train_loss=loss, val_loss=val_loss, val_perplexity=math.exp(val_loss),
            unigram_entropy=self.data.unigram_entropy, elapsed_s=self.state.elapsed_s,
            resumed_from=self.resumed_from, interrupted=self.stop_requested)

    def _done(self) -> bool:
        c, s = self.config, self.state
        if c.max_minutes is not None and s.elapsed_s >= c.max_minutes * 60:
            return True
        bound = c.horizon_steps  # max_steps, or the default when nothing bounds the run
        return bound is not None and s.step >= bound

    def _loop(self) -> float | None:
        c, s = self.config, self.state
        self._say(f"{self._num_params() / 1e6:.2f}M parameters, {len(self.data.train):,} train "
                  f"and {len(self.data.valid):,} validation tokens; unigram baseline "
                  f"{self.data.unigram_entropy:.3f} nats/token"
                  + (f"; resuming at step {s.step}" if self.resumed_from is not None else ""))
        bar = tqdm(total=s.horizon, initial=s.step, desc="Pretraining", unit="step",
                   disable=not self.show, dynamic_ncols=True)
        first, loss, started = s.step, None, time.perf_counter()
        with bar:
            while not self._done() and not self.stop_requested:
                tick = time.perf_counter()
                loss = self._step()
                s.step += 1
                s.tokens += c.batch_size * c.gradient_accumulation_steps * c.context
                if s.horizon is None and s.step - first == CALIBRATION_STEPS:
                    s.horizon = self._estimate_horizon(time.perf_counter() - started, first)
                    bar.total = s.horizon
                self._after_step(loss, time.perf_counter() - tick, bar)
                s.elapsed_s += time.perf_counter() - tick
        return loss

    def _step(self) -> float:
        c, s = self.config, self.state
        lr = learning_rate(c, s.step + 1, s.horizon)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if c.dropout > 0:  # the masks of step N are the same in a resumed run
            torch.manual_seed(c.seed * 1_000_003 + s.step)
        total = 0.0
        for micro in range(c.gradient_accumulation_steps):
            x, y = self.data.train.batch(c.batch_size, c.seed, s.step, micro)
            loss = self._loss(x, y) / c.gradient_accumulation_steps
            loss.backward()
            total += loss.item()
        if c.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return next_token_loss(self.model, x.to(self.device), y.to(self.device), self.amp_dtype)

    def _after_step(self, loss: float, seconds: float, bar: tqdm) -> None:
        c, s = self.config, self.state
        tokens_per_s = c.batch_size * c.gradient_accumulation_steps * c.context / seconds
        lr = self.optimizer.param_groups[0]["lr"]
        self._log({"step": s.step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s,
                   "elapsed_s": s.elapsed_s + seconds})
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_s:,.0f}")
        bar.update(1)
        if s.step % c.eval_interval == 0:
            val = self._validate()
            self._say(f"step {s.step}: validation loss {val:.3f}, perplexity {math.exp(val):.1f}")
            self._chart()
        if s.step % c.checkpoint_interval == 0:
            save_checkpoint(self.out, self.model, self.optimizer, s)

    def _estimate_horizon(self, seconds: float, first: int) -> int:
        """Steps the time budget allows: the calibration's pace, slowed by the share of time the
        validation passes take (a pass ~ a third of a step per eval batch)."""
        c = self.config
        per_step = seconds / CALIBRATION_STEPS
        eval_batches = math.ceil(c.eval_windows / c.batch_size) / c.gradient_accumulation_steps
        per_step *= 1 + eval_batches / 3 / c.eval_interval
        remaining = c.max_minutes * 60 - self.state.elapsed_s - seconds
        return max(first + CALIBRATION_STEPS + 1,
                   first + CALIBRATION_STEPS + int(remaining / per_step))

    def _validate(self) -> float:
        """The validation loss at this step, measured and logged once per step."""
        if self.validated[0] != self.state.step:
            val = self._evaluate()
            self._log({"step": self.state.step, "val_loss": val, "val_perplexity": math.exp(val)})
            self.validated = (self.state.step, val)
        return self.validated[1]

    @torch.no_grad()
    def _evaluate(self) -> float:
        """Mean next-token cross-entropy over the fixed validation windows (nats/token)."""
        self.model.eval()
        try:
            losses = [self._loss(x, y).item() for x, y in
                      self.data.valid.eval_batches(self.config.eval_windows,
                                                   self.config.batch_size)]
        finally:
            self.model.train()
        return sum(losses) / len(losses)

    def _save(self) -> None:
        """Checkpoint (unless this step has one), then export the HF directory and the chart."""
        latest = latest_checkpoint(self.out)
        if latest is None or latest.name != f"step-{self.state.step:07d}.pt":
            save_checkpoint(self.out, self.model, self.optimizer, self.state)
        save_gpt_pretrained(self.model, self.out, bos_token_id=self.eot, eos_token_id=self.eot)
        self._chart()

    def _chart(self) -> None:
        rows = [json.loads(line) for line in self.metrics.read_text().splitlines() if line]
        loss_chart(rows, self.out / "loss.png", title=f"Pretraining {self.out.name}",
                   baseline=self.data.unigram_entropy, baseline_label="unigram baseline")

    def _log(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self) -> None:
        """Drop the rows a crash left after the checkpoint resumed from: the curve goes on."""
        if not self.metrics.exists():
            return
        rows = [line for line in self.metrics.read_text().splitlines()
                if line and json.loads(line)["step"] <= self.state.step]
        self.metrics.write_text("".join(f"{line}\n" for line in rows))

    def _num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    def _say(self, message: str) -> None:
        if self.show:
            tqdm.write(message, file=sys.stderr)  # beside the bar; stdout is the result's

    @contextlib.contextmanager
    def _stop_on_sigint(self):
        """First Ctrl-C: stop after this step and save; the second: KeyboardInterrupt."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            tqdm.write("Ctrl-C: saving a checkpoint after this step (again to quit at once)",
                       file=sys.stderr)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
