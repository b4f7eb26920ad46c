"""Anyscale llmforge YAML -> one offline run: the seed's keys map to ``TrainingConfig``, its Ray
keys (the logprob processor, the workers' resources, data-parallel workers) to the run's Ray
parts, DeepSpeed and unknown keys are refused naming the key, no-effect keys are said."""

import pytest
import yaml

from lmforge.errors import InvalidRequestError
from lmforge.training.llmforge_config import LogprobProcessorConfig, read_llmforge_config

BASE = {"model_id": "smollm2-135m-instruct", "train_path": "train.jsonl",
        "task": "preference_tuning"}


def read(tmp_path, **keys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE | keys))
    return read_llmforge_config(path)


def test_the_seed_keys_map_to_the_training_config(tmp_path):
    run = read(tmp_path, valid_path="v.jsonl", context_length=256, learning_rate="5e-6",
               num_epochs=2, train_batch_size_per_device=2, eval_batch_size_per_device=4,
               output_dir="o", num_devices=1, flash_attention_2=True, padding="longest",
               preference_tuning_config={"beta": 0.01},
               lora_config={"r": 4, "lora_alpha": 16, "lora_dropout": 0.05,
                            "target_modules": ["q_proj"], "modules_to_save": [],
                            "bias": "none"})
    c = run.config
    assert (c.method, c.max_seq_len, c.learning_rate, c.n_epochs, c.batch_size,
            c.eval_batch_size, c.beta) == ("dpo", 256, 5e-6, 2, 2, 4, 0.01)
    assert (c.lora.r, c.lora.lora_alpha, c.lora.target_modules) == (4, 16, ("q_proj",))
    assert run.train_path == tmp_path / "train.jsonl" and run.output_dir == tmp_path / "o"
    assert run.model == "smollm2-135m-instruct"
    assert run.notes == ["flash_attention_2: no effect here (attention runs the engine's own "
                         "kernels)"]
    assert read(tmp_path, task="instruction_tuning").config.method == "sft"
    assert run.logprob_processor is None and run.worker_resources is None and not run.on_ray
    assert run.num_devices == 1


def test_the_seed_ray_keys_describe_the_runs_ray_parts(tmp_path):
    run = read(tmp_path, worker_resources={"accelerator_type:A10G": 1}, num_devices=1,
               preference_tuning_config={"beta": 0.01, "logprob_processor_scaling_config": {
                   "custom_resources": {"accelerator_type:A10G": 1}, "concurrency": 2,
                   "batch_size": 2}})
    assert run.logprob_processor == LogprobProcessorConfig(
        concurrency=2, batch_size=2, custom_resources={"accelerator_type:A10G": 1.0})
    assert run.worker_resources == {"accelerator_type:A10G": 1.0} and run.on_ray
    assert run.config.beta == 0.01
    defaults = read(tmp_path, preference_tuning_config={"logprob_processor_scaling_config": {}})
    assert defaults.logprob_processor == LogprobProcessorConfig(1, 8, {})


def test_num_devices_above_one_trains_data_parallel_on_ray(tmp_path):
    run = read(tmp_path, num_devices=6, worker_resources={"CPU": 2})
    assert run.num_devices == 6 and run.on_ray  # Ray even without other Ray keys
    assert run.worker_resources == {"CPU": 2.0}  # each of the six workers'
    assert run.logprob_processor is None
    assert read(tmp_path, num_devices=2).on_ray


@pytest.mark.parametrize("keys, param, words", [
    ({"num_devices": 0}, "num_devices", "at least 1"),
    ({"num_devices": "2"}, "num_devices", "whole number"),
    ({"num_devices": 6, "deepspeed": {"config_path": "z3.json"}}, "deepspeed", "ZeRO"),
    ({"worker_resources": {"CPU": 0}}, "worker_resources", "amounts above 0"),
    ({"worker_resources": ["GPU"]}, "worker_resources", "Ray resource names"),
    ({"preference_tuning_config": {"logprob_processor_scaling_config": {"num_gpus": 2}}},
     "preference_tuning_config.logprob_processor_scaling_config.num_gpus", "concurrency"),
    ({"preference_tuning_config": {"logprob_processor_scaling_config": {"concurrency": 0}}},
     "preference_tuning_config.logprob_processor_scaling_config.concurrency", "at least 1"),
    ({"preference_tuning_config": {"logprob_processor_scaling_config": 2}},
     "preference_tuning_config.logprob_processor_scaling_config", "mapping"),
    ({"lora_config": {"bias": "all"}}, "lora_config.bias", "must be 'none'"),
    ({"epochs": 3}, "epochs", "unknown key"),
    ({"task": "causal_language_modeling"}, "task", "lmforge pretrain"),
    ({"learning_rate": "fast"}, "learning_rate", "must be a number"),
    ({"preference_tuning_config": {"beta": 0}}, "beta", "positive"),
])
def test_refused_keys_name_themselves(tmp_path, keys, param, words):
    with pytest.raises(InvalidRequestError) as info:
        read(tmp_path, **keys)
    assert info.value.param == param and words in info.value.message
