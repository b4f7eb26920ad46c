"""``iterate`` for real on a small scale: the policy is the tiny Llama on a real lmforge server
(files, batches, DPO jobs, adapters served), the judge is scripted (it scores a real model's
summary by its word count). One round trains a DPO job from the pairs, serves its model, and
evaluates it against the base; a rerun submits nothing again."""

from __future__ import annotations

import asyncio
import json

import yaml
from click.testing import CliRunner
from support.batching import batch_server
from support.scripted_endpoint import Script, ScriptedEndpoint

from lmforge.cli import main
from lmforge.preference.config import load_config
from lmforge.preference.iterate import iterate
from lmforge.training.corpora import lee_background_articles


def test_one_round_trains_serves_and_evaluates_a_dpo_model(tiny_llama_dir, tmp_path):
    source = tmp_path / "articles.jsonl"
    source.write_text("".join(json.dumps({"article": " ".join(a.split()[:30])}) + "\n"
                              for a in lee_background_articles()[:12]))
    with ScriptedEndpoint(Script()) as judge_url, \
            batch_server(tiny_llama_dir, tmp_path / "home") as client:
        base = client.model_name
        raw = {"run_dir": "run", "data": {"input": str(source), "limit": 10, "eval_limit": 2},
               "judge": {"base_url": judge_url, "model": "judge"},
               "policy": {"base_url": str(client.base_url).rstrip("/"), "model": base},
               "candidates": {"num_candidates": 4, "max_tokens": 24},
               "pairing": {"valid_fraction": 0.0},
               "dpo": {"poll_seconds": 0.2, "hyperparameters": {
                   "n_epochs": 1, "batch_size": 4, "lora_r": 4, "max_seq_len": 128}}}
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump(raw))
        table = asyncio.run(iterate(load_config(path), rounds=1))
        assert [row["round"] for row in table] == [0, 1]
        tuned = table[1]["model"]
        assert table[0]["model"] == base and tuned.startswith(f"ft:{base}:preference:")
        job = client.fine_tuning.jobs.retrieve(table[1]["job_id"])
        assert job.status == "succeeded" and job.method.type == "dpo"
        assert table[1]["pairs"] >= 10
        assert tuned in {m.id for m in client.models.list().data}  # served
        report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
        assert set(report["models"]) == {base, tuned}
        assert table[1]["win_rate_vs_base"] == report["win_rate"][tuned][base]
        assert (tmp_path / "run" / "rounds.png").read_bytes()[:4] == b"\x89PNG"

        jobs_before = len(client.fine_tuning.jobs.list().data)
        result = CliRunner().invoke(main, ["preference", "iterate", "--config", str(path),
                                           "--rounds", "1"])
        assert result.exit_code == 0, result.output
        assert len(client.fine_tuning.jobs.list().data) == jobs_before  # nothing resubmitted
        assert tuned in result.output and "win rate vs base" in result.output
