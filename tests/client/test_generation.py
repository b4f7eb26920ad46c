"""``lmforge.client``'s ``Completion`` and ``ChatCompletion`` against the session server (tiny
Llama) over real HTTP: each equals what the ``openai`` SDK gets for the same request, streamed
pieces add up to the whole, the asyncio twins equal the sync calls, extra sampling parameters
pass through, and the server's refusals arrive as typed errors naming the parameter."""

from __future__ import annotations

import asyncio

import pytest

from lmforge.client import (
    BadRequestError,
    ChatCompletion,
    Completion,
    CompletionStreamResponse,
    CompletionSyncResponse,
    NotFoundError,
    configure,
)

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Say something about foxes."}]


@pytest.fixture(autouse=True)
def pointed(base_url):
    configure(base_url=base_url)
    yield
    configure()


def test_completion_equals_the_openai_sdks(client, model):
    ours = Completion.create(model, PROMPT, max_new_tokens=12, temperature=0)
    theirs = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert isinstance(ours, CompletionSyncResponse)
    assert ours.request_id.startswith("cmpl-")
    assert ours.output.text == theirs.choices[0].text
    assert ours.output.num_prompt_tokens == theirs.usage.prompt_tokens
    assert ours.output.num_completion_tokens == theirs.usage.completion_tokens == 12
    assert ours.output.finish_reason == "length" and ours.output.tokens is None


def test_token_log_probs(client, model):
    ours = Completion.create(model, PROMPT, max_new_tokens=6, temperature=0,
                             return_token_log_probs=True)
    theirs = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                       logprobs=0).choices[0].logprobs
    assert [t.token for t in ours.output.tokens] == theirs.tokens
    assert [t.log_prob for t in ours.output.tokens] == pytest.approx(theirs.token_logprobs)
    assert "".join(t.token for t in ours.output.tokens) == ours.output.text


def test_streamed_pieces_add_up_to_the_whole(model):
    whole = Completion.create(model, PROMPT, max_new_tokens=10, temperature=0,
                              return_token_log_probs=True)
    pieces = list(Completion.create(model, PROMPT, max_new_tokens=10, temperature=0,
                                    return_token_log_probs=True, stream=True))
    assert all(isinstance(p, CompletionStreamResponse) for p in pieces)
    assert len({p.request_id for p in pieces}) == 1
    assert "".join(p.output.text for p in pieces) == whole.output.text
    assert [p.output.finished for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert pieces[-1].output.finish_reason == "length"
    counts = [p.output.num_completion_tokens for p in pieces]
    assert counts == sorted(counts) and counts[-1] == 10  # the usage so far, in every piece
    assert all(p.output.num_prompt_tokens == whole.output.num_prompt_tokens for p in pieces)
    streamed = [t for p in pieces for t in p.output.tokens or []]
    assert [t.token for t in streamed] == [t.token for t in whole.output.tokens]
    assert all(p.output.token == p.output.tokens[0] for p in pieces[:-1]
               if len(p.output.tokens) == 1)


def test_chat_completion_equals_the_openai_sdks_streamed_or_not(client, model):
    ours = ChatCompletion.create(model, MESSAGES, max_new_tokens=10, temperature=0)
    theirs = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10,
                                            temperature=0)
    assert ours.request_id.startswith("chatcmpl-")
    assert ours.output.text == theirs.choices[0].message.content
    assert ours.output.num_prompt_tokens == theirs.usage.prompt_tokens
    pieces = list(ChatCompletion.create(model, MESSAGES, max_new_tokens=10, temperature=0,
                                        stream=True))
    assert "".join(p.output.text for p in pieces) == ours.output.text
    assert pieces[-1].output.finished and pieces[-1].output.num_completion_tokens == 10
    logprobs = ChatCompletion.create(model, MESSAGES, max_new_tokens=4, temperature=0,
                                     return_token_log_probs=True).output.tokens
    assert len(logprobs) == 4 and all(t.log_prob <= 0 for t in logprobs)


def test_the_asyncio_twins_equal_the_sync_calls(model):
    async def run():
        whole = await Completion.acreate(model, PROMPT, max_new_tokens=8, temperature=0)
        stream = await Completion.acreate(model, PROMPT, max_new_tokens=8, temperature=0,
                                          stream=True)
        streamed = "".join([p.output.text async for p in stream])
        chats = await asyncio.gather(*[ChatCompletion.acreate(model, MESSAGES, max_new_tokens=6,
                                                              temperature=0) for _ in range(3)])
        chat_stream = await ChatCompletion.acreate(model, MESSAGES, max_new_tokens=6,
                                                   temperature=0, stream=True)
        chat_streamed = "".join([p.output.text async for p in chat_stream])
        return whole, streamed, chats, chat_streamed

    whole, streamed, chats, chat_streamed = asyncio.run(run())
    sync = Completion.create(model, PROMPT, max_new_tokens=8, temperature=0)
    assert whole.output.text == streamed == sync.output.text
    sync_chat = ChatCompletion.create(model, MESSAGES, max_new_tokens=6, temperature=0)
    assert {c.output.text for c in chats} == {chat_streamed} == {sync_chat.output.text}


def test_extra_sampling_parameters_pass_through(model):
    choice = Completion.create(model, PROMPT, max_new_tokens=5, guided_choice=["yes", "no"])
    assert choice.output.text in ("yes", "no")
    regex = Completion.create(model, PROMPT, max_new_tokens=8, guided_regex=r"[0-9]{3}")
    assert len(regex.output.text) == 3 and regex.output.text.isdigit()
    seeded = [Completion.create(model, PROMPT, max_new_tokens=8, temperature=1.0, top_k=20,
                                seed=7).output.text for _ in range(2)]
    assert seeded[0] == seeded[1]
    stopped = Completion.create(model, PROMPT, max_new_tokens=12, temperature=0)
    cut = stopped.output.text[3:6]
    again = Completion.create(model, PROMPT, max_new_tokens=12, temperature=0,
                              stop_sequences=[cut])
    assert cut not in again.output.text and again.output.finish_reason == "stop"


def test_refusals_are_typed_errors_naming_the_parameter(model):
    with pytest.raises(NotFoundError) as caught:
        Completion.create("no-such-model", PROMPT)
    assert caught.value.status_code == 404 and "no-such-model" in caught.value.message
    with pytest.raises(BadRequestError) as caught:
        Completion.create(model, PROMPT, top_k="many")
    assert caught.value.param == "top_k" and caught.value.status_code == 400
    with pytest.raises(BadRequestError) as caught:
        ChatCompletion.create(model, MESSAGES, unknown_knob=1)
    assert "unknown_knob" in caught.value.message
    with pytest.raises(BadRequestError) as caught:  # refused before the stream starts
        list(Completion.create(model, PROMPT, temperature=-1, stream=True))
    assert caught.value.param == "temperature"
    with pytest.raises(ValueError, match="n must be 1"):
        Completion.create(model, PROMPT, n=2)
