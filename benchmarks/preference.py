"""Preference pipeline benchmark: seed 002's recipe on real news articles, one DPO round, and
the evaluation of the base model against the DPO model, all on one ``lmforge serve``.

1. ``judge_check``: how much signal the judge gives. On the evaluation articles' questions, the
   judge answers from the whole article and from no summary at all; the share of correct
   answers in each case (chance is 1/5, the choices are shuffled). A judge that does no better
   with the article than without cannot rank summaries, whatever the pipeline does.
2. ``generate``: questions -> candidates -> scores -> pairs on ``--articles`` articles of the
   Lee corpus; seconds per stage, requests, what was dropped, pairs made.
3. ``dpo``: one DPO job (``method: dpo``, default hyperparameters but ``n_epochs``) on the pairs,
   through ``/v1/fine_tuning/jobs``; its wall time.
4. ``evaluate``: base vs DPO model on ``--eval-articles`` further articles: share of summaries
   with >= 3 / >= 4 correct answers, compression, win rate, each with its 95% interval and n.

    python benchmarks/preference.py                        # SmolLM2-135M as judge and policy
    python benchmarks/preference.py --articles 20 --eval-articles 10 --num-candidates 4  # quick

It is ``lmforge preference iterate --rounds 1`` with timings around it. The chart and report are
copied to ``benchmarks/results/preference/``; the numbers are printed and written as JSON to
``--out``; no test asserts them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from servers import start_server, stop_server

from lmforge.preference.articles import load_articles, split_for_run
from lmforge.preference.config import config_from_dict
from lmforge.preference.endpoint import Endpoint
from lmforge.preference.errors import PipelineError
from lmforge.preference.iterate import iterate
from lmforge.preference.log import JsonlLog, write_jsonl
from lmforge.preference.rules import proportion
from lmforge.preference.stages import questions_stage, scores_stage, with_questions

RESULTS = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="judge and policy (a GGUF path, HF directory or alias)")
    parser.add_argument("--articles", type=int, default=100)
    parser.add_argument("--eval-articles", type=int, default=24)
    parser.add_argument("--num-candidates", type=int, default=4,
                        help="summaries per article (the seed's 10 take 2.5x as long)")
    parser.add_argument("--n-epochs", type=int, default=1)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--serve-args", default="--max-model-len 2048")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the run here (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=RESULTS / "preference.json")
    return parser.parse_args(argv)


def pipeline_config(args: argparse.Namespace, run_dir: Path):
    endpoint = {"base_url": f"http://127.0.0.1:{args.port}/v1", "model": args.model}
    return config_from_dict({
        "run_dir": str(run_dir), "judge": endpoint, "policy": endpoint,
        "data": {"limit": args.articles, "eval_limit": args.eval_articles},
        "candidates": {"num_candidates": args.num_candidates},
        "dpo": {"hyperparameters": {"n_epochs": args.n_epochs}, "suffix": "summaries"}})


async def judge_check(config, run_dir: Path) -> dict:
    """The judge's accuracy answering from the article itself and from nothing."""
    _, articles = split_for_run(load_articles(config.data), config.data)
    judge = Endpoint(config.judge)
    try:
        return await _check(config, run_dir, articles, judge)
    finally:
        await judge.aclose()


async def _check(config, run_dir: Path, articles, judge: Endpoint) -> dict:
    questions, _ = await questions_stage(config, judge, articles, run_dir / "eval")
    usable = with_questions(articles, questions)
    result = {}
    for name, text in (("with_article", None), ("without_summary", "(no summary)")):
        directory = run_dir / "judge_check" / name
        write_jsonl(directory / "summaries.jsonl", [
            {"article_id": a.id, "summaries": [text or a.text]} for a in usable])
        scores, _ = await scores_stage(config, judge, questions,
                                       JsonlLog(directory / "summaries.jsonl", "article_id"),
                                       directory / "scores.jsonl", stage=f"judge {name}")
        right = sum(r["score"] for r in scores)
        total = config.questions.num_questions * len(scores)
        result[name] = proportion(right, total).as_dict()
    result["chance"] = 1 / 5
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lmforge-preference-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    import os

    os.environ["LMFORGE_HOME"] = str(work / "home")  # the server's store: jobs, adapters
    server = start_server(args, work / "serve.log")
    try:
        config = pipeline_config(args, work / "run")
        started = time.perf_counter()
        check = asyncio.run(judge_check(config, config.run_dir))
        check_s = time.perf_counter() - started
        started = time.perf_counter()
        try:
            table, error = asyncio.run(iterate(config, rounds=1)), None
        except PipelineError as exc:  # e.g. too few pairs for a job: report what there is
            table, error = [], str(exc)
        total_s = time.perf_counter() - started
        jobs = [job_seconds(args.port, row["job_id"]) for row in table if row.get("job_id")]
    finally:
        stop_server(server)
    generate = json.loads((config.run_dir / "round-1" / "generate.json").read_text())
    report_path = config.run_dir / "eval" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    result = {"model": args.model, "articles": args.articles,
              "eval_articles": args.eval_articles, "num_candidates": args.num_candidates,
              "judge_check": {**check, "seconds": check_s}, "generate": generate,
              "iterate_seconds_this_run": total_s, "dpo_job_seconds": jobs, "rounds": table,
              "evaluation": report, "error": error}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    charts = RESULTS / "preference"
    charts.mkdir(parents=True, exist_ok=True)
    for source in (config.run_dir / "eval" / "report.png", config.run_dir / "eval" /
                   "report.html", config.run_dir / "rounds.png"):
        if source.exists():
            shutil.copy(source, charts / source.name)
    print_summary(result)
    print(f"\nwritten: {args.out}, {charts}/report.png; run kept in {work}")


def job_seconds(port: int, job_id: str) -> float | None:
    """A fine-tuning job's wall time, created to finished (a resumed run's restarts included)."""
    import httpx

    job = httpx.get(f"http://127.0.0.1:{port}/v1/fine_tuning/jobs/{job_id}", timeout=10).json()
    return job["finished_at"] - job["created_at"] if job.get("finished_at") else None


def _fmt(e: dict) -> str:
    return f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}] n={e['n']}"


def print_summary(result: dict) -> None:
    check = result["judge_check"]
    print(f"\njudge check ({check['seconds']:.0f} s): correct with the article "
          f"{_fmt(check['with_article'])}, without a summary {_fmt(check['without_summary'])}, "
          f"chance {check['chance']:.2f}")
    print("\nstage        requests  errors  via       seconds")
    for name, stage in result["generate"]["stages"].items():
        print(f"{name:<12} {stage['requests']:>8}  {stage['errors']:>6}  {stage['via']:<8} "
              f"{stage['seconds']:>8.1f}")
    print("pairs:", json.dumps(result["generate"]["pairs"]))
    print(f"DPO job (created to finished, restarts included): {result['dpo_job_seconds']} s")
    if result["error"]:
        print("stopped:", result["error"])
    print("\nround  model                                    >=3 correct              "
          "win rate vs base")
    for row in result["rounds"]:
        print(f"{row['round']:<6} {row['model'][:40]:<40} {_fmt(row['share_ge3']):<24} "
              f"{_fmt(row['win_rate_vs_base'])}")


if __name__ == "__main__":
    sys.exit(main())
