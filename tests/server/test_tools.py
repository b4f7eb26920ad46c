"""The pure parts of tool calling (``server/tools.py``): Hermes-block parsing, the streaming
parser fed one character at a time, and prompt rendering with and without template support."""

from __future__ import annotations

import json

import pytest

from lmforge.protocol.chat import ChatCompletionRequest
from lmforge.server.tools import ToolCallStream, ToolPlan

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}}}}]


def plan(**kw) -> ToolPlan:
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                 tools=TOOLS, **kw)
    body.check()
    return ToolPlan.of(body)


TEXTS = [
    # (model output, content, calls)
    ('I will add. <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>',
     "I will add.", [("add", {"a": 1})]),
    ('<tool_call>\n{"name": "add", "parameters": {"a": 2}}\n</tool_call>\n'
     '<tool_call>{"name": "add", "arguments": {"a": 3}}', None, [("add", {"a": 2}),
                                                               ("add", {"a": 3})]),
    ('a < b and <tool_call>{"name": "sub", "arguments": {}}</tool_call>',
     'a < b and <tool_call>{"name": "sub", "arguments": {}}</tool_call>', []),
    ("<tool_call>not json</tool_call> <tool_ca", "<tool_call>not json</tool_call> <tool_ca",
     []),
]


@pytest.mark.parametrize("text,content,calls", TEXTS)
def test_auto_parse_whole_and_streamed_one_character_at_a_time(text, content, calls):
    got_content, got_calls, finish = plan().parse(text, "stop")
    assert got_content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in got_calls] == calls
    assert finish == ("tool_calls" if calls else "stop")

    stream, streamed, pieces = ToolCallStream(plan()), "", {}
    for ch in text:
        piece, deltas = stream.feed(ch)
        streamed += piece
        for d in deltas:
            pieces[d.index] = (d.function.name, json.loads(d.function.arguments))
    piece, deltas, finish = stream.finish("stop")
    streamed += piece
    for d in deltas:
        pieces[d.index] = (d.function.name, json.loads(d.function.arguments))
    assert [pieces[i] for i in sorted(pieces)] == calls
    assert finish == ("tool_calls" if calls else "stop")
    # streamed content keeps its spacing; the whole-response content is stripped
    assert streamed.strip() == (content or "")


def test_a_forced_call_cut_by_max_tokens_stays_text():
    content, calls, finish = plan(tool_choice="required").parse('[{"name": "add", "argu',
                                                                "length")
    assert (content, calls, finish) == ('[{"name": "add", "argu', [], "length")


def test_render_uses_the_template_tools_variable_or_a_system_section():
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c", "type": "function",
                     "function": {"name": "add", "arguments": '{"a": 1}'}}]}]
    out, kwargs = plan().render(messages, "{% for t in tools %}{{ t }}{% endfor %}")
    assert kwargs["tools"][0]["function"]["name"] == "add"
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}  # objects for HF
    out, kwargs = plan().render(messages, "{{ messages }}")
    assert kwargs == {} and out[0]["role"] == "system" and '"name": "add"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    assert plan(tool_choice="none").render(messages, "{{ messages }}") == (messages, {})
