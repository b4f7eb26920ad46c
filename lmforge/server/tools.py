"""Tool calling on chat completions: prompt rendering, constrained calls, parsing and streaming.

``tool_choice`` modes (``ChatCompletionRequest.tool_mode``), as vLLM implements OpenAI's:

- ``none``: the tools are not shown to the model; plain text comes back.
- ``named`` (``{"type": "function", "function": {"name": F}}``): the whole output is generated
  under F's ``parameters`` schema (structured output), so it always parses; it becomes one call
  of F.
- ``required``: the output is generated under the schema of a JSON array of at least one
  ``{"name": <a tool>, "arguments": <its parameters>}`` (at most one with
  ``parallel_tool_calls: false``) and becomes those calls.
- ``auto``: the model writes text, and ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks (the Hermes format, used by Qwen2.5, Hermes and SmolLM3 templates) are parsed out of it.

The model sees the tools through its chat template's ``tools`` variable when the template uses
one; a template without tool support (SmolLM2's) gets a system-prompt section describing the
tools and the Hermes format, and replayed assistant tool calls are written back in that format.
A parsed call's ``finish_reason`` is ``tool_calls``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from lmforge.protocol.chat import ChatCompletionRequest
from lmforge.protocol.tools import FunctionCall, FunctionCallDelta, Tool, ToolCall, ToolCallDelta

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + "|$)",
                    re.DOTALL)


@dataclass
class ToolPlan:
    """What one request does with its tools (see the module docstring)."""

    mode: str  # none | auto | required | named
    tools: list[Tool] = field(default_factory=list)
    function: str | None = None  # the named function
    parallel: bool = True  # more than one call per reply allowed

    @classmethod
    def of(cls, body: ChatCompletionRequest) -> ToolPlan:
        choice = body.tool_choice
        return cls(body.tool_mode, list(body.tools or []),
                   choice.function.name if body.tool_mode == "named" else None,  # type: ignore
                   body.parallel_tool_calls is not False)

    def structured_output(self) -> dict[str, Any] | None:
        """``StructuredOutput`` kwargs that force a call (``named`` / ``required``), else None."""
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
            calls = [_call(self.function, text)] if _is_json(text) else []
            rest: str | None = None if calls else text
        elif self.mode == "required":
            calls = _forced_calls(text)
            rest = None if calls else text
        else:
            rest, calls = _parse_blocks(text, {t.function.name for t in self.tools})
        if calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return rest, calls, finish_reason

    def _parameters(self, name: str | None) -> dict[str, Any]:
        tool = next(t for t in self.tools if t.function.name == name)
        return tool.function.parameters or {"type": "object"}


class ToolCallStream:
    """Turns one choice's text deltas into chat deltas: ``(content, tool_call_deltas)`` pairs.

    ``named``: the call's header first, then every text delta as an arguments piece.
    ``required``: nothing until the end, then every call whole. ``auto``: text streams as
    content, except a ``<tool_call>`` block, which is held until it closes and then sent as a
    call (text that might be the start of ``<tool_call>`` is held back meanwhile).
    """

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.num_calls = 0
        self._text = ""  # required: everything; auto: what is held back
        self._inside = False  # auto: within a <tool_call> block

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
            calls = _forced_calls(self._text)
            content = "" if calls else self._text
            deltas = [self._whole(c) for c in calls]
        elif self.plan.mode == "auto":
            held = (TOOL_CALL_OPEN if self._inside else "") + self._text  # maybe unterminated
            rest, calls = _parse_blocks(held, self._names())
            content, deltas = rest or "", [self._whole(c) for c in calls]
        self._text, self._inside = "", False
        if self.num_calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return content, deltas, finish_reason

    def _scan(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = "", []
        while True:
            if self._inside:
                end = self._text.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return content, deltas
                block = self._text[:end + len(TOOL_CALL_CLOSE)]
                self._text, self._inside = self._text[end + len(TOOL_CALL_CLOSE):], False
                rest, calls = _parse_blocks(TOOL_CALL_OPEN + block, self._names())
                content += rest or ""
                deltas += [self._whole(c) for c in calls]
                continue
            start = self._text.find(TOOL_CALL_OPEN)
            if start >= 0:
                content += self._text[:start]
                self._text, self._inside = self._text[start + len(TOOL_CALL_OPEN):], True
                continue
            keep = _partial_suffix(self._text, TOOL_CALL_OPEN)
            content += self._text[:len(self._text) - keep]
            self._text = self._text[len(self._text) - keep:]
            return content, deltas

    def _names(self) -> set[str]:
        return {t.function.name for t in self.plan.tools}

    def _header(self, name: str | None) -> ToolCallDelta:
        return ToolCallDelta(index=self.num_calls, id=_call_id(), type="function",
                             function=FunctionCallDelta(name=name, arguments=""))

    def _whole(self, call: ToolCall) -> ToolCallDelta:
        delta = ToolCallDelta(index=self.num_calls, id=call.id, type="function",
                              function=FunctionCallDelta(name=call.function.name,
                                                         arguments=call.function.arguments))
        self.num_calls += 1
        return delta


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str | None, arguments: str) -> ToolCall:
    return ToolCall(id=_call_id(), function=FunctionCall(name=name or "", arguments=arguments))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _forced_calls(text: str) -> list[ToolCall]:
    """``[{"name", "arguments"}, ...]`` (the ``required`` grammar's output) -> calls."""
    try:
        items = json.loads(text)
    except ValueError:
        return []
    return [_call(item["name"], json.dumps(item["arguments"], ensure_ascii=False))
            for item in items]


def _parse_blocks(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """Hermes ``<tool_call>`` blocks of known functions -> calls; the rest stays content
    (a block that does not parse, or names an unknown function, stays too)."""
    calls: list[ToolCall] = []

    def take(match: re.Match) -> str:
        try:
            obj = json.loads(match.group(1).strip())
        except ValueError:
            return match.group(0)
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return match.group(0)
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append(_call(obj["name"], args if isinstance(args, str)
                           else json.dumps(args, ensure_ascii=False)))
        return ""

    rest = _BLOCK.sub(take, text).strip()
    return (rest or None) if calls else text, calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


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
    blocks = [TOOL_CALL_OPEN + json.dumps({
        "name": (c.get("function") or {}).get("name"),
        "arguments": _arguments_as_objects({"tool_calls": [c]})["tool_calls"][0]["function"]
        .get("arguments")}, ensure_ascii=False) + TOOL_CALL_CLOSE for c in message["tool_calls"]]
    out = {k: v for k, v in message.items() if k != "tool_calls"}
    out["content"] = "\n".join(filter(None, [message.get("content") or ""] + blocks))
    return out


def _describe_tools(tools: list[Tool], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Put a description of the tools and of the call format into the system message."""
    signatures = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False)
                           for t in tools)
    section = ("# Tools\n\nYou can call these functions (JSON signatures):\n" + signatures +
               "\n\nTo call one, answer with " + TOOL_CALL_OPEN +
               '{"name": "<function name>", "arguments": {<arguments>}}' + TOOL_CALL_CLOSE +
               ", one block per call.")
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{section}"}] + messages[1:]
    return [{"role": "system", "content": section}] + messages
