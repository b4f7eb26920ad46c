"""The engine params the chat and completions routes build from a request body: a table of
completion, chat, tool, beam, ``best_of`` and structured-output requests against the exact
``SamplingParams`` / ``BeamSearchParams`` (and, for bad ones, the 400's ``param``).

``built`` composes the params as the routes do; the table was written against the code before
issue 16 gathered the builders into ``server/sampling.py``, and passes unchanged after it.
"""

from __future__ import annotations

from typing import Any

import pytest

from lmforge.engine.beam_search import BeamSearchParams
from lmforge.engine.request import SamplingParams, StructuredOutput
from lmforge.errors import InvalidRequestError
from lmforge.protocol import ChatCompletionRequest, CompletionRequest
from lmforge.server import beam
from lmforge.server.sampling import for_best_of, for_tools, sampling_params
from lmforge.server.tools import ToolPlan

HERMES = "{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>"
MISTRAL = ("{%- if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{% endif %}"
           "{{- '[TOOL_CALLS]' }}")
MESSAGES = [{"role": "user", "content": "hi"}]
ADD = {"type": "object", "properties": {"a": {"type": "integer"}}}
MUL = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": ADD}},
         {"type": "function", "function": {"name": "mul", "parameters": MUL}}]


class FakeTokenizer:
    """The one tokenizer question params depend on: is a tool-call marker a special token."""

    def __init__(self, *special: str):
        self.special = set(special)

    def is_special_token(self, text: str) -> bool:
        return text in self.special


NO_SPECIAL = FakeTokenizer()


def built(body: dict[str, Any], template: str | None = None,
          tokenizer: FakeTokenizer = NO_SPECIAL) -> SamplingParams | BeamSearchParams:
    """The params the route hands the engine for ``body`` (chat when it has ``messages``)."""
    chat = "messages" in body
    request = (ChatCompletionRequest if chat else CompletionRequest).model_validate(
        {"model": "m", **body})
    request.check()
    if beam.is_beam_search(request):
        return beam.beam_params(request)
    if chat:
        return for_tools(sampling_params(request), ToolPlan.of(request, template), tokenizer)
    return for_best_of(sampling_params(request), request)


def required_schema(parallel: bool = True) -> dict[str, Any]:
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, schema in (("add", ADD), ("mul", MUL))]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    return schema if parallel else {**schema, "maxItems": 1}


EVERY_FIELD = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
               "presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.1,
               "seed": 7, "stop": ["x", "yz"], "stop_token_ids": [5, 6], "ignore_eos": True,
               "skip_special_tokens": False, "include_stop_str_in_output": True,
               "logit_bias": {"12": -100, "7": 5.5}}
EVERY_PARAM = {**EVERY_FIELD, "logit_bias": {12: -100, 7: 5.5}}

