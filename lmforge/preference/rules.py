"""The pure arithmetic of the preference pipeline: word counts, the pairing rule, the length
filter, the hold-out split, and the evaluation's statistics (shares, win rates, intervals).

The rule and its numbers are those of Anyscale's preference-tuning template (seed 002, "Preference
Tuning for Summarization using Synthetic Data"), whose Q&A score is the number of the judge's
multiple-choice questions it answers correctly from the summary alone:

- if either summary scores ``low_score`` (2) or less, the higher score wins;
- if both score more, the shorter wins when it is more than ``min_word_gap`` (2) words shorter;
- anything else is a tie, which yields no pair (and counts half in a win rate).

Nothing here imports torch or talks to a server, so the unit tests check it to the number.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class PairingRule:
    """The seed's numbers; each is a key of the pipeline config's ``pairing`` section."""

    low_score: int = 2  # a summary scoring this or less loses on score alone
    min_word_gap: int = 2  # both good: the shorter wins only when more than this many words shorter
    min_words: int = 5  # summaries outside [min_words, max_words] never enter a pair
    max_words: int = 199
    max_pairs_per_article: int = 3
    valid_fraction: float = 0.02  # share of articles (not pairs) held out for validation

    def __post_init__(self) -> None:
        if self.min_words > self.max_words or self.min_words < 0:
            raise ValueError(f"pairing: min_words ({self.min_words}) must be in [0, max_words "
                             f"({self.max_words})]")
        if self.max_pairs_per_article < 1:
            raise ValueError("pairing: max_pairs_per_article must be at least 1")
        if not 0 <= self.valid_fraction < 1:
            raise ValueError("pairing: valid_fraction must be in [0, 1)")


@dataclass(frozen=True)
class Scored:
    """One summary and its judge score: ``score`` correct answers of ``num_questions``."""

    text: str
    score: int
    words: int

    @classmethod
    def of(cls, text: str, score: int) -> Scored:
        return cls(text=text, score=score, words=word_count(text))


def word_count(text: str) -> int:
    """Whitespace-separated words, the unit of the length rule and of compression."""
    return len(text.split())


def compare(a: Scored, b: Scored, rule: PairingRule = PairingRule()) -> int:
    """1 if ``a`` wins, -1 if ``b`` wins, 0 for a tie (the rule in this module's docstring)."""
    if min(a.score, b.score) <= rule.low_score:
        return (a.score > b.score) - (a.score < b.score)
    if a.words < b.words - rule.min_word_gap:
        return 1
    if b.words < a.words - rule.min_word_gap:
        return -1
    return 0


def in_length(summary: Scored, rule: PairingRule = PairingRule()) -> bool:
    """Whether the summary passes the length filter (``min_words`` to ``max_words``, inclusive)."""
    return rule.min_words <= summary.words <= rule.max_words


def article_pairs(summaries: Sequence[Scored], rule: PairingRule = PairingRule()
                  ) -> list[tuple[Scored, Scored]]:
    """The (chosen, rejected) pairs of one article's candidate summaries.

    Every two summaries that pass the length filter and are not identical text are compared; of
    the decided pairs, the ``max_pairs_per_article`` with the clearest signal are kept: the
    largest score gap first, then the largest word gap, then candidate order (deterministic, so
    a rerun writes the same pairs). A summary may appear in several pairs.
    """
    kept = [s for s in summaries if in_length(s, rule)]
    decided = []
    for i in range(len(kept)):
        for j in range(i + 1, len(kept)):
            a, b = kept[i], kept[j]
            if a.text.strip() == b.text.strip():
                continue
            outcome = compare(a, b, rule)
            if outcome:
                chosen, rejected = (a, b) if outcome > 0 else (b, a)
                key = (-(chosen.score - rejected.score), -(rejected.words - chosen.words), i, j)
                decided.append((key, chosen, rejected))
    decided.sort(key=lambda item: item[0])
    return [(chosen, rejected) for _, chosen, rejected in decided[:rule.max_pairs_per_article]]


def split_articles(article_ids: Iterable[str], valid_fraction: float, seed: int
                   ) -> tuple[list[str], list[str]]:
    """(train, valid) article ids: a seeded shuffle, ``ceil(valid_fraction * n)`` articles held
    out (none when the fraction is 0, and never all of them), both lists in input order.

    Splitting by article keeps every pair of an article on one side, so validation measures
    unseen articles, not unseen pairings of seen summaries.
    """
    ids = list(article_ids)
    n_valid = min(math.ceil(valid_fraction * len(ids)), max(len(ids) - 1, 0))
    shuffled = ids[:]
    random.Random(seed).shuffle(shuffled)
    valid = set(shuffled[:n_valid])
    return [a for a in ids if a not in valid], [a for a in ids if a in valid]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95% interval and the number of items it rests on."""

    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


Z95 = 1.959963984540054  # the normal distribution's 97.5% quantile


def proportion(successes: int, n: int) -> Interval:
    """``successes / n`` with Wilson's 95% score interval (Wilson 1927), which stays inside
    [0, 1] and is sane at 0 and n. ``n == 0`` gives NaN everywhere."""
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    p = successes / n
    denom = 1 + Z95 ** 2 / n
    centre = (p + Z95 ** 2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n)


def mean_interval(values: Sequence[float]) -> Interval:
    """The mean with a normal 95% interval (mean +- 1.96 sd / sqrt(n), sample sd); one value gives
    a zero-width interval and none gives NaN."""
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, mean, mean, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = Z95 * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


@dataclass(frozen=True)
class WinRate:
    """Model A against model B over ``n`` articles: P(win) + 0.5 P(tie), with its interval."""

    wins: int
    ties: int
    losses: int
    rate: Interval

    def as_dict(self) -> dict:
        return {"wins": self.wins, "ties": self.ties, "losses": self.losses,
                **self.rate.as_dict()}


def win_rate(outcomes: Sequence[int]) -> WinRate:
    """The win rate of per-article outcomes (1 win, 0 tie, -1 loss, as ``compare``): the mean of
    1 / 0.5 / 0 with ``mean_interval``'s 95% interval, clipped to [0, 1]."""
    points = [(o + 1) / 2 for o in outcomes]
    interval = mean_interval(points)
    if interval.n:
        interval = Interval(interval.value, max(0.0, interval.low), min(1.0, interval.high),
                            interval.n)
    return WinRate(wins=sum(o > 0 for o in outcomes), ties=sum(o == 0 for o in outcomes),
                   losses=sum(o < 0 for o in outcomes), rate=interval)
