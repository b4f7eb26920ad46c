"""The three model stages, shared by ``generate`` and ``evaluate``; each reads its log, asks only
for what is missing, and appends one line per result:

- ``questions``: the judge writes ``num_questions`` multiple-choice questions per article
  (``questions.jsonl``: ``article_id``, ``questions``; an article whose reply does not give
  that many well-formed questions is written with ``questions: []`` and ``dropped``, and skipped
  by the later stages);
- ``summaries``: a model writes ``n`` summaries per article (``article_id``, ``summaries``);
- ``scores``: the judge answers each article's questions from one summary alone, the choices
  shown in an order shuffled once per article (``answers.shuffle_choices``;
  ``parsing.shuffle_choices``), so an article's candidates are judged on identical questions
  (``key`` = ``article_id/index``, ``summary``, ``words``, ``answers``, ``correct`` (the key
  letters as shown), ``score``, ``dropped``).
"""

from __future__ import annotations

from pathlib import Path

from lmforge.preference.articles import Article
from lmforge.preference.config import PipelineConfig
from lmforge.preference.endpoint import Call, Endpoint, StageStats
from lmforge.preference.log import JsonlLog
from lmforge.preference.parsing import (answers_schema, parse_answers, parse_questions,
                                        questions_schema, render_questions, score,
                                        shuffle_choices)
from lmforge.preference.rules import word_count


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def with_questions(articles: list[Article], questions: JsonlLog) -> list[Article]:
    """The articles whose questions stage gave well-formed questions (the rest are skipped)."""
    return [a for a in articles if (questions.get(a.id) or {}).get("questions")]


def summary_messages(config: PipelineConfig, article: Article) -> list[dict]:
    """The policy's prompt for one article: also the prompt of every DPO pair built from it."""
    return user(config.candidates.prompt.format(article=article.text))


async def questions_stage(config: PipelineConfig, judge: Endpoint, articles: list[Article],
                          run_dir: Path) -> tuple[JsonlLog, StageStats]:
    log = JsonlLog(run_dir / "questions.jsonl", "article_id")
    cfg = config.questions
    schema = ("questions", questions_schema(cfg.num_questions, cfg.max_question_chars,
                                            cfg.max_choice_chars))
    calls = [Call(a.id, user(cfg.prompt.format(article=a.text, num_questions=cfg.num_questions)),
                  {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature}, schema)
             for a in articles if a.id not in log]

    def write(call: Call, texts: list[str]) -> None:
        parsed = parse_questions(texts[0] if texts else "")
        kept = parsed.items[:cfg.num_questions]
        ok = len(kept) == cfg.num_questions
        log.append({"article_id": call.key, "questions": kept if ok else [],
                    "dropped": parsed.dropped + (0 if ok else len(kept)),
                    **({} if ok else {"raw": texts[0] if texts else ""})})

    stats = await judge.run(calls, write, stage="questions", state_dir=run_dir)
    return log, stats


async def summaries_stage(endpoint: Endpoint, articles: list[Article], messages, *, n: int,
                          params: dict, path: Path, stage: str = "summaries"
                          ) -> tuple[JsonlLog, StageStats]:
    """``n`` summaries per article from ``endpoint`` (one request with ``n`` choices);
    ``messages(article)`` is the prompt."""
    log = JsonlLog(path, "article_id")
    calls = [Call(a.id, messages(a), {**params, "n": n}) for a in articles if a.id not in log]

    def write(call: Call, texts: list[str]) -> None:
        log.append({"article_id": call.key, "summaries": [t.strip() for t in texts]})

    stats = await endpoint.run(calls, write, stage=stage, state_dir=path.parent)
    return log, stats


async def scores_stage(config: PipelineConfig, judge: Endpoint, questions: JsonlLog,
                       summaries: JsonlLog, path: Path, stage: str = "scores"
                       ) -> tuple[JsonlLog, StageStats]:
    """The judge's score of every summary whose article has questions."""
    log = JsonlLog(path, "key")
    cfg = config.answers
    num = config.questions.num_questions
    schema = ("answers", answers_schema(num))
    targets: dict[str, tuple[str, int, str, list[dict]]] = {}
    for row in summaries:
        asked = questions.get(row["article_id"])
        if not asked or not asked["questions"]:
            continue
        for index, summary in enumerate(row["summaries"]):
            key = f"{row['article_id']}/{index}"
            if key not in log:
                seed = {"article": row["article_id"], "summary": key}.get(cfg.shuffle_choices)
                shown = (asked["questions"] if seed is None
                         else shuffle_choices(asked["questions"], seed))
                targets[key] = (row["article_id"], index, summary, shown)
    calls = [Call(key, user(cfg.prompt.format(summary=summary, questions=render_questions(qs))),
                  {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature}, schema)
             for key, (_, _, summary, qs) in targets.items()]

    def write(call: Call, texts: list[str]) -> None:
        article_id, index, summary, qs = targets[call.key]
        parsed = parse_answers(texts[0] if texts else "", num)
        log.append({"key": call.key, "article_id": article_id, "candidate": index,
                    "summary": summary, "words": word_count(summary), "answers": parsed.items,
                    "correct": [q["answer"] for q in qs], "score": score(parsed.items, qs),
                    "dropped": parsed.dropped})

    stats = await judge.run(calls, write, stage=stage, state_dir=path.parent)
    return log, stats