CASES: list[tuple[str, dict[str, Any], str | None, FakeTokenizer,
                  SamplingParams | BeamSearchParams]] = [
    # completions
    ("completion defaults", {"prompt": "hi"}, None, FakeTokenizer(), SamplingParams()),
    ("completion every field", {"prompt": "hi", "max_tokens": 32, "logprobs": 3, **EVERY_FIELD},
     None, FakeTokenizer(), SamplingParams(max_tokens=32, logprobs=3, **EVERY_PARAM)),
    ("completion nulls are OpenAI's defaults",
     {"prompt": "hi", "max_tokens": None, "temperature": None, "top_p": None, "stop": None,
      "seed": None, "logit_bias": None}, None, FakeTokenizer(), SamplingParams(max_tokens=None)),
    ("completion top_k -1, stop string, greedy",
     {"prompt": ["a", "b"], "top_k": -1, "stop": "\n", "temperature": 0, "n": 3}, None,
     FakeTokenizer(), SamplingParams(top_k=0, stop=["\n"], temperature=0.0)),
    ("completion echo with logprobs", {"prompt": "hi", "echo": True, "logprobs": 1,
                                       "max_tokens": 5}, None, FakeTokenizer(),
     SamplingParams(max_tokens=5, logprobs=1, prompt_logprobs=1)),
    ("completion echo, max_tokens 0 (prompt only)",
     {"prompt": "hi", "echo": True, "max_tokens": 0, "logprobs": 2}, None, FakeTokenizer(),
     SamplingParams(max_tokens=1, logprobs=2, prompt_logprobs=2)),
    ("best_of ranks by logprobs", {"prompt": "hi", "best_of": 3}, None, FakeTokenizer(),
     SamplingParams(logprobs=0)),
    ("best_of keeps the requested logprobs", {"prompt": "hi", "best_of": 3, "logprobs": 2},
     None, FakeTokenizer(), SamplingParams(logprobs=2)),
    ("best_of equal to n chooses nothing", {"prompt": "hi", "best_of": 2, "n": 2}, None,
     FakeTokenizer(), SamplingParams()),
    # structured output
    ("completion regex", {"prompt": "hi", "regex": "[0-9]+"}, None, FakeTokenizer(),
     SamplingParams(structured=StructuredOutput(regex="[0-9]+", param="regex"))),
    ("completion guided_choice", {"prompt": "hi", "guided_choice": ["yes", "no"]}, None,
     FakeTokenizer(), SamplingParams(structured=StructuredOutput(
         choice=("yes", "no"), param="guided_choice"))),
    ("completion guided_json string", {"prompt": "hi", "guided_json": '{"type": "integer"}'},
     None, FakeTokenizer(), SamplingParams(structured=StructuredOutput(
         json_schema={"type": "integer"}, param="guided_json"))),
    ("chat json_object", {"messages": MESSAGES, "response_format": {"type": "json_object"}},
     None, FakeTokenizer(), SamplingParams(max_tokens=None, structured=StructuredOutput(
         json_schema={"type": "object"}))),
    ("chat json_schema, not strict",
     {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
         "name": "add", "schema": ADD}}}, None, FakeTokenizer(),
     SamplingParams(max_tokens=None, structured=StructuredOutput(json_schema=ADD,
                                                                 strict=False))),
    ("chat response_format text is no constraint",
     {"messages": MESSAGES, "response_format": {"type": "text"}}, None, FakeTokenizer(),
     SamplingParams(max_tokens=None)),
    # chat
    ("chat defaults", {"messages": MESSAGES}, None, FakeTokenizer(),
     SamplingParams(max_tokens=None)),
    ("chat every field", {"messages": MESSAGES, "max_tokens": 9, **EVERY_FIELD}, None,
     FakeTokenizer(), SamplingParams(max_tokens=9, **EVERY_PARAM)),
    ("chat max_completion_tokens wins, top_logprobs",
     {"messages": MESSAGES, "max_tokens": 10, "max_completion_tokens": 20, "logprobs": True,
      "top_logprobs": 3}, None, FakeTokenizer(), SamplingParams(max_tokens=20, logprobs=3)),
    ("chat logprobs alone", {"messages": MESSAGES, "logprobs": True}, None, FakeTokenizer(),
     SamplingParams(max_tokens=None, logprobs=0)),
    ("chat logprobs false", {"messages": MESSAGES, "logprobs": False}, None, FakeTokenizer(),
     SamplingParams(max_tokens=None)),
    # tools
    ("tools auto, Hermes", {"messages": MESSAGES, "tools": TOOLS, "temperature": 0}, HERMES,
     FakeTokenizer(), SamplingParams(max_tokens=None, temperature=0.0)),
    ("tools auto, no template", {"messages": MESSAGES, "tools": TOOLS}, None, FakeTokenizer(),
     SamplingParams(max_tokens=None)),
    ("tools auto, Mistral marker not special", {"messages": MESSAGES, "tools": TOOLS},
     MISTRAL, FakeTokenizer(), SamplingParams(max_tokens=None)),
    ("tools auto, Mistral marker special keeps special tokens",
     {"messages": MESSAGES, "tools": TOOLS}, MISTRAL, FakeTokenizer("[TOOL_CALLS]"),
     SamplingParams(max_tokens=None, skip_special_tokens=False)),
    ("tool_choice none", {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "none",
                          "response_format": {"type": "json_object"}}, MISTRAL,
     FakeTokenizer("[TOOL_CALLS]"), SamplingParams(max_tokens=None, structured=StructuredOutput(
         json_schema={"type": "object"}))),
    ("tool_choice named", {"messages": MESSAGES, "tools": TOOLS, "max_tokens": 30,
                           "tool_choice": {"type": "function", "function": {"name": "mul"}}},
     HERMES, FakeTokenizer(), SamplingParams(max_tokens=30, structured=StructuredOutput(
         json_schema=MUL, param="tool_choice"))),
    ("tool_choice required", {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
                              "seed": 3}, None, FakeTokenizer(),
     SamplingParams(max_tokens=None, seed=3, structured=StructuredOutput(
         json_schema=required_schema(), param="tool_choice"))),
    ("tool_choice required, one call",
     {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
      "parallel_tool_calls": False}, MISTRAL, FakeTokenizer("[TOOL_CALLS]"),
     SamplingParams(max_tokens=None, structured=StructuredOutput(
         json_schema=required_schema(parallel=False), param="tool_choice"))),
    # beam search
    ("completion beams", {"prompt": "hi", "num_beams": 3}, None, FakeTokenizer(),
     BeamSearchParams(beam_width=3)),
    ("completion beams, every beam field",
     {"prompt": ["a", "b"], "num_beams": 4, "n": 2, "best_of": 4, "max_tokens": 8,
      "echo": True, "logprobs": 1, "stop": "\n", "stop_token_ids": [3], "ignore_eos": True,
      "skip_special_tokens": False, "include_stop_str_in_output": True,
      "length_penalty": 0.5, "early_stopping": "never", "top_k": 7, "seed": 1}, None,
     FakeTokenizer(),
     BeamSearchParams(beam_width=4, max_tokens=8, length_penalty=0.5, early_stopping="never",
                      stop=["\n"], stop_token_ids=[3], ignore_eos=True,
                      skip_special_tokens=False, include_stop_str_in_output=True, logprobs=1,
                      prompt_logprobs=1, top_k=7, seed=1)),
    ("completion use_beam_search takes max(n, best_of)",
     {"prompt": "hi", "use_beam_search": True, "n": 2, "best_of": 5, "temperature": 0}, None,
     FakeTokenizer(), BeamSearchParams(beam_width=5, temperature=0.0)),
    ("chat beam sampling",
     {"messages": MESSAGES, "use_beam_search": True, "n": 2, "temperature": 0.8, "top_k": -1,
      "top_p": 0.9, "min_p": 0.1, "seed": 5, "max_completion_tokens": 12, "logprobs": True,
      "top_logprobs": 2, "early_stopping": True}, None, FakeTokenizer(),
     BeamSearchParams(beam_width=2, max_tokens=12, early_stopping=True, logprobs=2,
                      do_sample=True, temperature=0.8, top_k=0, top_p=0.9, min_p=0.1,
                      seed=5)),
    ("chat beams with tool_choice none",
     {"messages": MESSAGES, "num_beams": 2, "tools": TOOLS, "tool_choice": "none",
      "presence_penalty": 0, "logit_bias": {}}, HERMES, FakeTokenizer(),
     BeamSearchParams(beam_width=2, max_tokens=None)),
]


