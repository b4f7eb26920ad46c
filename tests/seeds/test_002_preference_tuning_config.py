"""Seed 002 (Anyscale's preference tuning): its DPO config, ``configs/mistral_dpo_summarization.yaml``
as the notebook prints it, given to ``lmforge fine-tune run`` in place of ``llmforge anyscale
finetune``. As written it asks for six GPUs, DeepSpeed and reference-model workers: DeepSpeed is
refused, naming the scale-out path (``num_devices`` on Ray), never silently run on one process. With the model, the data paths
and the context length changed to the tiny test model's (and the cluster keys removed), the same
file trains a DPO LoRA adapter on Anyscale-format pairs (``chosen``/``rejected`` conversations)
and writes a PEFT adapter."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner
from documents import printed_file, seed_text

from lmforge.cli import main as cli
from lmforge.models.lora import load_peft_adapter

CONFIG = printed_file(seed_text("002"), "!cat configs/mistral_dpo_summarization.yaml")
CLUSTER_KEYS = ("num_devices", "deepspeed", "worker_resources")


def conversation(i: int, answer: str) -> list[dict]:
    return [{"role": "user", "content": f"Summarize document {i}."},
            {"role": "assistant", "content": answer}]


def write_case(tmp_path, drop_cluster_keys: bool):
    config = yaml.safe_load(CONFIG)
    assert config["task"] == "preference_tuning" and config["num_devices"] == 6
    for name, n in (("train", 12), ("valid", 4)):
        rows = [{"chosen": conversation(i, "A short summary."),
                 "rejected": conversation(i, "A long and rambling summary of it all.")}
                for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = CONFIG
    for key, value in (("train_path", "train.jsonl"), ("valid_path", "valid.jsonl"),
                       ("output_dir", "out")):
        text = text.replace(f"{key}: {config[key]}", f"{key}: {value}")
    text = text.replace("context_length: 4096", "context_length: 64")
    if drop_cluster_keys:
        kept = {k: v for k, v in yaml.safe_load(text).items() if k not in CLUSTER_KEYS}
        del kept["preference_tuning_config"]["logprob_processor_scaling_config"]
        text = yaml.safe_dump(kept)
    return text


def test_the_seed_config_as_written_is_refused_naming_the_scale_out_path(tiny_llama_dir,
                                                                         tmp_path):
    text = write_case(tmp_path, drop_cluster_keys=False)
    path = tmp_path / "mistral_dpo_summarization.yaml"
    path.write_text(text.replace("mistralai/Mistral-7B-Instruct-v0.1", str(tiny_llama_dir)))
    result = CliRunner().invoke(cli, ["fine-tune", "run", str(path)])
    assert result.exit_code == 2, result.output
    assert "deepspeed shards" in result.output and "num_devices" in result.output
    assert "Ray" in result.output
    assert not (tmp_path / "out").exists()


def test_the_seed_config_on_one_machine_trains_a_dpo_adapter(tiny_llama_dir, tmp_path):
    text = write_case(tmp_path, drop_cluster_keys=True)
    path = tmp_path / "dpo.yaml"
    path.write_text(text.replace("mistralai/Mistral-7B-Instruct-v0.1", str(tiny_llama_dir)))
    result = CliRunner().invoke(cli, ["fine-tune", "run", str(path)])
    assert result.exit_code == 0, result.output
    assert "flash_attention_2: no effect here" in result.output
    assert "Reference log-probs of 12 pairs computed" in result.output
    adapter = tmp_path / "out" / "adapter"
    assert result.stdout.strip().splitlines()[-1].startswith(f"{adapter} (validation loss ")
    config, weights = load_peft_adapter(adapter)
    assert config.r == 8 and config.lora_alpha == 16 and weights  # the seed's lora_config
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json",
                                                         "adapter_model.safetensors"]
    again = CliRunner().invoke(cli, ["fine-tune", "run", str(path)])  # resumes: nothing left
    assert again.exit_code == 0 and "read from train.pt" in again.output, again.output
