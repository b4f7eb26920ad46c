"""One fine-tuning loop for every training method: LoRA on our own model classes (the ones the
engine serves).

A method (``methods.get_method(config.method)``; ``"sft"``, supervised fine-tuning, for now) gives
the loop its examples, its micro-batches and its loss; the loop does the rest.

``train(model, train_rows, val_rows, config, output_dir)`` loads the base model unfused in
float32 (``load_model(..., for_training=True)``), wraps the target linears with LoRA
(``models.lora.inject_lora``; everything else frozen) and runs AdamW over the LoRA weights with
linear warmup then cosine decay (transformers' ``get_cosine_schedule_with_warmup``), gradient
accumulation (the loss of each optimizer step is normalized by the step's items, SFT's
completion tokens, so it equals one big batch) and gradient-norm clipping. After each epoch it
evaluates the mean validation loss per item and writes a checkpoint
``output_dir/checkpoint-<step>``: a PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors``) plus ``trainer_state.pt`` (optimizer, scheduler, step, best so
far) for resuming. The result is the checkpoint with the lowest validation loss (LLM Engine's
rule); every checkpoint's adapter is kept (OpenAI serves each checkpoint as a model), and only
the newest keeps its resume state.

The caller gets ``on_event(event)`` callbacks with the dataclasses of ``events``: a
``StepEvent`` after every optimizer step (with ``eval_loss`` after the last step of an epoch,
followed by a ``CheckpointEvent``) and ``MessageEvent`` lines, and stops the run between two
micro-batches by returning True from ``should_stop()`` (cancellation; nothing is saved). With
``resume=True`` a run continues after the last complete checkpoint in ``output_dir``, and says
where it starts first with a ``ResumeEvent`` (checkpoint None, epoch 0, step 0: none was found,
so step 1). With ``parallel`` the run is one rank of a data-parallel one (``distributed``).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmforge.errors import InvalidRequestError
from lmforge.models.loader import LoadedModel
from lmforge.models.lora import (
    inject_lora,
    load_lora_state_dict_,
    load_peft_adapter,
    save_peft_adapter,
)
from lmforge.models.lora_merge import merge_adapter_
from lmforge.training.data import epoch_order, split_holdout
from lmforge.training.distributed import (DataParallel, MetricSums, my_share, sum_over_ranks,
                                          sync_grads, world_size, writes_files)
from lmforge.training.events import (
    CheckpointEvent,
    MessageEvent,
    ResumeEvent,
    StepEvent,
    TrainingEvent,
)
from lmforge.training.forward import load_base
from lmforge.training.methods import MicroBatch, TrainingMethod, get_method
from lmforge.training.methods.dpo import ReferenceLogprobs
from lmforge.training.training_config import TrainingConfig

STATE_FILE = "trainer_state.pt"  # written last: a checkpoint without it is incomplete

Rows = Sequence[Any] | str | Path  # the method's examples, or a file to read them from


@dataclass
class TrainingResult:
    """What a run produced. ``best_checkpoint`` is a PEFT adapter directory (None if no epoch
    finished before a stop)."""

    best_checkpoint: Path | None
    best_eval_loss: float | None
    trained_tokens: int  # prompt + completion tokens of every example trained on, all epochs
    steps: int  # optimizer steps done, resumed ones included
    stopped: bool = False  # should_stop() ended the run early


_BAR_METRICS = ("rewards/accuracies",)  # shown on the progress bar beside the loss
_TOTAL, _COUNT = "\0loss", "\0count"  # the loss sum and item count among summed metrics


@dataclass
class _State:
    """The loop's progress, saved in every checkpoint."""

    step: int = 0
    epoch: int = 0  # epochs completed
    trained_tokens: int = 0
    best_eval_loss: float | None = None
    best_checkpoint: str | None = None


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based): ``step / warmup_steps`` during
    warmup, then ``0.5 * (1 + cos(pi * progress))`` down to 0 at ``total_steps``, as
    transformers' ``get_cosine_schedule_with_warmup``."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(model: str | Path | LoadedModel, train_rows: Rows, val_rows: Rows | None,
          config: TrainingConfig, output_dir: str | Path, *,
          on_event: Callable[[TrainingEvent], None] | None = None, resume: bool = True,
          should_stop: Callable[[], bool] | None = None, base_adapter: str | Path | None = None,
          reference_logprobs: ReferenceLogprobs | None = None,
          parallel: DataParallel | None = None) -> TrainingResult:
    """Fine-tune a LoRA adapter on ``model`` by ``config.method``; the best validation loss wins.

    Args:
        model: a GGUF file, HF directory or alias (loaded in float32, unfused), or a
            ``LoadedModel`` loaded with ``for_training=True`` (LoRA is injected into it in place).
        train_rows: the method's examples (SFT: ``data.read_examples``), or a file of them.
        val_rows: the same, or None to hold out 10% of ``train_rows`` (``split_holdout``).
        output_dir: where checkpoints go; with ``resume`` the last complete one is continued.
        on_event: called with the ``events`` dataclasses (module docstring).
        should_stop: polled before every micro-batch and prepare batch; True ends the run.
        resume: continue after the last complete checkpoint in ``output_dir``, if any (a
            ``ResumeEvent`` says where the run starts).
        base_adapter: a PEFT adapter of ``model`` (``ft:``) folded in first (``merge_adapter_``):
            the DPO reference; checkpoints hold the new one alone (``export_adapter`` stacks).
        reference_logprobs: DPO: a ``dpo.ReferenceLogprobs`` computing the reference log-probs
            elsewhere while training runs (Ray actors); None: here, before training.
        parallel: this process as one rank of a data-parallel run (``distributed``), or None.

    Raises:
        InvalidRequestError: an invalid config (``TrainingConfig.validate``; an unknown method
            too), or max_seq_len beyond the model's context.
        DataError: a training or validation file that does not validate.
        ModelLoadError: the base model cannot be loaded.
    """
    config.validate()
    method = get_method(config.method)
    emit, stop = on_event or (lambda event: None), should_stop or (lambda: False)
    loaded = model if isinstance(model, LoadedModel) else load_base(str(model), config.device)
    _check_context(config, loaded)
    if base_adapter is not None:
        merge_adapter_(loaded.model, str(base_adapter))
    sets = _prepare(method, loaded, _datasets(method, train_rows, val_rows, loaded, config),
                    config, _cache(output_dir, parallel), resume, emit, stop, reference_logprobs)
    if sets is None:  # stopped during the method's pass over the data
        return TrainingResult(None, None, 0, 0, stopped=True)
    torch.manual_seed(config.seed)
    inject_lora(loaded.model, config.lora)
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    loop = _Loop(method, loaded, params, *sets, config, Path(output_dir), emit, parallel)
    if resume:
        checkpoint = loop.restore_last_checkpoint()
        emit(ResumeEvent(checkpoint, loop.state.epoch, loop.state.step))
    return loop.run(stop)


