"""``n`` choices per prompt on both endpoints, through the ``openai`` SDK on the tiny model."""

from __future__ import annotations

from collections import defaultdict

USER = [{"role": "user", "content": "Pick a word"}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_chat_n_gives_n_seeded_choices_and_counts_the_prompt_once(client, model, wait_idle):
    kwargs = dict(model=model, messages=USER, max_tokens=6, n=3, temperature=1.0, seed=5,
                  extra_body={"ignore_eos": True})
    resp = client.chat.completions.create(**kwargs)
    one = client.chat.completions.create(model=model, messages=USER, max_tokens=6,
                                         temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    texts = [c.message.content for c in resp.choices]
    assert texts[0] == one.choices[0].message.content  # choice 0 keeps the request's seed
    assert len(set(texts)) == 3  # seeds 5, 6, 7 on a random model
    assert resp.usage.prompt_tokens == one.usage.prompt_tokens
    assert resp.usage.completion_tokens == 3 * 6
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in again.choices] == texts
    wait_idle()


def test_completions_n_with_several_prompts_orders_choices_prompt_major(client, model):
    prompts = ["The sky is", "Once upon a time"]
    resp = client.completions.create(model=model, prompt=prompts, max_tokens=4, n=2, **GREEDY)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    texts = [c.text for c in resp.choices]
    single = [client.completions.create(model=model, prompt=p, max_tokens=4, **GREEDY)
              .choices[0].text for p in prompts]
    assert texts == [single[0], single[0], single[1], single[1]]  # greedy: equal samples
    assert resp.usage.completion_tokens == 4 * 4


def test_streamed_chat_n_interleaves_choices_by_index(client, model):
    kwargs = dict(model=model, messages=USER, max_tokens=5, n=2, temperature=1.0, seed=11,
                  extra_body={"ignore_eos": True})
    whole = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    text, roles, finish = defaultdict(str), set(), {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.delta.role:
                roles.add(choice.index)
            text[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert roles == {0, 1} and finish == {0: "length", 1: "length"}
    assert [text[0], text[1]] == whole
