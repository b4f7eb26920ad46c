"""The "auto" hyperparameter rule (``training.hyperparameters``): OpenAI's batch size and the
cookbook's epochs from the data size, at least ``MIN_STEPS`` optimizer steps, a multiplier that
grows with the batch size and makes up for too few steps; given values always win."""

import math

import pytest

from lmforge.training.hyperparameters import (
    MIN_STEPS,
    ResolvedHyperparameters,
    auto_hyperparameters,
    cookbook_epochs,
)

# n_examples -> (n_epochs, batch_size, learning_rate_multiplier, steps), everything "auto"
TABLE = {
    1: (25, 1, 4.0, 25),  # 25 epochs is the most: 4x the rate makes up for 25 of 100 steps
    9: (12, 1, 1.0, 108),  # the cookbook's 11 epochs make 99 steps
    10: (10, 1, 1.0, 100),
    30: (4, 1, 1.0, 120),  # the cookbook's 3 epochs make 90 steps
    43: (3, 1, 1.0, 129),  # 48 CSV rows less the 10% held out: tests/server/...smollm2.py
    500: (3, 1, 1.0, 1500),
    1_000: (3, 2, 1.41, 1500),  # ~0.2% of the examples; the rate grows as sqrt(batch size)
    4_000: (3, 8, 2.83, 1500),
    10_000: (2, 20, 4.0, 1000),  # 25,000 example passes at most; the rate stops at 4x
    200_000: (1, 256, 4.0, 782),  # the batch size stops at 256
}


@pytest.mark.parametrize("n", TABLE)
def test_the_auto_table(n):
    assert auto_hyperparameters(n) == ResolvedHyperparameters(*TABLE[n])


def test_every_auto_run_makes_min_steps_or_a_higher_rate():
    for n in (*range(1, 300), 1_000, 33_333, 10**6):
        hp = auto_hyperparameters(n)
        assert hp.steps == hp.n_epochs * math.ceil(n / hp.batch_size)
        assert hp.steps >= MIN_STEPS or hp.n_epochs == 25 and hp.learning_rate_multiplier > 1


@pytest.mark.parametrize("given,expected", [
    ({"n_epochs": 3}, (3, 1, 1.0, 129)),  # LLM Engine's {"epochs": 3}: still 129 steps
    ({"batch_size": 4}, (10, 4, 2.0, 110)),  # more epochs to reach 100 steps
    ({"n_epochs": 3, "batch_size": 4}, (3, 4, 6.06, 33)),  # the rate makes up for 33 steps
    ({"n_epochs": 1}, (1, 1, 2.33, 43)),
    ({"n_epochs": 1, "batch_size": 43}, (1, 43, 10.0, 1)),  # at most 10 (the API's bound)
    ({"learning_rate_multiplier": 0.5}, (3, 1, 0.5, 129)),
    ({"n_epochs": 3, "batch_size": 4, "learning_rate_given": True}, (3, 4, 1.0, 33)),
])
def test_given_values_win(given, expected):
    assert auto_hyperparameters(43, **given) == ResolvedHyperparameters(*expected)


def test_the_cookbook_rule_and_bad_counts():
    assert [cookbook_epochs(n) for n in (1, 4, 10, 33, 34, 8_333, 8_334, 25_001)] == [
        25, 25, 10, 3, 3, 3, 2, 1]
    with pytest.raises(ValueError, match="n_examples"):
        auto_hyperparameters(0)
