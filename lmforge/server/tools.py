"""Tool calling on chat completions: prompt rendering, constrained calls, parsing and streaming.

``tool_choice`` modes (``ChatCompletionRequest.tool_mode``), as vLLM implements OpenAI's:

- ``none``: the tools are not shown to the model; plain text comes back.
- ``named`` (``{"type": "function", "function": {"name": F}}``): the whole output is generated
  under F's ``parameters`` schema (structured output), so it always parses; it becomes one call
  of F.
- ``required``: the output is generated under the schema of a JSON array of at least one
  ``{"name": <a tool>, "arguments": <its parameters>}`` (at most one with
  ``parallel_tool_calls: false``) and becomes those calls.
- ``auto``: the model writes text, and tool calls are parsed out of it in the format its chat
  template teaches (``server/tool_parsers.py``: Hermes ``<tool_call>`` blocks, Llama 3's JSON,
  Mistral's ``[TOOL_CALLS]``). When that format's marker is a special token, the reply is
  decoded with special tokens kept, so the marker is seen (as vLLM does for Mistral).

The model sees the tools through its chat template's ``tools`` variable when the template uses
one; a template without tool support (SmolLM2's) gets a system-prompt section describing the
tools and the Hermes format, and replayed assistant tool calls are written back in that format.
A parsed call's ``finish_reason`` is ``tool_calls``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lmforge.protocol.chat import ChatCompletionRequest
from lmforge.protocol.tools import FunctionCallDelta, Tool, ToolCall, ToolCallDelta
from lmforge.server.tool_parsers import FORMATS, ToolCallFormat, tool_call_format

HERMES = FORMATS["hermes"]


@dataclass
class ToolPlan:
    """What one request does with its tools (see the module docstring)."""

    mode: str  # none | auto | required | named
    tools: list[Tool] = field(default_factory=list)
    function: str | None = None  # the named function
    parallel: bool = True  # more than one call per reply allowed
    format: ToolCallFormat = HERMES  # how the model writes calls (``auto``) and their ids

    @classmethod
    def of(cls, body: ChatCompletionRequest, template: str | None) -> ToolPlan:
        """The plan for ``body`` rendered with the chat template text ``template``."""
        choice = body.tool_choice
        return cls(body.tool_mode, list(body.tools or []),
                   choice.function.name if body.tool_mode == "named" else None,  # type: ignore
                   body.parallel_tool_calls is not False, tool_call_format(template))

    def structured_output(self) -> dict[str, Any] | None:
        """``StructuredOutput`` kwargs that force a call (``named`` / ``required``), else None
        (``server/sampling.for_tools`` puts them into the request's ``SamplingParams``)."""
        if self.mode == "named":
            return {"json_schema": self._parameters(self.function), "strict": True,
                    "param": "tool_choice"}
        if self.mode != "required":
            return None
        calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                   "arguments": self._parameters(t.function.name)},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for t in self.tools]
        schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        return {"json_schema": schema, "strict": True, "param": "tool_choice"}

    def render(self, messages: list[dict[str, Any]], template: str | None
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The messages and extra template variables for the chat template."""
        if self.mode == "none":
            return messages, {}
        if template is not None and "tools" in template:
            return [_arguments_as_objects(m) for m in messages], {
                "tools": [t.model_dump(exclude_none=True) for t in self.tools]}
        return _describe_tools(self.tools, [_calls_as_text(m) for m in messages]), {}

    def parse(self, text: str, finish_reason: str | None
              ) -> tuple[str | None, list[ToolCall], str | None]:
        """A finished reply -> ``(content, tool_calls, finish_reason)``.

        Forced calls that do not parse (cut off by ``max_tokens``) stay text.
        """
        if self.mode == "none":
            return text, [], finish_reason
        if self.mode == "named":
            calls = [self.format.call(self.function or "", text)] if _is_json(text) else []
            rest: str | None = None if calls else text
        elif self.mode == "required":
            calls = self.forced_calls(text)
            rest = None if calls else text
        else:
            rest, calls = self.format.parse(text, self.names())
        if calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return rest, calls, finish_reason

    def forced_calls(self, text: str) -> list[ToolCall]:
        """``[{"name", "arguments"}, ...]`` (the ``required`` grammar's output) -> calls."""
        try:
            items = json.loads(text)
        except ValueError:
            return []
        return [self.format.call(item["name"], item["arguments"]) for item in items]

    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}

    def _parameters(self, name: str | None) -> dict[str, Any]:
        tool = next(t for t in self.tools if t.function.name == name)
        return tool.function.parameters or {"type": "object"}


class ToolCallStream:
    """Turns one choice's text deltas into chat deltas: ``(content, tool_call_deltas)`` pairs.

    ``named``: the call's header first, then every text delta as an arguments piece.
    ``required``: nothing until the end, then every call whole. ``auto``: text streams as
    content until the format's marker; from there the text is held, and sent as calls when a
    call closes (Hermes' ``</tool_call>``) or the reply ends (formats whose calls run to the
    end). Text that might be the start of the marker is held back meanwhile.
    """

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.num_calls = 0
        self._text = ""  # required: everything; auto: what is held back
        self._inside = False  # auto: ``_text`` starts with the format's marker
        self._first = True  # auto: no content released yet

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        mode = self.plan.mode
        if mode == "none" or not text:
            return text, []
        if mode == "named":
            deltas = [] if self.num_calls else [self._header(self.plan.function)]
            self.num_calls = 1
            return "", deltas + [ToolCallDelta(index=0, function=FunctionCallDelta(
                arguments=text))]
        self._text += text
        return ("", []) if mode == "required" else self._scan()

    def finish(self, finish_reason: str | None) -> tuple[str, list[ToolCallDelta], str | None]:
        """What was held back, and the finish_reason (``tool_calls`` if a call was sent)."""
        content, deltas = "", []
        if self.plan.mode == "required":
            calls = self.plan.forced_calls(self._text)
            content = "" if calls else self._text
            deltas = [self._whole(c) for c in calls]
        elif self.plan.mode == "auto":
            rest, calls = self.plan.format.parse(self._text, self.plan.names())
            content, deltas = rest or "", [self._whole(c) for c in calls]
        self._text, self._inside = "", False
        if self.num_calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return content, deltas, finish_reason

    def _scan(self) -> tuple[str, list[ToolCallDelta]]:
        fmt, content, deltas = self.plan.format, "", []
        while True:
            if self._inside:
                end = -1 if fmt.close is None else self._text.find(fmt.close, len(fmt.marker))
                if end < 0:
                    return content, deltas
                end += len(fmt.close)  # type: ignore[arg-type]
                rest, calls = fmt.parse(self._text[:end], self.plan.names())
                self._text, self._inside = self._text[end:], False
                content += rest or ""
                deltas += [self._whole(c) for c in calls]
                continue
            start = fmt.start(self._text, self._first and not content)
            if start is not None:
                content += self._text[:start]
                self._text, self._inside = self._text[start:], True
                continue
            keep = len(self._text) - fmt.hold(self._text, self._first and not content)
            content += self._text[:keep]
            self._text = self._text[keep:]
            self._first = self._first and not content
            return content, deltas

    def _header(self, name: str | None) -> ToolCallDelta:
        return ToolCallDelta(index=self.num_calls, id=self.plan.format.call_id(),
                             type="function", function=FunctionCallDelta(name=name, arguments=""))

    def _whole(self, call: ToolCall) -> ToolCallDelta:
        delta = ToolCallDelta(index=self.num_calls, id=call.id, type="function",
                              function=FunctionCallDelta(name=call.function.name,
                                                         arguments=call.function.arguments))
        self.num_calls += 1
        return delta


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _arguments_as_objects(message: dict[str, Any]) -> dict[str, Any]:
    """Replayed tool calls with their JSON ``arguments`` as objects: what HF templates expect."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = dict(call.get("function") or {})
        if isinstance(function.get("arguments"), str) and _is_json(function["arguments"]):
            function["arguments"] = json.loads(function["arguments"])
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls}


def _calls_as_text(message: dict[str, Any]) -> dict[str, Any]:
    """For a template without tool support: replayed calls as Hermes blocks in the content."""
    if not message.get("tool_calls"):
        return message
    blocks = [HERMES.marker + json.dumps({
        "name": (c.get("function") or {}).get("name"),
        "arguments": _arguments_as_objects({"tool_calls": [c]})["tool_calls"][0]["function"]
        .get("arguments")}, ensure_ascii=False) + HERMES.close for c in message["tool_calls"]]
    out = {k: v for k, v in message.items() if k != "tool_calls"}
    out["content"] = "\n".join(filter(None, [message.get("content") or ""] + blocks))
    return out


def _describe_tools(tools: list[Tool], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Put a description of the tools and of the call format into the system message."""
    signatures = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False)
                           for t in tools)
    section = ("# Tools\n\nYou can call these functions (JSON signatures):\n" + signatures +
               "\n\nTo call one, answer with " + HERMES.marker +
               '{"name": "<function name>", "arguments": {<arguments>}}' + HERMES.close +
               ", one block per call.")
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{section}"}] + messages[1:]
    return [{"role": "system", "content": section}] + messages
