"""Completions ``best_of`` through the ``openai`` SDK: ``best_of`` seeded candidates, the ``n``
with the highest mean token logprob returned, every candidate's tokens billed."""

from __future__ import annotations

import openai
import pytest

KWARGS = {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 1.0, "seed": 3,
          "extra_body": {"ignore_eos": True}}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_best_of_returns_the_n_candidates_with_the_best_mean_logprob(client, model, wait_idle):
    # the same seeds as n=4: candidate j is sampled with seed + j either way
    candidates = client.completions.create(model=model, n=4, logprobs=0, **KWARGS)
    means = [mean(c.logprobs.token_logprobs) for c in candidates.choices]
    ranked = sorted(range(4), key=lambda j: -means[j])
    assert len({c.text for c in candidates.choices}) == 4

    resp = client.completions.create(model=model, n=2, best_of=4, **KWARGS)
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.text for c in resp.choices] == [candidates.choices[j].text for j in ranked[:2]]
    assert all(c.logprobs is None for c in resp.choices)  # not asked for
    assert resp.usage.completion_tokens == 4 * 5  # every candidate is billed
    assert resp.usage.prompt_tokens == candidates.usage.prompt_tokens  # the prompt once
    wait_idle()


def test_best_of_with_logprobs_and_several_prompts(client, model):
    prompts = ["Once upon a time", "The sky is"]
    resp = client.completions.create(model=model, n=1, best_of=3, logprobs=1,
                                     **{**KWARGS, "prompt": prompts})
    assert [c.index for c in resp.choices] == [0, 1]
    for i, text in enumerate(prompts):
        every = client.completions.create(model=model, n=3, logprobs=1,
                                          **{**KWARGS, "prompt": text})
        # logprobs move by ~1e-3 between batch shapes (bf16 on this CPU): compare the means
        # with that slack, and the texts where the best candidate leads clearly
        means = sorted((mean(c.logprobs.token_logprobs), c.text) for c in every.choices)
        chosen = resp.choices[i]
        assert chosen.text in [text for _, text in means]
        assert mean(chosen.logprobs.token_logprobs) == pytest.approx(means[-1][0], abs=0.01)
        if means[-1][0] - means[-2][0] > 0.01:
            assert chosen.text == means[-1][1]
    assert resp.usage.completion_tokens == 2 * 3 * 5


def test_best_of_equal_to_n_is_plain_n(client, model):
    plain = client.completions.create(model=model, n=2, **KWARGS)
    same = client.completions.create(model=model, n=2, best_of=2, **KWARGS)
    assert [c.text for c in same.choices] == [c.text for c in plain.choices]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"best_of": 1, "n": 2}, "between n (2) and 20"),
    ({"best_of": 21}, "between n (1) and 20"),
    ({"best_of": 0}, "between n (1) and 20"),
    ({"best_of": 2, "stream": True}, "cannot be streamed"),
])
def test_bad_best_of_is_a_400(client, model, kwargs, fragment):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="Hi", max_tokens=2, **kwargs)
    assert e.value.body["param"] == "best_of"
    assert fragment in e.value.body["message"]


def test_best_of_is_not_a_chat_parameter(http, model):
    resp = http.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "best_of": 2})
    assert resp.status_code == 400 and "best_of" in resp.text
