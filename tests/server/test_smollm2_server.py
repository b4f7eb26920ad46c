"""The default model end to end: its answers make sense through the server (slow: loads the
135M-parameter GGUF once)."""

from __future__ import annotations

import openai

from lmforge.config import DEFAULT_MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_capital_of_france(smollm2_base_url):
    client = openai.OpenAI(base_url=f"{smollm2_base_url}/v1", api_key="x", max_retries=0)
    resp = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION,
                                          temperature=0, max_tokens=20)
    answer = resp.choices[0].message.content
    assert "Paris" in answer
    assert resp.choices[0].finish_reason == "stop"  # it ends with <|im_end|>, not the limit
    assert "<|im_end|>" not in answer

    stream = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION,
                                            temperature=0, max_tokens=20, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == answer
