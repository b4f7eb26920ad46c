"""``lmforge preference evaluate``: seed 002's evaluation of models on the held-out articles.

Each model writes one summary per evaluation article (``evaluate.temperature``, default greedy);
the judge answers that article's questions from it, exactly as when the pairs were made. Per
model: the share of summaries with at least 3 and at least 4 correct answers (Wilson 95%
intervals), the mean score, and compression (summary words / article words, normal 95%
interval). Per pair of models: the win rate P(win) + 0.5 P(tie) under the pairing rule, over the
articles both were scored on. Every number carries ``n``, the articles it rests on.

Files in ``<run_dir>/eval`` (or ``out_dir``): ``questions.jsonl``, ``<model>/summaries.jsonl``,
``<model>/scores.jsonl``, and ``report.json``, ``report.png``, ``report.html``.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmforge.preference.articles import Article, load_articles, split_for_run
from lmforge.preference.config import ConfigError, PipelineConfig
from lmforge.preference.endpoint import Endpoint
from lmforge.preference.log import JsonlLog
from lmforge.preference.report import write_report
from lmforge.preference.rules import (Scored, compare, mean_interval, proportion, win_rate)
from lmforge.preference.stages import (questions_stage, scores_stage, summaries_stage,
                                       summary_messages, with_questions)


def model_endpoint(config: PipelineConfig, name: str) -> Endpoint:
    """``evaluate.models[name]``'s endpoint, else the policy server asked for model ``name``."""
    if name in config.evaluate.models:
        return Endpoint(config.evaluate.models[name], ray_address=config.ray_address)
    return Endpoint(config.policy, name, ray_address=config.ray_address)


def slug(name: str) -> str:
    """A directory name for a model id (``ft:base:suffix:id`` has colons)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


async def evaluate(config: PipelineConfig, models: list[str], out_dir: Path | None = None
                   ) -> dict:
    """Score ``models`` (names; see ``model_endpoint``) on the evaluation articles and write the
    report; returns ``report.json``'s content.

    Raises:
        ConfigError: no models, a repeated model, or ``data.eval_limit`` is 0.
        PipelineError: a stage's requests all failed.
    """
    if not models or len(set(models)) != len(models):
        raise ConfigError("--models needs one or more distinct model names")
    _, articles = split_for_run(load_articles(config.data), config.data)
    if not articles:
        raise ConfigError("data.eval_limit is 0: there are no evaluation articles")
    out_dir = out_dir or config.run_dir / "eval"
    judge = Endpoint(config.judge, ray_address=config.ray_address)
    try:
        scored = await _score_models(config, models, articles, judge, out_dir)
    finally:
        await judge.aclose()
    report = summarize(config, scored, {a.id: a for a in articles})
    report["articles"] = {"evaluation": len(articles), "scored": sum(
        all(a.id in s for s in scored.values()) for a in articles)}
    report["judge"] = judge.model_name
    write_report(report, out_dir)
    return report


async def _score_models(config: PipelineConfig, models: list[str], articles: list[Article],
                        judge: Endpoint, out_dir: Path) -> dict[str, dict[str, Scored]]:
    questions, _ = await questions_stage(config, judge, articles, out_dir)
    usable = with_questions(articles, questions)
    cfg = config.evaluate
    params = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
    scored: dict[str, dict[str, Scored]] = {}
    for name in models:
        directory = out_dir / slug(name)
        endpoint = model_endpoint(config, name)
        try:
            summaries, _ = await summaries_stage(
                endpoint, usable, lambda a: summary_messages(config, a), n=1, params=params,
                path=directory / "summaries.jsonl", stage=f"summaries {name}")
        finally:
            await endpoint.aclose()
        scores, _ = await scores_stage(config, judge, questions, summaries,
                                       directory / "scores.jsonl", stage=f"scores {name}")
        scored[name] = _first_summaries(scores)
    return scored


def _first_summaries(scores: JsonlLog) -> dict[str, Scored]:
    return {row["article_id"]: Scored.of(row["summary"], row["score"]) for row in scores
            if row["candidate"] == 0}


def summarize(config: PipelineConfig, scored: dict[str, dict[str, Scored]],
              articles: dict[str, Article]) -> dict:
    """The report's numbers from each model's scored summaries (article id -> ``Scored``)."""
    num = config.questions.num_questions
    per_model = {}
    for name, by_article in scored.items():
        values = list(by_article.values())
        n = len(values)
        per_model[name] = {
            "share_ge3": proportion(sum(s.score >= 3 for s in values), n).as_dict(),
            "share_ge4": proportion(sum(s.score >= 4 for s in values), n).as_dict(),
            "mean_score": mean_interval([s.score for s in values]).as_dict(),
            "compression": mean_interval([s.words / max(articles[a].words, 1)
                                          for a, s in by_article.items()]).as_dict(),
            "mean_words": mean_interval([s.words for s in values]).as_dict(),
        }
    matrix: dict[str, dict[str, dict]] = {}
    for a in scored:
        matrix[a] = {}
        for b in scored:
            if a == b:
                continue
            shared = [k for k in scored[a] if k in scored[b]]
            outcomes = [compare(scored[a][k], scored[b][k], config.pairing) for k in shared]
            matrix[a][b] = win_rate(outcomes).as_dict()
    return {"models": per_model, "win_rate": matrix, "num_questions": num}
