"""The pure parts of tool calling (``server/tools.py``, ``server/tool_parsers.py``): the
format a chat template picks, parsing each format (Hermes, Llama 3 JSON, Mistral before and
after v11) whole and with the streaming parser fed one character at a time, and prompt
rendering with and without template support."""

from __future__ import annotations

import json

import pytest

from lmforge.protocol.chat import ChatCompletionRequest
from lmforge.server.tool_parsers import tool_call_format
from lmforge.server.tools import ToolCallStream, ToolPlan

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}}}}]


# Excerpts of the real templates' tool sections, enough to pick the format.
TEMPLATES = {
    "hermes": "{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>",
    "llama3_json": '{%- if tools %}Respond in the format {"name": function name, "parameters": '
                   'dictionary of argument name and its value}.{{- "<|python_tag|>" }}{% endif %}',
    "mistral": "{%- if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{% endif %}"
               "{{- '[TOOL_CALLS]' }}",
}


def plan(template: str | None = None, **kw) -> ToolPlan:
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                 tools=TOOLS, **kw)
    body.check()
    return ToolPlan.of(body, template)


def test_the_template_picks_the_format():
    for name, template in TEMPLATES.items():
        assert tool_call_format(template).name == name
    assert tool_call_format(None).name == "hermes"  # lmforge describes the Hermes format
    assert tool_call_format("[TOOL_CALLS]{{ messages }}").name == "hermes"


HERMES = [
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
LLAMA3 = [
    ('{"name": "add", "parameters": {"a": 1}}', None, [("add", {"a": 1})]),
    ('  <|python_tag|>{"name": "add", "parameters": {"a": 1}}; {"name": "add", "arguments": '
     '{"a": 2}}', None, [("add", {"a": 1}), ("add", {"a": 2})]),
    ('Let me add. <|python_tag|>{"name": "add", "parameters": {}}', "Let me add.",
     [("add", {})]),
    ('The answer is {"name": "add"}', 'The answer is {"name": "add"}', []),
    ('{"name": "sub", "parameters": {}}', '{"name": "sub", "parameters": {}}', []),
    ('{"name": "add", "parameters": {"a": 1}} and more', '{"name": "add", "parameters": '
     '{"a": 1}} and more', []),
    ("<|python", "<|python", []),
    ("  ", "  ", []),
]
MISTRAL = [
    ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"name": "add", "arguments": {}}]',
     None, [("add", {"a": 1}), ("add", {})]),
    ('Sure. [TOOL_CALLS] [{"name": "add", "arguments": {"a": 3}}]', "Sure.",
     [("add", {"a": 3})]),
    ('[TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]add{"a": 2}', None,
     [("add", {"a": 1}), ("add", {"a": 2})]),
    ('[TOOL_CALLS]add[CALL_ID]abc123XYZ[ARGS]{"a": 5}', None, [("add", {"a": 5})]),
    ('[TOOL_CALLS]sub[ARGS]{"a": 1}', '[TOOL_CALLS]sub[ARGS]{"a": 1}', []),
    ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}', '[TOOL_CALLS][{"name": "add", '
     '"arguments": {"a": 1}', []),
    ("no call [TOOL_CA", "no call [TOOL_CA", []),
]
CASES = ([("hermes", *c) for c in HERMES] + [("llama3_json", *c) for c in LLAMA3]
         + [("mistral", *c) for c in MISTRAL])


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_auto_parse_whole_and_streamed_one_character_at_a_time(fmt, text, content, calls):
    def plan():  # noqa: F811 - this format's plan
        return globals()["plan"](TEMPLATES[fmt])

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
    assert streamed.strip() == (content or "").strip()
    if fmt == "mistral":  # the only ids Mistral's templates accept when a call is replayed
        assert all(len(c.id) == 9 and c.id.isalnum() for c in got_calls)


def test_auto_keeps_special_tokens_when_the_marker_is_one(smollm2_gguf_path):
    from lmforge.engine.request import SamplingParams
    from lmforge.server.sampling import for_tools
    from lmforge.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_gguf(smollm2_gguf_path)  # its own copy: it gets a new token
    mistral = plan(TEMPLATES["mistral"])
    assert not tokenizer.is_special_token("[TOOL_CALLS]")
    assert for_tools(SamplingParams(), mistral, tokenizer).skip_special_tokens
    tokenizer.hf.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    assert tokenizer.is_special_token("[TOOL_CALLS]")
    assert not for_tools(SamplingParams(), mistral, tokenizer).skip_special_tokens
    for other in (plan(TEMPLATES["mistral"], tool_choice="none"), plan(TEMPLATES["hermes"])):
        assert for_tools(SamplingParams(), other, tokenizer).skip_special_tokens


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
