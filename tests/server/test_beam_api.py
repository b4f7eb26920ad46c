"""Beam search on both endpoints through the ``openai`` SDK (``extra_body`` carries the
non-OpenAI fields), its combination rules (400s naming the parameter), and disconnects."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from urllib.parse import urlparse

import openai
import pytest

from lmforge.engine.beam_search import BeamSearchParams, beam_search

USER = [{"role": "user", "content": "Pick a word"}]


def engine_beams(engine, prompt: list[int], n: int, **kwargs):
    """The engine's beam search run directly (on the engine's own thread, from a new loop)."""
    return asyncio.run(beam_search(engine, "direct", prompt, BeamSearchParams(**kwargs), n))


def test_chat_num_beams_returns_the_n_best_beams(client, model, engine, wait_idle):
    resp = client.chat.completions.create(model=model, messages=USER, max_tokens=6, n=2,
                                          extra_body={"num_beams": 3, "length_penalty": 0.5})
    prompt = engine.tokenizer.apply_chat_template(USER, add_generation_prompt=True)
    direct = engine_beams(engine, prompt, 2, beam_width=3, max_tokens=6, length_penalty=0.5)
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.message.content for c in resp.choices] == [s.text for s in direct.sequences]
    assert [c.finish_reason for c in resp.choices] == [s.finish_reason for s in direct.sequences]
    assert resp.choices[0].message.content != resp.choices[1].message.content
    assert resp.usage.prompt_tokens == len(prompt)  # the prompt once
    assert resp.usage.completion_tokens == sum(len(s.token_ids) for s in direct.sequences)
    again = client.chat.completions.create(model=model, messages=USER, max_tokens=6, n=2,
                                           extra_body={"num_beams": 3, "length_penalty": 0.5})
    assert [c.message.content for c in again.choices] == [
        c.message.content for c in resp.choices]  # deterministic
    wait_idle()


def test_use_beam_search_width_defaults_to_best_of_and_n(client, model):
    kwargs = dict(model=model, prompt="The sky is", max_tokens=5)
    by_num_beams = client.completions.create(n=2, extra_body={"num_beams": 3}, **kwargs)
    by_best_of = client.completions.create(n=2, best_of=3, extra_body={"use_beam_search": True},
                                           **kwargs)
    assert [c.text for c in by_best_of.choices] == [c.text for c in by_num_beams.choices]
    by_n = client.completions.create(n=3, extra_body={"use_beam_search": True}, **kwargs)
    three = client.completions.create(n=3, extra_body={"num_beams": 3}, **kwargs)
    assert [c.text for c in by_n.choices] == [c.text for c in three.choices]
    # num_beams 1 is no beam search: the plain (here greedy) path
    greedy = client.completions.create(temperature=0, extra_body={"num_beams": 1}, **kwargs)
    plain = client.completions.create(temperature=0, **kwargs)
    assert greedy.choices[0].text == plain.choices[0].text


def test_completions_beams_with_several_prompts_echo_and_logprobs(client, model, engine):
    prompts = ["The sky is", "Once upon a time"]
    resp = client.completions.create(model=model, prompt=prompts, max_tokens=4, n=2, echo=True,
                                     logprobs=2, extra_body={"num_beams": 2})
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    for i, text in enumerate(prompts):
        ids = engine.tokenizer.encode(text)
        direct = engine_beams(engine, ids, 2, beam_width=2, max_tokens=4)
        for j, s in enumerate(direct.sequences):
            choice = resp.choices[i * 2 + j]
            assert choice.text == text + s.text
            lp = choice.logprobs
            assert len(lp.tokens) == len(ids) + len(s.token_ids)
            assert lp.token_logprobs[0] is None  # the first prompt token has none
            generated = lp.token_logprobs[len(ids):]
            assert sum(generated) == pytest.approx(s.cumulative_logprob, abs=1e-4)
            assert all(len(top) >= 2 for top in lp.top_logprobs[len(ids):])
    assert resp.usage.completion_tokens == 4 * 4


def test_chat_beams_with_logprobs_and_stop(client, model):
    base = client.chat.completions.create(model=model, messages=USER, max_tokens=8,
                                          extra_body={"num_beams": 2})
    text = base.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    resp = client.chat.completions.create(
        model=model, messages=USER, max_tokens=8, logprobs=True, top_logprobs=3, stop=[stop],
        extra_body={"num_beams": 2, "length_penalty": 0.0})
    choice = resp.choices[0]
    assert stop not in choice.message.content
    assert choice.finish_reason == "stop" and text.startswith(choice.message.content)
    assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    assert "".join(t.token for t in choice.logprobs.content).startswith(choice.message.content)


def test_sampling_knobs_without_temperature_are_ignored(client, model):
    """``temperature`` unset or 0 is deterministic beam search (HF ``do_sample=False``), which
    ignores top_k / top_p / min_p / seed as HF ignores its warpers without ``do_sample``."""
    kwargs = {"model": model, "messages": USER, "max_tokens": 4}
    ref = client.chat.completions.create(extra_body={"num_beams": 2}, **kwargs)
    for extra in ({"temperature": 0}, {"seed": 7}, {"top_p": 0.5}, {"top_k": 1},
                  {"min_p": 0.5}, {"temperature": 0, "top_k": 1, "top_p": 0.1, "seed": 3},
                  {"top_k": -1}, {"presence_penalty": 0}):
        resp = client.chat.completions.create(extra_body={"num_beams": 2, **extra}, **kwargs)
        assert resp.choices[0].message.content == ref.choices[0].message.content, extra
    resp = client.chat.completions.create(
        extra_body={"num_beams": 2, "early_stopping": "never"}, **kwargs)
    assert resp.choices[0].finish_reason == "length"


REFUSED = [
    ({"num_beams": 2, "stream": True}, "stream"),
    ({"num_beams": 2, "temperature": 2.5}, "temperature"),  # ranges as without beams
    ({"num_beams": 2, "temperature": 0.7, "top_p": 1.5}, "top_p"),
    ({"num_beams": 2, "top_k": -3}, "top_k"),
    ({"num_beams": 2, "temperature": 0.7, "presence_penalty": 0.5}, "presence_penalty"),
    ({"num_beams": 2, "presence_penalty": 0.5}, "presence_penalty"),
    ({"num_beams": 2, "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"num_beams": 2, "repetition_penalty": 1.2}, "repetition_penalty"),
    ({"num_beams": 2, "logit_bias": {"5": 3}}, "logit_bias"),
    ({"num_beams": 2, "n": 3}, "n"),
    ({"num_beams": 11}, "num_beams"),
    ({"num_beams": 0}, "num_beams"),
    ({"num_beams": 2, "use_beam_search": False}, "use_beam_search"),
    ({"length_penalty": 2.0}, "length_penalty"),
    ({"early_stopping": True}, "early_stopping"),
    ({"num_beams": 2, "regex": "[ab]+"}, "num_beams"),
    ({"use_beam_search": True, "n": 11}, "n"),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_refused_combinations_are_400s_naming_the_parameter(http, model, path):
    base = {"model": model, "max_tokens": 4}
    base.update({"messages": USER} if "chat" in path else {"prompt": "Hi"})
    for extra, param in REFUSED:
        resp = http.post(path, json={**base, **extra})
        assert resp.status_code == 400, (extra, resp.text)
        error = resp.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", (extra,
                                                                                      error)
    resp = http.post(path, json={**base, "num_beams": 2, "early_stopping": "sometimes"})
    assert resp.status_code == 400 and "early_stopping" in resp.text


def test_refused_with_tools_and_best_of_and_reasons_through_the_sdk(client, model):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=USER, tools=[tool],
                                       extra_body={"num_beams": 2})
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="Hi", best_of=3,
                                  extra_body={"num_beams": 2})
    assert e.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="Hi", temperature=0.5,
                                  frequency_penalty=1.0, extra_body={"num_beams": 2})
    assert e.value.body["param"] == "frequency_penalty"
    assert "before any penalty or bias" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="Hi", max_tokens=600,
                                  extra_body={"num_beams": 2})
    assert e.value.body["code"] == "context_length_exceeded"


# Chinese-LLaMA-Alpaca's openai_server_demo README (Hugging Face generate behind it), as
# written: beam sampling (num_beams 4, temperature 0.7, top_k 40), and no model.
ALPACA_DEMO = {"prompt": "Tell me the strengths and weaknesses of China and the United States "
                         "respectively", "max_tokens": 90, "temperature": 0.7, "num_beams": 4,
               "top_k": 40}


def test_chinese_llama_alpaca_beam_sampling_body_works(http):
    resp = http.post("/v1/completions", json=ALPACA_DEMO)
    assert resp.status_code == 200, resp.text
    choices = resp.json()["choices"]
    assert len(choices) == 1 and isinstance(choices[0]["text"], str) and choices[0]["text"]
    assert choices[0]["finish_reason"] in ("stop", "length")


def test_beam_sampling_is_reproducible_with_a_seed(client, model, wait_idle):
    def sample(seed, **kwargs):
        return [c.text for c in client.completions.create(
            model=model, prompt="The sky is", max_tokens=6, n=2, temperature=1.0, seed=seed,
            extra_body={"num_beams": 3, **kwargs}).choices]

    first = sample(1)
    assert sample(1) == first
    assert any(sample(seed) != first for seed in (2, 3, 4))
    assert first != [c.text for c in client.completions.create(  # explicit 1.0 samples
        model=model, prompt="The sky is", max_tokens=6, n=2, extra_body={"num_beams": 3}
    ).choices]
    chat = [client.chat.completions.create(
        model=model, messages=USER, max_tokens=6, temperature=0.7, seed=9,
        extra_body={"num_beams": 2, "top_k": 40, "top_p": 0.9}) for _ in range(2)]
    assert chat[0].choices[0].message.content == chat[1].choices[0].message.content
    assert chat[0].choices[0].finish_reason in ("stop", "length")
    wait_idle()


def test_disconnect_cancels_the_search(long_base_url, long_engine, long_wait_idle):
    long_wait_idle(5.0)
    body = {"model": long_engine.model_name, "prompt": "Hi", "max_tokens": 3000,
            "ignore_eos": True, "num_beams": 2, "early_stopping": "never"}
    payload = json.dumps(body).encode()
    url = urlparse(long_base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        deadline = time.monotonic() + 10
        while not long_engine.engine.scheduler.requests:  # the search is stepping
            assert time.monotonic() < deadline, "the beam search never reached the engine"
            time.sleep(0.002)
    finally:
        sock.close()
    long_wait_idle(5.0)
    time.sleep(0.2)
    stats = long_engine.stats()
    assert stats.num_running + stats.num_waiting == 0  # no further step was issued
