"""Structured output through the ``openai`` SDK on the tiny random model: ``response_format``
(json_schema, json_object, the SDK's ``parse`` helper), vLLM/SGLang's regex / choice / guided_*
extras, streaming, ``n``, and the 400s for bad constraints (after which the server still serves).
A random model left alone emits noise, so every match below is the grammar's doing."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

USER = [{"role": "user", "content": "Give me a record"}]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "capital"],
    "additionalProperties": False,
}


def schema_format(schema=SCHEMA, name="city", strict=True):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                   "strict": strict}}


def test_chat_json_schema_always_validates_with_n_choices(client, model, wait_idle):
    resp = client.chat.completions.create(model=model, messages=USER, max_tokens=120, n=3,
                                          seed=1, response_format=schema_format())
    assert len(resp.choices) == 3
    for choice in resp.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    wait_idle()


class City(BaseModel):
    city: str = Field(max_length=8)  # a random model would otherwise write one long string
    capital: bool


def test_sdk_parse_helper_gets_a_parsed_pydantic_object(client, model):
    # The SDK turns the pydantic class into a strict json_schema and parses the reply.
    resp = client.chat.completions.parse(model=model, messages=USER, max_tokens=150,
                                         response_format=City, seed=3)
    parsed = resp.choices[0].message.parsed
    assert isinstance(parsed, City)


def test_json_object_mode_streams_an_object(client, model, engine):
    # "{}" is one token; +100 on it makes the random model pick it as soon as it is allowed,
    # and the request must then stop: the object is complete
    (empty_id,) = engine.tokenizer.encode("{}", add_special_tokens=False)
    stream = client.chat.completions.create(
        model=model, messages=USER, max_tokens=20, stream=True,
        response_format={"type": "json_object"}, logit_bias={str(empty_id): 100})
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert json.loads(text) == {} and finish == "stop"


@pytest.mark.parametrize("field", ["regex", "guided_regex"])
def test_completions_regex_streamed_and_not(client, model, field):
    pattern = r"(yes|no), [0-9]{3}\."
    resp = client.completions.create(model=model, prompt="Answer:", max_tokens=20, n=2,
                                     extra_body={field: pattern})
    for choice in resp.choices:
        assert re.fullmatch(pattern, choice.text) and choice.finish_reason == "stop"
    stream = client.completions.create(model=model, prompt="Answer:", max_tokens=20,
                                       stream=True, extra_body={field: pattern})
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert re.fullmatch(pattern, text)


@pytest.mark.parametrize("field", ["choice", "guided_choice"])
def test_chat_choice(client, model, field):
    options = ["red", "green", "blue sky"]
    resp = client.chat.completions.create(model=model, messages=USER, max_tokens=10, n=4,
                                          extra_body={field: options})
    assert all(c.message.content in options for c in resp.choices)


def test_guided_json_as_a_string_schema(client, model):
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
              "minItems": 2, "maxItems": 3}
    resp = client.completions.create(model=model, prompt="Digits:", max_tokens=30,
                                     extra_body={"guided_json": json.dumps(schema)})
    jsonschema.validate(json.loads(resp.choices[0].text), schema)


BAD = [
    ({"response_format": schema_format({"type": "integer", "minimum": 5, "maximum": 1})},
     "response_format", "minimum"),
    ({"response_format": schema_format({"type": "nonsense"})}, "response_format", "nonsense"),
    ({"response_format": schema_format(name="has space")}, "response_format.json_schema.name",
     "name"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema",
     "json_schema"),
    ({"regex": "(unclosed"}, "regex", "unclosed group"),
    ({"guided_regex": "a{3,1}"}, "guided_regex", "invalid regex"),
    ({"choice": []}, "choice", "non-empty"),
    ({"guided_choice": ["a", ""]}, "guided_choice", "non-empty"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_json": "[1, 2]"}, "guided_json", "JSON schema object"),
    ({"regex": "a+", "choice": ["a"]}, "choice", "Only one of"),
]


@pytest.mark.parametrize("extra,param,words", BAD)
def test_bad_constraints_are_400s_and_the_server_still_serves(http, model, extra, param, words):
    body = {"model": model, "messages": USER, "max_tokens": 5, **extra}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert words in error["message"], error["message"]
    ok = http.post("/v1/chat/completions", json={"model": model, "messages": USER,
                                                 "max_tokens": 2, "regex": "[0-9]+"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"].isdigit()


def test_sdk_reports_a_bad_schema_as_bad_request(client, model):
    with pytest.raises(openai.BadRequestError, match="Invalid JSON schema"):
        client.chat.completions.create(model=model, messages=USER, max_tokens=5,
                                       response_format=schema_format({"type": "nonsense"}))


def test_a_schema_that_matches_nothing_is_a_400_not_an_empty_stop(client, model):
    # the root $ref points to itself: no JSON value can ever complete it
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=USER, max_tokens=8,
                                       response_format=schema_format({"$ref": "#"}, "loop"))
    assert info.value.param == "response_format"
    assert "no output can match it" in info.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_a_grammar_that_fails_mid_generation_is_an_error_not_a_stop(client, model, stream,
                                                                    wait_idle):
    """llguidance accepts ``a{1000000}`` but its lexer gives up once it has to expand it; the
    answer is a 400 (or, streaming, an error event), never ``"aaaa"`` with "stop"."""
    kwargs = dict(model=model, prompt="x", max_tokens=16, extra_body={"regex": "a{1000000}"})
    if not stream:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(**kwargs)
        assert info.value.param == "regex"
        assert "failed during generation" in info.value.message
    else:
        with pytest.raises(openai.APIError) as info:
            for chunk in client.completions.create(stream=True, **kwargs):
                assert all(c.finish_reason != "stop" for c in chunk.choices)
        assert "failed during generation" in info.value.message
    wait_idle()


def test_a_huge_choice_list_is_a_400_without_internals(http, model):
    choices = [f"option {i}" for i in range(100_000)]
    resp = http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 4,
                                              "guided_choice": choices})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "guided_choice" and "at most 10000 entries" in error["message"]
    assert "panic" not in resp.text
