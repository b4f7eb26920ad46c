"""The pipeline on real articles (the 10 shortest of the Lee news corpus) with the real default
model, SmolLM2-135M-Instruct, as both judge and policy on one lmforge server: the questions come
back well-formed through structured output (none dropped), the scores through ``/v1/batches``,
every pair obeys the rule, and a DPO job accepts the pairs (validated and running; cancelled
there, training is tested elsewhere).

SmolLM2-135M has no signal as a judge (``benchmarks/preference.py``'s judge check: it answers
as often right with the article as with none) and answers by position. With the default
``shuffle_choices: article`` all candidates of an article then score alike and tie: a run gave
6 to 12 pairs from 10 articles, fewer than a job's 10 at times. Shuffled per summary, its
position-biased answers score each candidate at random, 27 to 30 pairs: noise, which is all such
a judge can give, and enough to run every stage and the DPO job on real data."""

from __future__ import annotations

import json
import time

import openai
import pytest
import yaml
from click.testing import CliRunner
from support.serving import serve

from lmforge.cli import main
from lmforge.config import EngineConfig, ModelConfig, ServerConfig
from lmforge.engine.async_engine import AsyncEngine
from lmforge.jobs.store import Store
from lmforge.preference.parsing import LETTERS, UNSURE, score, shuffle_choices
from lmforge.preference.rules import PairingRule, Scored, compare
from lmforge.server import build_app
from lmforge.training.corpora import lee_background_articles

NUM_QUESTIONS = 3  # the seed's 5 cost twice the judge's time; the code path is the same


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = AsyncEngine.from_config(EngineConfig(model=ModelConfig(max_model_len=2048)))
    store = Store(home=tmp_path_factory.mktemp("preference_smollm2"))
    with serve(build_app(engine, ServerConfig(), store=store)) as url:
        yield f"{url}/v1", engine.model_name


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_real_articles_become_dpo_pairs_a_job_accepts(server, tmp_path):
    url, model = server
    articles = sorted(lee_background_articles(), key=len)[:10]
    source = tmp_path / "articles.jsonl"
    source.write_text("".join(json.dumps({"article": a}) + "\n" for a in articles))
    endpoint = {"base_url": url, "model": model}
    config = {"run_dir": "run", "data": {"input": str(source), "limit": 10, "eval_limit": 0},
              "judge": {**endpoint, "batch_threshold": 16}, "policy": endpoint,
              "questions": {"num_questions": NUM_QUESTIONS, "max_question_chars": 100,
                            "max_choice_chars": 32},
              "candidates": {"num_candidates": 4, "max_tokens": 48},
              "answers": {"shuffle_choices": "summary"},  # see the module docstring
              "pairing": {"valid_fraction": 0.0}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["preference", "generate", "--config", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    report = json.loads((run / "generate.json").read_text())
    stages = report["stages"]
    assert stages["questions"]["structured"] and stages["questions"]["articles_dropped"] == 0
    questions = {r["article_id"]: r["questions"] for r in rows(run / "questions.jsonl")}
    assert len(questions) == 10
    for asked in questions.values():
        assert len(asked) == NUM_QUESTIONS
        assert all(q["question"] and set(q["choices"]) == set(LETTERS)
                   and q["answer"] in LETTERS for q in asked)
    assert stages["scores"]["via"] == "batch" and stages["scores"]["errors"] == 0
    scores = rows(run / "scores.jsonl")
    assert len(scores) == 40 and stages["scores"]["answers_dropped"] == 0
    by_text = {}
    for row in scores:
        assert len(row["answers"]) == NUM_QUESTIONS
        assert set(row["answers"]) <= {*LETTERS, UNSURE}
        shown = shuffle_choices(questions[row["article_id"]], row["key"])
        assert row["correct"] == [q["answer"] for q in shown]
        assert row["score"] == score(row["answers"], shown)
        by_text[row["summary"]] = Scored.of(row["summary"], row["score"])
    pairs = rows(run / "train.jsonl")
    assert report["pairs"]["train"] == len(pairs) >= 10  # OpenAI's minimum for a job
    for pair in pairs:
        chosen = by_text[pair["preferred_output"][0]["content"]]
        rejected = by_text[pair["non_preferred_output"][0]["content"]]
        assert compare(chosen, rejected, PairingRule()) == 1

    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
    with open(run / "train.jsonl", "rb") as f:
        training_file = client.files.create(file=f, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=model, training_file=training_file, method={
        "type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1}}})
    deadline = time.monotonic() + 120
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status in ("validating_files",
                                                                       "queued"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert job.status in ("running", "succeeded"), job.error
    assert job.hyperparameters.batch_size != "auto"  # the files were read and validated
    client.fine_tuning.jobs.cancel(job.id)