def _prepare(method: TrainingMethod, loaded: LoadedModel, sets: tuple[list[Any], list[Any]],
             config: TrainingConfig, cache: Path, resume: bool,
             emit: Callable[[TrainingEvent], None], should_stop: Callable[[], bool],
             reference: ReferenceLogprobs | None = None
             ) -> tuple[list[Any], list[Any]] | None:
    """The method's pass over the training and validation sets (e.g. DPO's reference log-probs,
    on the base alone), kept in ``cache`` (emptied first unless the run resumes); the sets as
    they are for a method without one; None when ``should_stop`` ended it. ``reference`` goes to
    the method's pass when given (DPO's ``ReferenceLogprobs``)."""
    if method.prepare is None:
        return sets
    if not resume:
        shutil.rmtree(cache, ignore_errors=True)
    out, extra = [], {} if reference is None else {"reference": reference}
    for name, rows in zip(("train", "valid"), sets, strict=True):
        out.append(method.prepare(loaded.model, rows, config, pad_token_id(loaded),  # type: ignore
                                  cache / f"{name}.pt", emit, should_stop, **extra))
        if out[-1] is None:
            return None
    return out[0], out[1]


def _cache(output_dir: str | Path, parallel: DataParallel | None) -> Path:
    """Where the method's pass keeps its results: a directory of each rank's own."""
    return Path(output_dir) / ("prepared" if parallel is None or parallel.rank == 0
                               else f"prepared-rank{parallel.rank}")


def pad_token_id(loaded: LoadedModel) -> int:
    """The id that pads micro-batches: the tokenizer's pad token, else its eos, else 0."""
    hf = loaded.tokenizer.hf
    return hf.pad_token_id if hf.pad_token_id is not None else (hf.eos_token_id or 0)


def _check_context(config: TrainingConfig, loaded: LoadedModel) -> None:
    if config.max_seq_len > loaded.config.max_position_embeddings:
        raise InvalidRequestError(
            f"max_seq_len ({config.max_seq_len}) exceeds the model's context "
            f"({loaded.config.max_position_embeddings}); lower max_seq_len", param="max_seq_len")


