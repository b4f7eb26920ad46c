"""The pipeline end to end against a scripted judge and policy (``support/scripted_endpoint``):
exactly the expected pairs, hold-out, report numbers and files; a flaky judge's failures are
redone by a rerun without writing a line twice; a ``lmforge preference generate`` killed with
SIGKILL resumes; bad configs are refused with the key named."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from click.testing import CliRunner
from support.scripted_endpoint import Script, ScriptedEndpoint, summ

from lmforge.cli import main
from lmforge.preference.config import CANDIDATES_PROMPT, ConfigError, load_config
from lmforge.preference.evaluate import evaluate
from lmforge.preference.generate import generate
from lmforge.preference.rules import split_articles

ARTICLES = {"1": "First article: a storm hit the coast and closed two roads.",
            "2": "Second article: the council voted to build a new library.",
            "3": "Third article: a local team won the regional final.",
            "4": "Eval one: prices rose by three percent in May.",
            "5": "Eval two: a bridge reopened after repairs.",
            "6": "Eval three: the museum doubled its visitors.",
            "7": "Eval four: a new school opened in the north."}


A1 = [summ(5, 10, "a"), summ(5, 14, "b"), summ(2, 4, "short"), summ(3, 200, "long"),
      summ(4, 12, "c"), summ(1, 8, "d")]
A2 = [summ(4, 10, "x"), summ(4, 11, "y")]  # a tie: no pair
A3 = [summ(2, 6, "p"), summ(0, 7, "q")]  # both low: the higher score wins
POLICY_EVAL = [summ(5, 10, "e1"), summ(1, 10, "e2"), summ(3, 10, "e3"), summ(4, 8, "e4")]
RIVAL_EVAL = [summ(5, 20, "r1"), summ(4, 30, "r2"), summ(3, 11, "r3"), summ(2, 8, "r4")]


def script() -> Script:
    train = {ARTICLES["1"]: A1, ARTICLES["2"]: A2, ARTICLES["3"]: A3}
    return Script(summaries={
        "policy": {**train, **{ARTICLES[str(4 + i)]: [s] for i, s in enumerate(POLICY_EVAL)}},
        "rival": {ARTICLES[str(4 + i)]: [s] for i, s in enumerate(RIVAL_EVAL)}})


def write_config(tmp_path, url: str, **extra) -> object:
    articles = tmp_path / "articles.jsonl"
    articles.write_text("".join(json.dumps({"id": k, "article": v}) + "\n"
                                for k, v in ARTICLES.items()))
    raw = {"run_dir": "run", "data": {"input": str(articles), "id_field": "id", "limit": 3,
                                      "eval_limit": 4},
           "judge": {"base_url": url, "model": "judge"},
           "policy": {"base_url": url, "model": "policy"},
           "candidates": {"num_candidates": 6}, "pairing": {"valid_fraction": 0.5}, **extra}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pair_texts(rows_: list[dict]) -> list[tuple[str, str]]:
    return [(r["preferred_output"][0]["content"], r["non_preferred_output"][0]["content"])
            for r in rows_]


def test_generate_gives_exactly_the_rule_s_pairs(tmp_path):
    with ScriptedEndpoint(script()) as url:
        config = load_config(write_config(tmp_path, url))
        result = asyncio.run(generate(config))
    expected = {"1": [(A1[0], A1[5]), (A1[1], A1[5]), (A1[4], A1[5])], "3": [(A3[0], A3[1])]}
    train_ids, valid_ids = split_articles(["1", "3"], 0.5, 21)
    assert len(valid_ids) == 1
    train, valid = rows(result.train_file), rows(result.valid_file)
    assert pair_texts(train) == [p for a in train_ids for p in expected[a]]
    assert pair_texts(valid) == [p for a in valid_ids for p in expected[a]]
    # OpenAI's preference format, the policy's own prompt as the input
    prompt = CANDIDATES_PROMPT.format(article=ARTICLES[valid_ids[0]])
    assert valid[0]["input"] == {"messages": [{"role": "user", "content": prompt}]}
    report = json.loads((result.run_dir / "generate.json").read_text())
    assert report["pairs"] == {"train": len(train), "valid": len(valid), "train_articles": 1,
                               "valid_articles": 1, "articles_without_pairs": 1,
                               "summaries_out_of_length": 2}
    stages = report["stages"]
    assert [stages[s]["requests"] for s in ("questions", "candidates", "scores")] == [3, 3, 10]
    assert stages["questions"]["structured"] is False  # the probe found no schema support
    assert stages["scores"]["via"] == "requests"  # the endpoint has no /v1/batches


def test_a_rerun_redoes_only_what_failed(tmp_path):
    flaky = script()
    flaky.fail_keys = {A1[1]}
    with ScriptedEndpoint(flaky) as url:
        config = load_config(write_config(tmp_path, url))
        first = asyncio.run(generate(config))
        assert first.report["stages"]["scores"]["errors"] == 1
        assert A1[1] not in json.dumps(rows(first.train_file) + rows(first.valid_file))
        flaky.fail_keys.clear()
        flaky.requests.clear()
        again = asyncio.run(generate(config))
    asked = [r for r in flaky.requests if "Summary:" in str(r)]
    assert len(asked) == 1 and A1[1] in asked[0]["messages"][0]["content"]
    assert again.report["stages"]["candidates"]["requests"] == 0
    keys = [r["key"] for r in rows(again.run_dir / "scores.jsonl")]
    assert len(keys) == len(set(keys)) == 10
    assert (A1[1], A1[5]) in pair_texts(rows(again.train_file) + rows(again.valid_file))


def test_a_killed_generate_resumes_without_duplicates(tmp_path):
    slow = script()
    slow.delay_s = 0.25
    with ScriptedEndpoint(slow) as url:
        path = write_config(tmp_path, url, judge={"base_url": url, "model": "judge",
                                                  "max_concurrency": 1})
        scores = tmp_path / "run" / "scores.jsonl"
        proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "preference", "generate",
                                 "--config", str(path)], env=os.environ.copy(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (scores.exists() and len(scores.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = len(scores.read_text().splitlines())
        assert before < 10
        slow.requests.clear()
        slow.delay_s = 0.0
        result = CliRunner().invoke(main, ["preference", "generate", "--config", str(path)])
    assert result.exit_code == 0, result.output
    asked = [r for r in slow.requests if "Summary:" in str(r)]
    assert len(asked) == 10 - before
    keys = [r["key"] for r in rows(scores)]
    assert len(keys) == len(set(keys)) == 10
    assert "pairs: " in result.output and "lmforge fine-tune create --method dpo" in result.output


def test_evaluate_reports_shares_win_rates_and_a_chart(tmp_path):
    with ScriptedEndpoint(script()) as url:
        config = load_config(write_config(tmp_path, url))
        report = asyncio.run(evaluate(config, ["policy", "rival"]))
    policy, rival = report["models"]["policy"], report["models"]["rival"]
    assert policy["share_ge3"]["value"] == 0.75 and policy["share_ge3"]["n"] == 4
    assert policy["share_ge4"]["value"] == 0.5 and rival["share_ge4"]["value"] == 0.5
    assert policy["mean_score"]["value"] == pytest.approx(13 / 4)
    assert policy["compression"]["value"] == pytest.approx(sum(
        w / len(ARTICLES[str(4 + i)].split()) for i, w in enumerate([10, 10, 10, 8])) / 4)
    # e1: shorter wins; e2: rival's 4 beats 1; e3: 1 word apart, a tie; e4: 4 beats 2
    assert report["win_rate"]["policy"]["rival"] | {} == {
        "wins": 2, "ties": 1, "losses": 1, "value": 0.625,
        "low": pytest.approx(0.155869, abs=1e-6), "high": 1.0, "n": 4}
    assert report["win_rate"]["rival"]["policy"]["value"] == 0.375
    out = tmp_path / "run" / "eval"
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "rival" in page and "(n=4)" in page
    assert json.loads((out / "report.json").read_text())["win_rate"]["policy"]["rival"][
        "wins"] == 2


def test_evaluate_cli_takes_a_model_from_another_endpoint(tmp_path):
    """``evaluate.models`` names a model on another server (as OpenAI's gpt-4o would be)."""
    other = Script(summaries={"rival": script().summaries["rival"]})
    with ScriptedEndpoint(script()) as url, ScriptedEndpoint(other) as external:
        path = write_config(tmp_path, url, evaluate={
            "models": {"external": {"base_url": external, "model": "rival"}}})
        result = CliRunner().invoke(main, ["preference", "evaluate", "--config", str(path),
                                           "--models", "policy,external"])
    assert result.exit_code == 0, result.output
    assert "win rate policy vs external: 0.62 [0.16, 1.00] n=4" in result.output
    assert len(other.requests) == 4  # its summaries came from the other server


@pytest.mark.parametrize("bad, message", [
    ({"judge": {"model": "j", "temprature": 1}}, "unknown key(s) in 'judge': temprature"),
    ({"pairing": {"max_words": 2}}, "min_words (5) must be in [0, max_words (2)]"),
    ({"policy": {"base_url": "http://x"}}, "'policy' needs at least a 'model'"),
    ({"candidates": {"num_candidates": 1}}, "num_candidates must be at least 2"),
    ({"answers": {"shuffle_choices": "yes"}}, "shuffle_choices must be article, summary or none"),
    ({"candidates": {"prompt": "Summarize {text}"}}, "candidates.prompt may use only {article}"),
])
def test_bad_configs_name_the_key(tmp_path, bad, message):
    raw = {"judge": {"model": "j"}, "policy": {"model": "p"}, **bad}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    result = CliRunner().invoke(main, ["preference", "generate", "--config", str(path)])
    assert result.exit_code == 2 and message in result.output
