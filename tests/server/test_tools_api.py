"""Tool calling through the ``openai`` SDK on the tiny random model: forced calls (a named
function, ``required``) always parse because they are generated under the call's schema;
``auto`` parses Hermes ``<tool_call>`` blocks (forced here with a regex, since a random model
never writes one by itself); streaming delivers tool-call deltas; replayed calls and ``tool``
messages render; bad tool requests are 400s."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from support.serving import serve

from lmforge.config import ServerConfig
from lmforge.server import build_app

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                   "unit": {"type": "string", "enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
HERMES = ('<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>')


def check_calls(calls, names=None):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_function_always_parses(client, model, wait_idle):
    resp = client.chat.completions.create(model=model, messages=USER, tools=TOOLS,
                                          tool_choice=NAMED, max_tokens=60, n=3, seed=2)
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_calls(choice.message.tool_calls, {"get_weather"})
        assert len(choice.message.tool_calls) == 1
    wait_idle()


def test_required_picks_tools_and_respects_parallel_tool_calls(client, model):
    resp = client.chat.completions.create(model=model, messages=USER, tools=TOOLS,
                                          tool_choice="required", parallel_tool_calls=False,
                                          max_tokens=80, n=4, seed=1)
    names = set()
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls)
        assert len(choice.message.tool_calls) == 1
        names.add(choice.message.tool_calls[0].function.name)
    assert names <= {"get_weather", "get_time"}


def stream_calls(stream):
    """Accumulate streamed tool-call deltas as OpenAI clients do: by index, the first piece
    carries id and name, the others append to the arguments."""
    calls, content, finish = {}, "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = piece.id or call["id"]
            call["name"] = piece.function.name or call["name"]
            call["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return [calls[i] for i in sorted(calls)], content, finish


@pytest.mark.parametrize("tool_choice", [NAMED, "required"])
def test_streamed_forced_calls_arrive_as_deltas(client, model, tool_choice):
    stream = client.chat.completions.create(model=model, messages=USER, tools=TOOLS,
                                            tool_choice=tool_choice, max_tokens=80, seed=4,
                                            stream=True)
    calls, content, finish = stream_calls(stream)
    assert finish == "tool_calls" and content == ""
    assert calls and all(c["id"].startswith("call_") for c in calls)
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_auto_parses_hermes_blocks_streamed_and_not(client, model):
    import re
    kwargs = dict(model=model, messages=USER, tools=TOOLS, max_tokens=60,
                  extra_body={"regex": re.escape("Sure. " + HERMES)})
    resp = client.chat.completions.create(**kwargs)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == [("get_time", {"zone": "UTC"})]
    calls, content, finish = stream_calls(client.chat.completions.create(**kwargs, stream=True))
    assert finish == "tool_calls" and content == "Sure. "
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_time",
                                                                         {"zone": "UTC"})]


def test_auto_without_a_call_is_plain_text_and_none_hides_the_tools(client, model):
    resp = client.chat.completions.create(model=model, messages=USER, tools=TOOLS,
                                          max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert resp.choices[0].message.tool_calls is None
    assert resp.choices[0].finish_reason == "length"
    with_tools = resp.usage.prompt_tokens
    none = client.chat.completions.create(model=model, messages=USER, tools=TOOLS,
                                          tool_choice="none", max_tokens=1)
    plain = client.chat.completions.create(model=model, messages=USER, max_tokens=1)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < with_tools


def test_history_with_tool_calls_and_tool_results_renders(client, model):
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    resp = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                          max_tokens=3)
    shorter = client.chat.completions.create(model=model, messages=messages[:1], tools=TOOLS,
                                             max_tokens=3)
    assert resp.usage.prompt_tokens > shorter.usage.prompt_tokens + 10


BAD = [
    ({"tool_choice": "required"}, "tool_choice", "only allowed when tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "not in tools"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools", "distinct"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "function"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice", "cannot be combined"),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "bogus"}}}}}],
      "tool_choice": "required"}, "tool_choice", "Invalid JSON schema"),
]


@pytest.mark.parametrize("extra,param,words", BAD)
def test_bad_tool_requests_are_400s(http, model, extra, param, words):
    resp = http.post("/v1/chat/completions", json={"model": model, "messages": USER,
                                                    "max_tokens": 3, **extra})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param, error
    assert words in error["message"], error["message"]


# Enough of each family's template to teach its format (tool_parsers.tool_call_format).
MISTRAL_TEMPLATE = (
    "{%- if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{%- elif m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls|tojson }}"
    "{%- elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]"
    "{%- else %}{{ m.content }}{%- endif %}{%- endfor %}")
LLAMA3_TEMPLATE = (
    '{%- if tools %}Respond in the format {"name": function name, "parameters": dictionary of '
    'argument name and its value}. {% for t in tools %}{{ t|tojson }}{% endfor %}{% endif %}'
    "{%- for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
    "{%- if m.tool_calls %}<|python_tag|>{{ m.tool_calls[0].function|tojson }}"
    "{%- else %}{{ m.content }}{% endif %}<|eot_id|>{%- endfor %}")
FORMATS = {
    "mistral": (MISTRAL_TEMPLATE, 'Sure.[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}', "Sure."),
    "mistral_v03": (MISTRAL_TEMPLATE,
                    '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}]', None),
    "llama3_json": (LLAMA3_TEMPLATE, '{"name": "get_time", "parameters": {"zone": "UTC"}}', None),
}


@pytest.fixture(scope="module", params=sorted(FORMATS))
def templated(request, engine, base_url):  # base_url: the session engine is started
    """(client, model, format) of the session engine served with a chat template that teaches
    another tool-call format."""
    with serve(build_app(engine, ServerConfig(), chat_template=FORMATS[request.param][0]),
               lifespan="off") as url:
        yield (openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30),
               engine.model_name, request.param)


def test_auto_parses_the_format_the_chat_template_teaches(templated):
    """The output is forced with a regex (a random model never calls a tool by itself)."""
    import re
    client, model, fmt = templated
    _, text, content = FORMATS[fmt]
    kwargs = dict(model=model, messages=USER, tools=TOOLS, max_tokens=60,
                  extra_body={"regex": re.escape(text)})
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == content
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == [("get_time", {"zone": "UTC"})]
    calls, streamed, finish = stream_calls(client.chat.completions.create(**kwargs, stream=True))
    assert finish == "tool_calls" and streamed == (content or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_time",
                                                                         {"zone": "UTC"})]
    call = choice.message.tool_calls[0]
    if fmt.startswith("mistral"):
        assert len(call.id) == 9 and call.id.isalnum()  # Mistral templates refuse other ids
    # the parsed call replays through the same template, with its tool result
    history = USER + [choice.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    resp = client.chat.completions.create(model=model, messages=history, tools=TOOLS,
                                          max_tokens=2)
    assert resp.usage.prompt_tokens > 20