@pytest.mark.parametrize("name,body,template,tokenizer,expected", CASES,
                         ids=[case[0] for case in CASES])
def test_the_params_built_for_a_request(name, body, template, tokenizer, expected):
    got = built(body, template, tokenizer)
    assert type(got) is type(expected)
    assert got == expected


ERRORS: list[tuple[str, dict[str, Any], str | None, str]] = [
    ("max_completion_tokens 0", {"messages": MESSAGES, "max_completion_tokens": 0}, None,
     "max_completion_tokens"),
    ("chat max_tokens 0", {"messages": MESSAGES, "max_tokens": 0}, None, "max_tokens"),
    ("temperature out of range", {"prompt": "hi", "temperature": 3}, None, "temperature"),
    ("logit_bias key not a token id", {"prompt": "hi", "logit_bias": {"a": 1}}, None,
     "logit_bias"),
    ("two constraints", {"prompt": "hi", "regex": "a", "guided_choice": ["a"]}, None,
     "guided_choice"),
    ("a forced call and a constraint",
     {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
      "response_format": {"type": "json_object"}}, None, "tool_choice"),
    ("beams with structured output", {"prompt": "hi", "num_beams": 2, "regex": "a"}, None,
     "num_beams"),
    ("beams with tools", {"messages": MESSAGES, "num_beams": 2, "tools": TOOLS}, HERMES,
     "tools"),
    ("beams with a penalty", {"prompt": "hi", "num_beams": 2, "presence_penalty": 0.5}, None,
     "presence_penalty"),
    ("beams with a bad logit_bias key", {"prompt": "hi", "num_beams": 2,
                                         "logit_bias": {"a": 1}}, None, "logit_bias"),
    ("beams streamed", {"prompt": "hi", "num_beams": 2, "stream": True,
                        "presence_penalty": 1}, None, "stream"),
    ("beams with max_completion_tokens 0",
     {"messages": MESSAGES, "num_beams": 2, "max_completion_tokens": 0}, None,
     "max_completion_tokens"),
    ("beam sampling needs temperature > 0 before its range checks",
     {"prompt": "hi", "num_beams": 2, "temperature": 0.5, "length_penalty": float("nan"),
      "top_p": 5}, None, "length_penalty"),
]


@pytest.mark.parametrize("name,body,template,param", ERRORS, ids=[e[0] for e in ERRORS])
def test_a_bad_request_names_its_parameter(name, body, template, param):
    with pytest.raises(InvalidRequestError) as raised:
        built(body, template)
    assert raised.value.param == param
