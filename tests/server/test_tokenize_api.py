"""POST /tokenize and /detokenize with vLLM's shapes: text or chat messages to token ids (chat
rendered exactly as /v1/chat/completions renders it), ids back to text, errors in the envelope."""

from __future__ import annotations

import pytest

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 2?"}]


def test_tokenize_text(http, engine, model):
    text = "Hello world, tokenize me!"
    resp = http.post("/tokenize", json={"model": model, "prompt": text})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    expected = engine.tokenizer.encode(text, add_special_tokens=True)
    assert body == {"count": len(expected), "max_model_len": 512, "tokens": expected,
                    "token_strs": None}
    resp = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False,
                                        "return_token_strs": True})  # model may be left out
    body = resp.json()
    assert body["tokens"] == engine.tokenizer.encode(text, add_special_tokens=False)
    assert body["token_strs"][:2] == ["Hello", "Ġworld"]
    assert len(body["token_strs"]) == body["count"]


def test_tokenize_chat_counts_what_chat_completions_bills(http, client, model):
    resp = http.post("/tokenize", json={"model": model, "messages": MESSAGES})
    assert resp.status_code == 200, resp.text
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)
    assert resp.json()["count"] == reply.usage.prompt_tokens


def test_tokenize_chat_flags(http, engine, model):
    def tokens(**flags) -> list[int]:
        resp = http.post("/tokenize", json={"model": model, **flags})
        assert resp.status_code == 200, resp.text
        return resp.json()["tokens"]

    decode = engine.tokenizer.decode
    with_prompt = tokens(messages=MESSAGES)
    without = tokens(messages=MESSAGES, add_generation_prompt=False)
    assert with_prompt[:len(without)] == without
    assert decode(with_prompt[len(without):], skip_special_tokens=False).startswith(
        "<|im_start|>assistant")
    started = [*MESSAGES, {"role": "assistant", "content": "It is"}]
    continued = decode(tokens(messages=started, continue_final_message=True),
                       skip_special_tokens=False)
    assert continued.endswith("<|im_start|>assistant\nIt is")  # left open: no <|im_end|>


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "prompt": "Hi"}, 404, "model"),
    ({"model": "nope", "messages": MESSAGES}, 404, "model"),
    ({"prompt": "Hi", "frobnicate": 1}, 400, "frobnicate"),
    ({"messages": MESSAGES, "prompt": "Hi"}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages[0].role"),
    ({"messages": MESSAGES, "continue_final_message": True, "add_generation_prompt": True},
     400, "continue_final_message"),
    ({"messages": MESSAGES, "add_special_tokens": True}, 400, "add_special_tokens"),
])
def test_tokenize_errors(http, body, status, param):
    resp = http.post("/tokenize", json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_detokenize_round_trip(http, engine, model):
    text = "<|im_start|>user\nHello, world!<|im_end|>"
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    resp = http.post("/detokenize", json={"model": model, "tokens": ids})
    assert resp.status_code == 200 and resp.json() == {"prompt": text}
    assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("body,status,param", [
    ({"tokens": [1, 49152]}, 400, "tokens"),
    ({"tokens": [-1]}, 400, "tokens"),
    ({"tokens": ["a"]}, 400, "tokens[0]"),
    ({"model": "nope", "tokens": [1]}, 404, "model"),
])
def test_detokenize_errors(http, body, status, param):
    resp = http.post("/detokenize", json=body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param
