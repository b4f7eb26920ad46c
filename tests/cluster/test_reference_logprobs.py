"""DPO's reference log-probs from Ray actors (the seed's "logprob processor") on the session's
cluster, with the tiny Llama scaled to learn: the actors' numbers equal the in-process pass's, a
DPO run fed by them takes the in-process run's steps (same losses, same adapter) and learns, and
an llmforge YAML with ``logprob_processor_scaling_config`` and ``worker_resources`` runs through
``lmforge fine-tune run`` on the cluster."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner

from lmforge.cli import main
from lmforge.cluster.reference_logprobs import LogprobProcessor, ray_options
from lmforge.config import ModelConfig
from lmforge.models.loader import load_model
from lmforge.models.lora import LoRAConfig, load_peft_adapter
from lmforge.training.events import MessageEvent, StepEvent
from lmforge.training.methods.dpo import reference_logps
from lmforge.training.preferences import read_preferences
from lmforge.training.trainer import TrainingConfig, pad_token_id, train

GOOD = "Bananas are the answer."
BAD = "I could not say, since there are so many things one might consider here."
ACTOR = {"CPU": 0.5}  # two actors and a training task fit beside anything else on 4 CPUs


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_ray")
    rows = [{"input": {"messages": [{"role": "user", "content": f"Tell me about topic {i}."}]},
             "preferred_output": [{"role": "assistant", "content": GOOD}],
             "non_preferred_output": [{"role": "assistant", "content": BAD}]} for i in range(20)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def processor(ray_cluster, scaled_dir):
    with LogprobProcessor(str(scaled_dir), concurrency=2, batch_size=3, resources=ACTOR,
                          address=ray_cluster) as pool:
        yield pool


def test_the_actors_compute_the_in_process_reference_logprobs(processor, scaled_dir, files):
    loaded = load_model(ModelConfig(model=str(scaled_dir), dtype="float32"), for_training=True)
    pairs = read_preferences(files / "train.jsonl", loaded.tokenizer, 128)[:7]
    pairs[3] = pairs[3].__class__(pairs[3].prompt_ids[:4], pairs[3].chosen_ids,  # other lengths
                                  pairs[3].rejected_ids[:5], pairs[3].line)
    for average in (False, True):  # summed (sigmoid DPO), averaged per token (IPO)
        here = reference_logps(loaded.model, pairs, pad_token_id(loaded), average)  # (7, 2)
        pending = processor.submit(pairs, average)  # 3 chunks dealt to 2 actors
        there = torch.tensor([p.result() for p in pending])
        assert len(pending) == 7 and here[:, 0].std() > 0  # not one number for every pair
        torch.testing.assert_close(there, here, rtol=1e-5, atol=1e-5)


def test_a_dpo_run_fed_by_the_actors_takes_the_in_process_steps(processor, scaled_dir, files,
                                                                tmp_path):
    config = TrainingConfig(method="dpo", n_epochs=3, batch_size=4, learning_rate=1e-2,
                            warmup_ratio=0.1, max_seq_len=128, beta=0.1, rpo_alpha=0,
                            lora=LoRAConfig(r=4, lora_alpha=8))
    runs = {}
    for name, reference in (("here", None), ("ray", processor)):
        events = []
        result = train(str(scaled_dir), files / "train.jsonl", None, config, tmp_path / name,
                       on_event=events.append, reference_logprobs=reference)
        losses = [e.train_loss for e in events if isinstance(e, StepEvent)]
        runs[name] = result, losses, [e.message for e in events if isinstance(e, MessageEvent)]
    (here, here_losses, _), (ray, ray_losses, messages) = runs["here"], runs["ray"]
    assert any("computed by 2 logprob-processor actor(s)" in m for m in messages), messages
    assert not (tmp_path / "ray" / "prepared" / "train.pt").exists()  # not the in-process pass
    assert len(ray_losses) == len(here_losses) == 15
    assert ray_losses == pytest.approx(here_losses, rel=1e-4, abs=1e-5)
    assert ray.best_eval_loss == pytest.approx(here.best_eval_loss, rel=1e-4, abs=1e-5)
    assert ray.best_eval_loss < math.log(2) - 0.3  # it learned: held-out pairs preferred
    _, adapter_here = load_peft_adapter(here.best_checkpoint)
    _, adapter_ray = load_peft_adapter(ray.best_checkpoint)
    for key, weight in adapter_here.items():
        torch.testing.assert_close(adapter_ray[key], weight, rtol=1e-3, atol=1e-4)


def _yaml(tmp_path, scaled_dir, name, **keys):
    config = {"model_id": str(scaled_dir), "train_path": "train.jsonl",
              "task": "preference_tuning", "context_length": 128, "num_epochs": 1,
              "train_batch_size_per_device": 4, "learning_rate": 1e-2, "output_dir": name,
              "lora_config": {"r": 4, "lora_alpha": 8}, **keys}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_an_llmforge_yaml_runs_its_logprob_processor_and_worker_on_ray(ray_cluster, scaled_dir,
                                                                       files, tmp_path):
    shutil.copy(files / "train.jsonl", tmp_path / "train.jsonl")
    scaling = {"concurrency": 1, "batch_size": 4, "custom_resources": ACTOR}
    on_ray = _yaml(tmp_path, scaled_dir, "ray", worker_resources=ACTOR,
                   preference_tuning_config={"beta": 0.1,
                                             "logprob_processor_scaling_config": scaling})
    here = _yaml(tmp_path, scaled_dir, "here", preference_tuning_config={"beta": 0.1})
    runner = CliRunner()
    ray = runner.invoke(main, ["fine-tune", "run", str(on_ray), "--ray-address", ray_cluster])
    assert ray.exit_code == 0, ray.output
    assert "computed by 1 logprob-processor actor(s)" in ray.output  # from the training task
    assert (tmp_path / "ray" / "adapter" / "adapter_model.safetensors").is_file()
    alone = runner.invoke(main, ["fine-tune", "run", str(here)])
    assert alone.exit_code == 0, alone.output
    last = [r.output.strip().splitlines()[-1] for r in (ray, alone)]
    assert last[0].replace("/ray/", "/here/") == last[1]  # same validation loss, same steps


def test_resources_the_cluster_lacks_are_refused_before_any_actor_starts(ray_cluster,
                                                                          scaled_dir, files,
                                                                          tmp_path):
    shutil.copy(files / "train.jsonl", tmp_path / "train.jsonl")
    scaling = {"custom_resources": {"accelerator_type:A10G": 1}, "concurrency": 2}
    path = _yaml(tmp_path, scaled_dir, "gpu", preference_tuning_config={
        "logprob_processor_scaling_config": scaling})
    result = CliRunner().invoke(main, ["fine-tune", "run", str(path), "--ray-address",
                                       ray_cluster])
    assert result.exit_code == 1
    assert "accelerator_type:A10G" in result.output and "add nodes" in result.output
    assert ray_options(scaling["custom_resources"]) == {
        "num_cpus": 1.0, "num_gpus": 1.0, "resources": {"accelerator_type:A10G": 1}}
