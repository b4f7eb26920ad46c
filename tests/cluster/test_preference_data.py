"""The preference pipeline with ``ray_address`` set, on the session's Ray cluster, against the
scripted judge and policy (``support/scripted_endpoint``): ``generate`` and ``evaluate`` write
the same files as without Ray, and a flaky judge's failures are redone by a rerun as they are
without Ray."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
import yaml
from click.testing import CliRunner
from support.scripted_endpoint import Script, ScriptedEndpoint, summ

from lmforge.cli import main
from lmforge.preference.config import ConfigError, load_config
from lmforge.preference.evaluate import evaluate
from lmforge.preference.generate import generate

ARTICLES = {"1": "First article: a storm hit the coast and closed two roads.",
            "2": "Second article: the council voted to build a new library.",
            "3": "Third article: a local team won the regional final.",
            "4": "Eval one: prices rose by three percent in May.",
            "5": "Eval two: a bridge reopened after repairs."}


A1 = [summ(5, 10, "a"), summ(5, 14, "b"), summ(2, 4, "short"), summ(4, 12, "c"),
      summ(1, 8, "d")]
A2 = [summ(4, 10, "x"), summ(1, 11, "y"), summ(3, 9, "z"), summ(0, 7, "v"), summ(5, 6, "u")]
A3 = [summ(2, 6, "p"), summ(0, 7, "q"), summ(1, 9, "r"), summ(2, 5, "s"), summ(0, 8, "t")]


def script() -> Script:
    return Script(summaries={
        "policy": {ARTICLES["1"]: A1, ARTICLES["2"]: A2, ARTICLES["3"]: A3,
                   ARTICLES["4"]: [summ(5, 10, "e1")], ARTICLES["5"]: [summ(2, 10, "e2")]},
        "rival": {ARTICLES["4"]: [summ(4, 20, "r1")], ARTICLES["5"]: [summ(3, 8, "r2")]}})


def config_file(directory, url: str, ray_address: str | None):
    """The same pipeline config but for ``ray_address``; one request in flight at a time, so
    that the run without Ray, too, appends its lines in call order."""
    directory.mkdir()
    articles = directory / "articles.jsonl"
    articles.write_text("".join(json.dumps({"id": k, "article": v}) + "\n"
                                for k, v in ARTICLES.items()))
    raw = {"run_dir": "run", "data": {"input": str(articles), "id_field": "id", "limit": 3,
                                      "eval_limit": 2},
           "judge": {"base_url": url, "model": "judge", "max_concurrency": 1},
           "policy": {"base_url": url, "model": "policy", "max_concurrency": 1},
           "candidates": {"num_candidates": 5}, "pairing": {"valid_fraction": 0.5},
           **({"ray_address": ray_address} if ray_address else {})}
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


FILES = ["articles.jsonl", "questions.jsonl", "candidates.jsonl", "scores.jsonl",
         "train.jsonl", "valid.jsonl", "eval/questions.jsonl", "eval/policy/summaries.jsonl",
         "eval/policy/scores.jsonl", "eval/rival/summaries.jsonl", "eval/rival/scores.jsonl",
         "eval/report.json"]


def report_without_timings(path) -> dict:
    report = json.loads(path.read_text())
    for stage in report["stages"].values():
        del stage["seconds"], stage["via"]
    return report


def test_generate_and_evaluate_on_ray_write_the_same_files(ray_cluster, tmp_path):
    endpoint = script()
    with ScriptedEndpoint(endpoint) as url:
        runs = {}
        for name, address in (("here", None), ("ray", ray_cluster)):
            config = config_file(tmp_path / name, url, address)
            result = asyncio.run(generate(config))
            asyncio.run(evaluate(config, ["policy", "rival"]))
            runs[name] = (config.run_dir, result.report, len(endpoint.requests))
            endpoint.requests.clear()
    (here, _, here_asked), (ray, ray_report, ray_asked) = runs["here"], runs["ray"]
    assert {s["via"] for s in ray_report["stages"].values()} == {"ray"}
    assert ray_asked == here_asked
    for name in FILES:
        assert (ray / name).read_bytes() == (here / name).read_bytes(), name
    assert (here / "train.jsonl").read_text()  # pairs were made: the comparison is not empty
    assert (report_without_timings(ray / "generate.json")
            == report_without_timings(here / "generate.json"))


def test_a_rerun_on_ray_redoes_only_what_failed(ray_cluster, tmp_path):
    flaky = script()
    flaky.fail_keys = {A1[1]}
    with ScriptedEndpoint(flaky) as url:
        config = config_file(tmp_path / "run", url, ray_cluster)
        first = asyncio.run(generate(config))
        assert first.report["stages"]["scores"]["errors"] == 1
        flaky.fail_keys.clear()
        flaky.requests.clear()
        again = asyncio.run(generate(config))
    asked = [r for r in flaky.requests if "Summary:" in str(r)]
    assert len(asked) == 1 and A1[1] in asked[0]["messages"][0]["content"]
    keys = [json.loads(x)["key"]
            for x in (again.run_dir / "scores.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 15


@pytest.mark.parametrize("value", ["", 6379])
def test_a_bad_ray_address_is_refused(tmp_path, value):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"judge": {"model": "j"}, "policy": {"model": "p"},
                                    "ray_address": value}))
    with pytest.raises(ConfigError, match="'ray_address' must be auto, local, or a cluster"):
        load_config(path)


def test_without_ray_the_pipeline_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with ScriptedEndpoint(script()) as url:
        config = config_file(tmp_path / "run", url, "auto")
        result = CliRunner().invoke(main, ["preference", "generate", "--config",
                                           str(tmp_path / "run" / "pipeline.yaml")])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: ray_address 'auto': this needs Ray, which is not installed: "
        "pip install 'lmforge[ray]'")
    assert not (config.run_dir / "questions.jsonl").exists()