def _datasets(method: TrainingMethod, train_rows: Rows, val_rows: Rows | None,
              loaded: LoadedModel, config: TrainingConfig) -> tuple[list[Any], list[Any]]:
    def read(rows: Rows, param: str, min_rows: int) -> list[Any]:
        if isinstance(rows, (str, Path)):
            return method.read_examples(rows, loaded.tokenizer, config.max_seq_len, param=param,
                                        min_rows=min_rows)
        return list(rows)

    train_set = read(train_rows, "training_file", 2)
    if val_rows is None:
        return split_holdout(train_set, config.seed)
    return train_set, read(val_rows, "validation_file", 1)


class _Loop:
    """The state of one run: the method, the model, the optimizer, the schedule and the data
    order."""

    def __init__(self, method: TrainingMethod, loaded: LoadedModel,
                 params: list[torch.nn.Parameter], train_set: list[Any], val_set: list[Any],
                 config: TrainingConfig, output_dir: Path,
                 emit: Callable[[TrainingEvent], None], parallel: DataParallel | None = None):
        self.method, self.loaded, self.model, self.config = method, loaded, loaded.model, config
        self.train_set, self.val_set, self.output_dir, self.emit = (
            train_set, val_set, output_dir, emit)
        self.params, self.parallel = params, parallel
        self.pad_id = pad_token_id(loaded)
        micro = math.ceil(len(train_set) / config.batch_size)
        self.accum = config.gradient_accumulation_steps * world_size(parallel)  # micro per step
        self.steps_per_epoch = math.ceil(micro / self.accum)
        self.total_steps = self.steps_per_epoch * config.n_epochs
        warmup = round(config.warmup_ratio * self.total_steps)
        self.optimizer = torch.optim.AdamW(params, lr=config.peak_learning_rate,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_with_warmup(s, warmup, self.total_steps))
        self.state = _State()

    # --- the loop ----------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool]) -> TrainingResult:
        cfg = self.config
        self.message(f"Training on {len(self.train_set)} examples, validating on "
                     f"{len(self.val_set)}: {self.total_steps} steps over {cfg.n_epochs} epochs")
        with tqdm(total=self.total_steps, initial=self.state.step, desc="Fine-tuning",
                  unit="step", disable=not writes_files(self.parallel)) as bar:
            for epoch in range(self.state.epoch, cfg.n_epochs):
                for step_batches in self.epoch_steps(epoch):
                    if should_stop():
                        self.message(f"Stopped at step {self.state.step}")
                        return self.result(stopped=True)
                    train_loss, lr, metrics = self.optimizer_step(step_batches)
                    bar.update(1)
                    bar.set_postfix(loss=f"{train_loss:.4f}", **{
                        k.rpartition("/")[2]: f"{v:.3g}" for k, v in metrics.items()
                        if k in _BAR_METRICS})
                    self.emit_metrics(epoch, train_loss, lr, metrics, last=self.state.step
                                      == (epoch + 1) * self.steps_per_epoch)
        self.message(f"Done: the best checkpoint is {self.state.best_checkpoint} "
                     f"(validation loss {self.state.best_eval_loss:.4f})")
        return self.result(stopped=False)

    def epoch_steps(self, epoch: int) -> list[list[MicroBatch]]:
        """This epoch's optimizer steps, each a list of micro-batches, skipping those done.

        The order is a shuffle seeded by (seed, epoch), so a resumed run sees the same batches.
        """
        order = epoch_order(len(self.train_set), self.config.seed, epoch)
        size, accum = self.config.batch_size, self.accum
        batches = [self.method.collate([self.train_set[i] for i in order[s:s + size]],
                                       self.pad_id)
                   for s in range(0, len(order), size)]
        steps = [batches[s:s + accum] for s in range(0, len(batches), accum)]
        done = self.state.step - epoch * self.steps_per_epoch
        return steps[done:]

    def optimizer_step(self, batches: list[MicroBatch]
                       ) -> tuple[float, float, dict[str, float]]:
        """Forward/backward every micro-batch, clip, step.

        Each micro-batch's summed loss is divided by the items of the whole step, so the
        step's gradient is that of one big batch (every item weighs the same), here or summed
        over the ranks (``distributed``).

        Returns:
            (the step's mean loss per item, the learning rate it used, the method's metrics as
            means per item).
        """
        self.model.train()
        num_items = max(sum(b.num_items for b in batches), 1)
        self.state.trained_tokens += sum(b.num_tokens for b in batches)
        total, metrics = 0.0, MetricSums()
        for batch in my_share(batches, self.parallel):
            out = self.method.loss(self.model, batch.to(self.device), self.config)
            loss = out.loss / num_items
            loss.backward()
            total += loss.item()
            metrics.add(out.metrics)
        sync_grads(self.parallel, self.params)
        metrics = MetricSums(sum_over_ranks(self.parallel, {**metrics, _TOTAL: total}))
        total = metrics.pop(_TOTAL)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return total, lr, metrics.means(num_items)

    def emit_metrics(self, epoch: int, train_loss: float, lr: float, metrics: dict[str, float],
                     last: bool) -> None:
        """The step's ``StepEvent``; after an epoch's last step, evaluate and checkpoint first,
        and follow it with the ``CheckpointEvent``."""
        if not last:
            self.emit(StepEvent(self.state.step, epoch + 1, train_loss, lr, metrics=metrics))
            return
        eval_loss, eval_metrics = self.evaluate()
        self.state.epoch = epoch + 1
        directory = self.save_checkpoint(eval_loss)
        self.emit(StepEvent(self.state.step, epoch + 1, train_loss, lr, eval_loss, metrics,
                            eval_metrics))
        self.emit(CheckpointEvent(self.state.step, self.state.epoch, directory, train_loss,
                                  eval_loss, eval_metrics))

    @torch.no_grad()
    def evaluate(self) -> tuple[float, dict[str, float]]:
        """Mean loss per item over the validation set (dropout off), and the method's metrics
        as means per item; data-parallel, each rank runs its share of the batches."""
        self.model.eval()
        total, count, metrics = 0.0, 0, MetricSums()
        size = self.config.eval_batch_size or self.config.batch_size
        for s in my_share(range(0, len(self.val_set), size), self.parallel):
            batch = self.method.collate(self.val_set[s:s + size], self.pad_id)
            out = self.method.loss(self.model, batch.to(self.device), self.config)
            total += out.loss.item()
            count += out.num_items
            metrics.add(out.metrics)
        metrics = MetricSums(sum_over_ranks(self.parallel,
                                            {**metrics, _TOTAL: total, _COUNT: count}))
        total, count = metrics.pop(_TOTAL), int(metrics.pop(_COUNT))
        return total / max(count, 1), metrics.means(count)

    # --- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, eval_loss: float) -> Path:
        """Save the adapter and the resume state in ``checkpoint-<step>`` (rank 0 alone, the
        others only keep the best in step); returns its path."""
        directory = self.output_dir / f"checkpoint-{self.state.step}"
        if self.state.best_eval_loss is None or eval_loss < self.state.best_eval_loss:
            self.state.best_eval_loss, self.state.best_checkpoint = eval_loss, str(directory)
        if not writes_files(self.parallel):
            return directory
        save_peft_adapter(self.model, self.config.lora, directory, self.loaded.name)
        tmp = directory / f"{STATE_FILE}.tmp"
        torch.save({"state": vars(self.state), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, directory / STATE_FILE)
        self.drop_older_states(directory)
        self.message(f"Epoch {self.state.epoch}: validation loss {eval_loss:.4f}, checkpoint "
                     f"{directory.name}")
        return directory

    def drop_older_states(self, newest: Path) -> None:
        """Delete the resume state (optimizer moments: twice the adapter) of every checkpoint
        but ``newest``; their adapters stay, each a model of its own (OpenAI's checkpoints)."""
        for path in self.output_dir.glob("checkpoint-*"):
            if path != newest:
                (path / STATE_FILE).unlink(missing_ok=True)

    def restore_last_checkpoint(self) -> str | None:
        """Continue after the last complete checkpoint in output_dir; returns its name (None:
        there is none, the run starts at step 1)."""
        done = [p for p in self.output_dir.glob("checkpoint-*") if (p / STATE_FILE).is_file()]
        if not done:
            return None
        last = max(done, key=lambda p: int(p.name.rpartition("-")[2]))
        _, weights = load_peft_adapter(last)
        load_lora_state_dict_(self.model, weights)
        saved = torch.load(last / STATE_FILE, weights_only=True)  # plain data: no pickled code
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        self.state = _State(**saved["state"])
        return last.name

    # --- helpers -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def message(self, text: str) -> None:
        self.emit(MessageEvent(text))

    def result(self, stopped: bool) -> TrainingResult:
        best = self.state.best_checkpoint
        return TrainingResult(Path(best) if best else None, self.state.best_eval_loss,
                              self.state.trained_tokens, self.state.step, stopped)
