"""Logprobs (chat and completions, streaming and not), echo and logit_bias through the ``openai``
SDK on the tiny model."""

from __future__ import annotations

import math

import pytest

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
USER = [{"role": "user", "content": "Tell me a story"}]
PROMPT = "Once upon a time"


def test_chat_logprobs_and_top_logprobs(client, model):
    resp = client.chat.completions.create(model=model, messages=USER, max_tokens=6,
                                          logprobs=True, top_logprobs=3, **GREEDY)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 6
    for entry in content:
        assert math.isfinite(entry.logprob) and entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the likeliest one
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        lps = [t.logprob for t in entry.top_logprobs]
        assert lps == sorted(lps, reverse=True)


def test_chat_logprobs_off_by_default_and_top_zero(client, model):
    resp = client.chat.completions.create(model=model, messages=USER, max_tokens=3, **GREEDY)
    assert resp.choices[0].logprobs is None
    resp = client.chat.completions.create(model=model, messages=USER, max_tokens=3,
                                          logprobs=True, **GREEDY)
    assert [e.top_logprobs for e in resp.choices[0].logprobs.content] == [[], [], []]


def test_chat_streamed_logprobs_equal_the_whole_response(client, model):
    kwargs = dict(model=model, messages=USER, max_tokens=8, logprobs=True, top_logprobs=2,
                  **GREEDY)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-5)


def test_completion_logprobs(client, model):
    resp = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, logprobs=2,
                                     **GREEDY)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == resp.choices[0].text  # the tiny vocabulary's tokens are whole
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 2 <= len(top) <= 3 and top[token] == pytest.approx(logprob)
        assert max(top.values()) == pytest.approx(logprob)  # greedy


def test_echo_without_logprobs_prepends_the_prompt(client, model):
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, **GREEDY)
    echoed = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, echo=True,
                                       **GREEDY)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert echoed.usage.completion_tokens == 4


def test_echo_with_logprobs_scores_the_prompt(client, model, engine):
    ids = engine.tokenizer.encode(PROMPT)
    resp = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, echo=True,
                                     logprobs=1, **GREEDY)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and resp.choices[0].text.startswith(PROMPT)
    # the prompt path agrees with the generation path: score prompt + the first generated token
    first = resp.choices[0].logprobs.token_logprobs[len(ids)]
    longer = client.completions.create(model=model, prompt=ids + [engine.tokenizer.encode(
        lp.tokens[len(ids)], add_special_tokens=False)[0]], max_tokens=1, echo=True, logprobs=0,
        **GREEDY)
    assert longer.choices[0].logprobs.token_logprobs[len(ids)] == pytest.approx(first, abs=1e-4)


def test_streamed_echo_with_logprobs_equals_the_whole_response(client, model):
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=4, echo=True, logprobs=1, **GREEDY)
    whole = client.completions.create(**kwargs).choices[0]
    text, tokens, offsets = "", [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].text
            if chunk.choices[0].logprobs is not None:
                tokens += chunk.choices[0].logprobs.tokens
                offsets += chunk.choices[0].logprobs.text_offset
    assert text == whole.text and tokens == whole.logprobs.tokens
    assert offsets == whole.logprobs.text_offset


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_0_with_echo_scores_the_prompt_only(client, model, engine, stream):
    """lm-eval-harness's loglikelihood request: the prompt and its logprobs, nothing generated."""
    ids = engine.tokenizer.encode(PROMPT)
    kwargs = dict(model=model, prompt=[PROMPT, "Two"], max_tokens=0, echo=True, logprobs=2, n=2)
    scored = client.completions.create(model=model, prompt=PROMPT, max_tokens=1, echo=True,
                                       logprobs=2).choices[0].logprobs
    if stream:
        chunks = list(client.completions.create(**kwargs, stream=True,
                                                stream_options={"include_usage": True}))
        usage = chunks[-1].usage
        choices = {}
        for c in chunks[:-1]:
            for ch in c.choices:
                got = choices.setdefault(ch.index, {"text": "", "tokens": [], "lps": [],
                                                    "finish": None})
                got["text"] += ch.text
                got["finish"] = ch.finish_reason or got["finish"]
                if ch.logprobs is not None:
                    got["tokens"] += ch.logprobs.tokens
                    got["lps"] += ch.logprobs.token_logprobs
        choices = [choices[i] for i in sorted(choices)]
    else:
        resp = client.completions.create(**kwargs)
        usage = resp.usage
        choices = [{"text": c.text, "tokens": c.logprobs.tokens, "finish": c.finish_reason,
                    "lps": c.logprobs.token_logprobs} for c in resp.choices]
    assert [c["text"] for c in choices] == [PROMPT, PROMPT, "Two", "Two"]
    assert all(c["finish"] == "length" for c in choices)
    assert choices[0]["tokens"] == scored.tokens[:len(ids)]  # the prompt's tokens, only
    assert choices[0]["lps"][0] is None
    assert choices[0]["lps"][1:] == pytest.approx(scored.token_logprobs[1:len(ids)], abs=1e-4)
    num_prompt = len(ids) + len(engine.tokenizer.encode("Two"))
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        num_prompt, 0, num_prompt)


def test_max_tokens_0_without_echo_is_a_400(http, model):
    resp = http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 0})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "max_tokens"
    assert "echo" in resp.json()["error"]["message"]


def test_logit_bias_forces_a_token(client, model, engine):
    token = engine.tokenizer.encode(" the", add_special_tokens=False)[0]
    resp = client.completions.create(model=model, prompt=PROMPT, max_tokens=4,
                                     logit_bias={str(token): 100}, **GREEDY)
    assert resp.choices[0].text == engine.tokenizer.decode([token] * 4)
    chat = client.chat.completions.create(model=model, messages=USER, max_tokens=3,
                                          logit_bias={str(token): 100}, temperature=1.0, seed=2)
    assert chat.choices[0].message.content == engine.tokenizer.decode([token] * 3)
