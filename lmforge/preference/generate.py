"""``lmforge preference generate``: questions -> candidates -> scores -> pairs under one run
directory, resumable at every line.

Files in ``run_dir`` (each stage's format is in ``stages.py``)::

    articles.jsonl     the articles of this run (id, words); a rerun must use the same ones
    questions.jsonl    the judge's questions per article
    candidates.jsonl   the policy's summaries per article
    scores.jsonl       the judge's score of each summary
    train.jsonl        chosen/rejected pairs in OpenAI's preference format, ready for method dpo
    valid.jsonl        the pairs of the held-out articles (pairing.valid_fraction of them)
    generate.json      what each stage did: requests, errors, drops, seconds, and the pair counts
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.preference.articles import Article, load_articles, split_for_run
from lmforge.preference.config import ConfigError, PipelineConfig
from lmforge.preference.endpoint import Endpoint
from lmforge.preference.log import JsonlLog, write_jsonl
from lmforge.preference.rules import Scored, article_pairs, in_length, split_articles
from lmforge.preference.stages import (questions_stage, scores_stage, summaries_stage,
                                       summary_messages, with_questions)


@dataclass
class GenerateResult:
    run_dir: Path
    train_file: Path
    valid_file: Path
    report: dict


async def generate(config: PipelineConfig, *, policy_model: str | None = None,
                   run_dir: Path | None = None) -> GenerateResult:
    """Run (or resume) every stage over the config's pair articles.

    Args:
        policy_model: ask the policy endpoint for this model instead of ``policy.model`` (an
            iteration's fine-tuned model).
        run_dir: write here instead of ``config.run_dir``.

    Raises:
        ConfigError: the run directory holds a run over other articles.
        PipelineError: a stage's requests all failed.
    """
    run_dir = run_dir or config.run_dir
    articles, _ = split_for_run(load_articles(config.data), config.data)
    _pin_articles(run_dir, articles)
    judge = Endpoint(config.judge, ray_address=config.ray_address)
    policy = Endpoint(config.policy, policy_model, ray_address=config.ray_address)
    try:
        return await _stages(config, run_dir, articles, judge, policy)
    finally:
        await judge.aclose()
        await policy.aclose()


async def _stages(config: PipelineConfig, run_dir: Path, articles: list[Article],
                  judge: Endpoint, policy: Endpoint) -> GenerateResult:
    report: dict = {"judge": judge.model_name, "policy": policy.model_name,
                    "articles": len(articles), "stages": {}}

    def timed(name, started, stats, log):
        report["stages"][name] = {**asdict(stats), "lines": len(log),
                                  "seconds": round(time.perf_counter() - started, 2)}

    started = time.perf_counter()
    questions, stats = await questions_stage(config, judge, articles, run_dir)
    timed("questions", started, stats, questions)
    usable = with_questions(articles, questions)
    report["stages"]["questions"]["articles_dropped"] = len(articles) - len(usable)
    report["stages"]["questions"]["questions_dropped"] = sum(r["dropped"] for r in questions)

    started = time.perf_counter()
    cand = config.candidates
    candidates, stats = await summaries_stage(
        policy, usable, lambda a: summary_messages(config, a), n=cand.num_candidates,
        params={"temperature": cand.temperature, "top_p": cand.top_p,
                "max_tokens": cand.max_tokens},
        path=run_dir / "candidates.jsonl", stage="candidates")
    timed("candidates", started, stats, candidates)

    started = time.perf_counter()
    scores, stats = await scores_stage(config, judge, questions, candidates,
                                       run_dir / "scores.jsonl")
    timed("scores", started, stats, scores)
    report["stages"]["scores"]["answers_dropped"] = sum(r["dropped"] for r in scores)

    report["pairs"] = write_pairs(config, {a.id: a for a in usable}, scores, run_dir)
    (run_dir / "generate.json").write_text(json.dumps(report, indent=2))
    return GenerateResult(run_dir, run_dir / "train.jsonl", run_dir / "valid.jsonl", report)


def _pin_articles(run_dir: Path, articles: list[Article]) -> None:
    log = JsonlLog(run_dir / "articles.jsonl", "id")
    if len(log) and list(log.records) != [a.id for a in articles]:
        raise ConfigError(f"{run_dir} holds a run over other articles ({len(log)} pinned in "
                          "articles.jsonl); use another run_dir or restore the data settings")
    for article in articles:
        if article.id not in log:
            log.append({"id": article.id, "words": article.words})


def write_pairs(config: PipelineConfig, articles: dict[str, Article], scores: JsonlLog,
                run_dir: Path) -> dict:
    """Rewrite ``train.jsonl`` / ``valid.jsonl`` from the scores (deterministic, so the same
    scores always give the same files) and return the counts behind them."""
    rule = config.pairing
    by_article: dict[str, list[tuple[int, Scored]]] = defaultdict(list)
    for row in scores:
        by_article[row["article_id"]].append((row["candidate"], Scored.of(row["summary"],
                                                                          row["score"])))
    pairs: dict[str, list[tuple[Scored, Scored]]] = {}
    filtered = 0
    for article_id in articles:  # the articles' order, not the order results arrived in
        summaries = [s for _, s in sorted(by_article.get(article_id, []), key=lambda x: x[0])]
        filtered += sum(not in_length(s, rule) for s in summaries)
        found = article_pairs(summaries, rule)
        if found:
            pairs[article_id] = found
    train_ids, valid_ids = split_articles(pairs, rule.valid_fraction, config.seed)

    def rows(ids: list[str]) -> list[dict]:
        return [{"input": {"messages": summary_messages(config, articles[a])},
                 "preferred_output": [{"role": "assistant", "content": chosen.text}],
                 "non_preferred_output": [{"role": "assistant", "content": rejected.text}]}
                for a in ids for chosen, rejected in pairs[a]]

    train, valid = rows(train_ids), rows(valid_ids)
    write_jsonl(run_dir / "train.jsonl", train)
    write_jsonl(run_dir / "valid.jsonl", valid)
    return {"train": len(train), "valid": len(valid), "train_articles": len(train_ids),
            "valid_articles": len(valid_ids), "articles_without_pairs":
                len(articles) - len(pairs), "summaries_out_of_length": filtered}
