"""Data-parallel LoRA training on Ray workers (an llmforge YAML's ``num_devices: N``) on the
session's cluster, with the tiny Llama scaled to learn: two workers, each forwarding half of
every step's micro-batches, take the steps of one process whose gradient accumulation covers
both halves (same losses, same validation, same adapter); an llmforge DPO YAML with
``num_devices: 2`` and a logprob processor runs through ``lmforge fine-tune run``, both ranks
taking their reference log-probs from the processor, and its adapter prefers the preferred
answers of unseen prompts far more than the base does; a cluster too small is refused up
front."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from lmforge.cli import main
from lmforge.cluster.reference_logprobs import run_on_ray
from lmforge.config import ModelConfig
from lmforge.models.loader import load_model
from lmforge.models.lora import LoRAConfig, load_peft_adapter
from lmforge.models.lora_merge import merge_adapter_
from lmforge.training.events import CheckpointEvent, MessageEvent, StepEvent
from lmforge.training.llmforge_config import FinetuneRun
from lmforge.training.methods.dpo import reference_logps
from lmforge.training.preferences import read_preferences
from lmforge.training.trainer import TrainingConfig, pad_token_id, train

GOOD = "Bananas are the answer."
BAD = "I could not say, since there are so many things one might consider here."


pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat(i):
    return {"messages": [{"role": "user", "content": f"Tell me about topic number {i}."},
                         {"role": "assistant", "content": GOOD}]}


def _pair(i):
    return {"input": {"messages": [{"role": "user", "content": f"Tell me about topic {i}."}]},
            "preferred_output": [{"role": "assistant", "content": GOOD}],
            "non_preferred_output": [{"role": "assistant", "content": BAD}]}


def test_two_workers_take_the_steps_of_one_process_accumulating_both_halves(
        ray_cluster, scaled_dir, tmp_path):
    # 18 rows in micro-batches of 2: 9 per epoch, so the last step of each epoch has one
    # micro-batch and rank 1 nothing (it contributes zero gradients); validation batches of
    # 3 over 4 rows: rank 0 takes rows 0-2, rank 1 row 3
    train_path = _write(tmp_path / "train.jsonl", [_chat(i) for i in range(18)])
    valid_path = _write(tmp_path / "valid.jsonl", [_chat(i) for i in range(100, 104)])
    config = TrainingConfig(n_epochs=2, batch_size=2, eval_batch_size=3, learning_rate=2e-2,
                            warmup_ratio=0.1, max_seq_len=64, gradient_accumulation_steps=2,
                            lora=LoRAConfig(r=4, lora_alpha=8))
    events = {"one": [], "two": []}
    one = train(str(scaled_dir), train_path, valid_path, config, tmp_path / "one",
                on_event=events["one"].append)
    # one micro-batch per rank per step: the global step is the same 2 micro-batches
    plan = FinetuneRun(model=str(scaled_dir), train_path=train_path, valid_path=valid_path,
                       output_dir=tmp_path / "two", num_devices=2,
                       config=dataclasses.replace(config, gradient_accumulation_steps=1))
    two = run_on_ray(plan, address=ray_cluster, on_event=events["two"].append)

    steps = {name: [e for e in got if isinstance(e, StepEvent)] for name, got in events.items()}
    assert [e.step for e in steps["two"]] == list(range(1, 11)) and two.steps == one.steps == 10
    assert [e.train_loss for e in steps["two"]] == pytest.approx(
        [e.train_loss for e in steps["one"]], rel=1e-4, abs=1e-5)
    assert [e.learning_rate for e in steps["two"]] == [e.learning_rate for e in steps["one"]]
    assert steps["two"][-1].train_loss < steps["two"][0].train_loss * 0.7  # it learns
    assert two.best_eval_loss == pytest.approx(one.best_eval_loss, rel=1e-4)
    assert two.trained_tokens == one.trained_tokens
    assert two.best_checkpoint.name == one.best_checkpoint.name
    assert two.best_checkpoint.parent.parent.name == "two"  # rank 0 wrote the run's checkpoints
    assert len([e for e in events["two"] if isinstance(e, CheckpointEvent)]) == 2  # rank 0's
    messages = [e.message for e in events["two"] if isinstance(e, MessageEvent)]
    assert any("2 data-parallel workers ended with the same adapter" in m for m in messages)
    assert sum("Training on 18 examples" in m for m in messages) == 1  # rank 0 alone reports
    _, adapter_one = load_peft_adapter(one.best_checkpoint)
    _, adapter_two = load_peft_adapter(two.best_checkpoint)
    assert adapter_one.keys() == adapter_two.keys()
    for key, weight in adapter_one.items():
        torch.testing.assert_close(adapter_two[key], weight, rtol=1e-3, atol=1e-5)


def _yaml(tmp_path, scaled_dir, **keys):
    config = {"model_id": str(scaled_dir), "train_path": "train.jsonl",
              "task": "preference_tuning", "context_length": 128, "num_epochs": 3,
              "train_batch_size_per_device": 2, "learning_rate": 1e-2, "output_dir": "out",
              "lora_config": {"r": 4, "lora_alpha": 8}, **keys}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_an_llmforge_yaml_with_num_devices_2_trains_dpo_on_two_ray_workers(
        ray_cluster, scaled_dir, tmp_path):
    _write(tmp_path / "train.jsonl", [_pair(i) for i in range(20)])
    scaling = {"concurrency": 1, "batch_size": 4, "custom_resources": {"CPU": 0.5}}
    path = _yaml(tmp_path, scaled_dir, num_devices=2, preference_tuning_config={
        "beta": 0.1, "logprob_processor_scaling_config": scaling})
    result = CliRunner().invoke(main, ["fine-tune", "run", str(path), "--ray-address",
                                       ray_cluster])
    assert result.exit_code == 0, result.output
    assert "2 data-parallel workers ended with the same adapter" in result.output
    assert "computed by 1 logprob-processor actor(s)" in result.output  # rank 0's message
    assert not list((tmp_path / "out" / "checkpoints").glob("prepared*/train.pt"))  # no rank's
    # 18 pairs (2 held out), 2 per device x 2 devices: 5 steps per epoch, 3 epochs
    assert result.stdout.strip().splitlines()[-1].endswith(", 15 steps)")

    loaded = load_model(ModelConfig(model=str(scaled_dir), dtype="float32"), for_training=True)
    held_out = read_preferences(_write(tmp_path / "held_out.jsonl",
                                       [_pair(i) for i in range(500, 504)]),
                                loaded.tokenizer, 128, min_rows=1)
    base = reference_logps(loaded.model, held_out, pad_token_id(loaded))  # (4, 2)
    merge_adapter_(loaded.model, str(tmp_path / "out" / "adapter"))
    tuned = reference_logps(loaded.model, held_out, pad_token_id(loaded))
    base_margin, tuned_margin = base[:, 0] - base[:, 1], tuned[:, 0] - tuned[:, 1]
    # logp(preferred) - logp(non-preferred) on unseen prompts: the base's is ~120 nats (the
    # non-preferred answer is longer), the adapter's ~190 (measured)
    assert (tuned_margin > base_margin + 20.0).all(), (base_margin, tuned_margin)


def test_more_workers_than_the_cluster_holds_are_refused_before_any_starts(
        ray_cluster, scaled_dir, tmp_path):
    _write(tmp_path / "train.jsonl", [_pair(i) for i in range(20)])
    path = _yaml(tmp_path, scaled_dir, num_devices=3, worker_resources={"CPU": 2})
    result = CliRunner().invoke(main, ["fine-tune", "run", str(path), "--ray-address",
                                       ray_cluster])
    assert result.exit_code == 1
    assert "num_devices: 3" in result.output and "'CPU': 6.0" in result.output
    assert not (tmp_path / "out").exists()
