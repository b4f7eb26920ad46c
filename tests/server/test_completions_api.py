"""``/v1/completions``: every prompt shape, one choice per prompt, streaming, on the tiny model."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
PROMPTS = ["The sky is", "Once upon a time", "1, 2, 3,"]


def _single(client, model, prompt, max_tokens=4) -> str:
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, **GREEDY)
    return resp.choices[0].text


def test_string_prompt(client, model, engine):
    resp = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, **GREEDY)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    [choice] = resp.choices
    assert choice.index == 0 and choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == len(engine.tokenizer.encode(PROMPTS[0]))
    assert resp.usage.completion_tokens == 4
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 4


def test_default_max_tokens_is_16(client, model):
    resp = client.completions.create(model=model, prompt=PROMPTS[0], **GREEDY)
    assert resp.usage.completion_tokens == 16 and resp.choices[0].finish_reason == "length"


def test_list_of_strings_gives_one_choice_per_prompt(client, model, engine):
    resp = client.completions.create(model=model, prompt=PROMPTS, max_tokens=4, **GREEDY)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.text for c in resp.choices] == [_single(client, model, p) for p in PROMPTS]
    assert resp.usage.prompt_tokens == sum(len(engine.tokenizer.encode(p)) for p in PROMPTS)
    assert resp.usage.completion_tokens == 3 * 4


def test_token_id_prompts(client, model, engine):
    ids = [engine.tokenizer.encode(p) for p in PROMPTS[:2]]
    one = client.completions.create(model=model, prompt=ids[0], max_tokens=4, **GREEDY)
    assert one.choices[0].text == _single(client, model, PROMPTS[0])
    assert one.usage.prompt_tokens == len(ids[0])
    many = client.completions.create(model=model, prompt=ids, max_tokens=4, **GREEDY)
    assert [c.text for c in many.choices] == [_single(client, model, p) for p in PROMPTS[:2]]
    assert many.usage.prompt_tokens == len(ids[0]) + len(ids[1])


def test_streaming_several_prompts(client, model):
    expected = [_single(client, model, p, 5) for p in PROMPTS]
    chunks = list(client.completions.create(model=model, prompt=PROMPTS, max_tokens=5,
                                            stream=True, stream_options={"include_usage": True},
                                            **GREEDY))
    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, list[str]] = defaultdict(list)
    for c in chunks[:-1]:
        [choice] = c.choices
        texts[choice.index] += choice.text
        if choice.finish_reason is not None:
            assert choice.text == ""
            finishes[choice.index].append(choice.finish_reason)
        else:
            assert choice.text  # no empty content chunks
    assert [texts[i] for i in range(3)] == expected
    assert dict(finishes) == {0: ["length"], 1: ["length"], 2: ["length"]}
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15


def test_concurrent_http_requests_match_sequential_ones(client, model):
    expected = [_single(client, model, p, 6) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: _single(client, model, p, 6), PROMPTS))
    assert got == expected
