"""The pairing rule, the length filter, the hold-out split and the statistics, to the number."""

from __future__ import annotations

import math

import pytest

from lmforge.preference.rules import (PairingRule, Scored, article_pairs, compare, in_length,
                                      mean_interval, proportion, split_articles, win_rate)


def s(score: int, words: int, tag: str = "") -> Scored:
    return Scored(text=f"{tag}{score}-{words}", score=score, words=words)


def test_low_scores_are_decided_by_score_alone():
    assert compare(s(2, 50), s(3, 5)) == -1  # either <= 2: higher score wins, length ignored
    assert compare(s(1, 5), s(0, 80)) == 1
    assert compare(s(2, 5), s(2, 40)) == 0  # equal low scores: a tie, whatever the lengths


def test_good_scores_are_decided_by_length_beyond_two_words():
    assert compare(s(3, 10), s(5, 13)) == 1  # both >= 3: 3 words shorter wins, score ignored
    assert compare(s(5, 12), s(3, 10)) == 0  # only 2 words shorter: a tie
    assert compare(s(4, 20), s(4, 10)) == -1


def test_length_filter_bounds_are_inclusive():
    rule = PairingRule()
    assert [in_length(s(5, w), rule) for w in (4, 5, 199, 200)] == [False, True, True, False]


def test_article_pairs_keep_the_clearest_three():
    kept = [s(5, 10, "a"), s(5, 14, "b"), s(4, 12, "c"), s(1, 8, "d")]
    filtered = [s(2, 3, "short"), s(3, 200, "long")]
    pairs = article_pairs(kept[:2] + filtered + kept[2:])
    # decided: a>d (score gap 5), b>d (4), c>d (3), a>b (0 gap, 4 words); a~c and b~c are ties
    assert [(c.text, r.text) for c, r in pairs] == [("a5-10", "d1-8"), ("b5-14", "d1-8"),
                                                     ("c4-12", "d1-8")]
    assert [(c.text, r.text) for c, r in article_pairs(kept, PairingRule(
        max_pairs_per_article=5))][-1] == ("a5-10", "b5-14")


def test_identical_summaries_and_ties_give_no_pair():
    assert article_pairs([s(4, 10, "x"), s(4, 11, "y"), s(4, 10, "x")]) == []


def test_split_holds_out_whole_articles_by_seed():
    ids = [f"a{i}" for i in range(10)]
    train, valid = split_articles(ids, 0.2, seed=21)
    assert (train, valid) == (["a1", "a2", "a3", "a4", "a5", "a6", "a8", "a9"], ["a0", "a7"])
    assert split_articles(ids, 0.2, seed=21) == (train, valid)  # deterministic
    assert split_articles(["x", "y"], 0.02, seed=21) == (["x"], ["y"])  # ceil: one of two
    assert split_articles(["x"], 0.5, seed=21) == (["x"], [])  # never all of them
    assert split_articles(ids, 0.0, seed=21) == (ids, [])


def test_wilson_interval():
    p = proportion(8, 10)
    assert (p.value, p.n) == (0.8, 10)
    assert p.low == pytest.approx(0.490162, abs=1e-6)
    assert p.high == pytest.approx(0.943318, abs=1e-6)
    zero = proportion(0, 5)
    assert (zero.low, zero.high) == (0.0, pytest.approx(0.434482, abs=1e-6))
    assert math.isnan(proportion(0, 0).value)


def test_win_rate_counts_ties_half():
    rate = win_rate([1, 1, 0, -1])
    assert (rate.wins, rate.ties, rate.losses) == (2, 1, 1)
    assert rate.rate.value == 0.625 and rate.rate.n == 4
    assert rate.rate.low == pytest.approx(0.155869, abs=1e-6)
    assert rate.rate.high == 1.0  # 1.094 clipped


def test_mean_interval_of_one_value_has_zero_width():
    assert mean_interval([3.0]).as_dict() == {"value": 3.0, "low": 3.0, "high": 3.0, "n": 1}


@pytest.mark.parametrize("bad", [dict(min_words=10, max_words=5), dict(max_pairs_per_article=0),
                                 dict(valid_fraction=1.0)])
def test_bad_rules_are_refused(bad):
    with pytest.raises(ValueError):
        PairingRule(**bad)
