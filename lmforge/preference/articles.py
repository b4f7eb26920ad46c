"""The articles a run summarizes: a registry corpus or the user's JSONL, split into the articles
that become preference pairs and the disjoint ones kept for evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.preference.config import ConfigError, DataConfig
from lmforge.preference.rules import word_count
from lmforge.training.corpora import lee_background_articles


@dataclass(frozen=True)
class Article:
    id: str
    text: str

    @property
    def words(self) -> int:
        return word_count(self.text)


def load_articles(data: DataConfig) -> list[Article]:
    """Every article of the configured source, in its order: ``data.input`` (a JSONL file, the
    text under ``text_field``, the id under ``id_field`` or the 1-based line number) or
    ``data.corpus``.

    Raises:
        ConfigError: the input is unreadable, a line is not a JSON object with a non-empty string
            ``text_field`` (line number given), or two articles share an id.
        CorpusUnavailableError: the corpus is not cached and cannot be downloaded.
    """
    if data.input is None:
        return [Article(f"lee-{i:03d}", text) for i, text in enumerate(lee_background_articles())]
    articles, seen = [], set()
    try:
        lines = Path(data.input).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read data.input: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{data.input} line {number}: not JSON ({exc.msg})") from exc
        text = row.get(data.text_field) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{data.input} line {number}: no non-empty string field "
                              f"{data.text_field!r} (set data.text_field / --text-field)")
        article_id = str(row.get(data.id_field) if data.id_field else number)
        if article_id in seen:
            raise ConfigError(f"{data.input} line {number}: duplicate id {article_id!r}")
        seen.add(article_id)
        articles.append(Article(article_id, text.strip()))
    return articles


def split_for_run(articles: list[Article], data: DataConfig) -> tuple[list[Article], list[Article]]:
    """(pair articles, evaluation articles): the first ``limit`` and the last ``eval_limit``.

    Raises:
        ConfigError: the source has fewer than ``limit + eval_limit`` articles (the two must
            not overlap, or evaluation would score articles the policy was tuned on).
    """
    if len(articles) < data.limit + data.eval_limit:
        raise ConfigError(f"data.limit ({data.limit}) + data.eval_limit ({data.eval_limit}) "
                          f"articles requested, but the source has {len(articles)}")
    evaluation = articles[len(articles) - data.eval_limit:] if data.eval_limit else []
    return articles[:data.limit], evaluation
