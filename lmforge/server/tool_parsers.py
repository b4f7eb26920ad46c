"""How model families write tool calls in free text (``tool_choice: auto``), and parsing them.

Each ``ToolCallFormat`` knows the marker that opens the tool-call part of a reply, how to parse
a whole reply into ``(content, calls)``, and what the streaming parser must hold back. The
format is chosen from the chat template's text (``tool_call_format``), as vLLM's
``--tool-call-parser`` names it by hand:

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks anywhere in the
  text (Qwen2.5, Hermes, SmolLM3; and the format lmforge describes to a template without tools).
- ``llama3_json``: the whole reply is ``{"name": ..., "parameters": {...}}`` (several separated
  by ``;``), optionally after ``<|python_tag|>`` (Llama 3.1-3.3's JSON tool calling).
- ``mistral``: ``[TOOL_CALLS]`` then either a JSON list of ``{"name", "arguments"}`` (tokenizers
  before v11, e.g. Mistral-7B-Instruct-v0.3) or ``name[ARGS]{...}`` / ``name{...}`` per call, each
  after its own ``[TOOL_CALLS]`` (v11+, e.g. Mistral-Small-3.2). Call ids are 9 alphanumerics,
  the only ids Mistral's templates accept when the call is replayed.

Parsing is all-or-nothing per reply part: a call that does not parse, or names a function the
request did not offer, leaves its text as content.
"""

from __future__ import annotations

import json
import random
import re
import string
import uuid
from typing import Any

from lmforge.protocol.tools import FunctionCall, ToolCall

_DECODER = json.JSONDecoder()


class ToolCallFormat:
    """A model family's way of writing tool calls (see the module docstring).

    Attributes:
        name: vLLM's parser name for the format.
        marker: the text that opens the tool-call part of a reply.
        close: the text that closes one call (Hermes), or None when the calls run to the end.
    """

    name = ""
    marker = ""
    close: str | None = None

    def start(self, text: str, first: bool) -> int | None:
        """Where the tool-call part starts in ``text`` (held, unreleased text), or None.

        ``first``: no content has been released yet (``text`` is the start of the reply).
        """
        i = text.find(self.marker)
        return None if i < 0 else i

    def hold(self, text: str, first: bool) -> int:
        """How many characters at the end of ``text`` might still open a call (held back)."""
        return _partial_suffix(text, self.marker)

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
        """A reply (or its held tail) -> ``(content, calls)``; content None when only calls."""
        raise NotImplementedError

    def call_id(self) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"

    def call(self, name: str, arguments: Any) -> ToolCall:
        """A call with ``arguments`` (an object, or its JSON text) as JSON text."""
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        return ToolCall(id=self.call_id(), function=FunctionCall(name=name, arguments=arguments))


class Hermes(ToolCallFormat):
    name, marker, close = "hermes", "<tool_call>", "</tool_call>"

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
        calls: list[ToolCall] = []

        def take(match: re.Match) -> str:
            obj = _json_object(match.group(1).strip())
            if obj is None or obj.get("name") not in names:
                return match.group(0)
            calls.append(self.call(obj["name"], obj.get("arguments", obj.get("parameters", {}))))
            return ""

        block = re.escape(self.marker) + r"(.*?)(?:" + re.escape(self.close) + "|$)"
        rest = re.sub(block, take, text, flags=re.DOTALL).strip()
        return (rest or None) if calls else text, calls


class Llama3Json(ToolCallFormat):
    name, marker = "llama3_json", "<|python_tag|>"

    def start(self, text: str, first: bool) -> int | None:
        i = text.find(self.marker)
        if i >= 0:
            return i
        stripped = text.lstrip()
        return len(text) - len(stripped) if first and stripped.startswith("{") else None

    def hold(self, text: str, first: bool) -> int:
        stripped = text.lstrip()
        if first and self.marker.startswith(stripped):  # whitespace, or a start of the marker
            return len(text)
        return super().hold(text, first)

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
        head, tag, body = text.partition(self.marker)
        if not tag:
            if not text.lstrip().startswith("{"):
                return text, []
            head, body = "", text
        objects = _json_objects(body, separators=";")
        if not objects or any(o.get("name") not in names for o in objects):
            return text, []
        calls = [self.call(o["name"], o.get("parameters", o.get("arguments", {})))
                 for o in objects]
        return head.strip() or None, calls


class Mistral(ToolCallFormat):
    name, marker = "mistral", "[TOOL_CALLS]"
    _NAMED = re.compile(r"\s*([\w.-]+)(?:\[CALL_ID\][^\[{]*)?(?:\[ARGS\])?(.*)", re.DOTALL)

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
        head, tag, body = text.partition(self.marker)
        if not tag:
            return text, []
        found: list[tuple[Any, Any]] = []
        for part in body.split(self.marker):
            if part.lstrip().startswith("["):  # before v11: [{"name", "arguments"}, ...]
                try:
                    items, end = _DECODER.raw_decode(part.strip())
                except ValueError:
                    return text, []
                if not isinstance(items, list) or part.strip()[end:].strip():
                    return text, []
                found += [(i.get("name"), i.get("arguments", {})) if isinstance(i, dict)
                          else (None, None) for i in items]
            else:  # v11+: name[ARGS]{...}
                match = self._NAMED.fullmatch(part)
                args = _json_object(match.group(2).strip()) if match else None
                found.append((match.group(1), args) if match else (None, None))
        if not found or any(n not in names or not isinstance(a, dict) for n, a in found):
            return text, []
        return head.strip() or None, [self.call(n, a) for n, a in found]

    def call_id(self) -> str:
        return "".join(random.choices(string.ascii_letters + string.digits, k=9))


FORMATS = {f.name: f for f in (Hermes(), Llama3Json(), Mistral())}


def tool_call_format(template: str | None) -> ToolCallFormat:
    """The format a chat template teaches its model (Hermes when the template shows no tools:
    lmforge then describes the tools and the Hermes format in the system prompt)."""
    if template is None or "tools" not in template:
        return FORMATS["hermes"]
    if Mistral.marker in template:
        return FORMATS["mistral"]
    if Llama3Json.marker in template or '"parameters": dictionary of argument' in template:
        return FORMATS["llama3_json"]
    return FORMATS["hermes"]


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _json_objects(text: str, separators: str) -> list[dict[str, Any]]:
    """``{...}<sep>{...}...`` -> the objects; [] if anything else is in ``text``."""
    objects, i = [], 0
    while True:
        while i < len(text) and (text[i].isspace() or (objects and text[i] in separators)):
            i += 1
        if i == len(text):
            return objects
        try:
            obj, i = _DECODER.raw_decode(text, i)
        except ValueError:
            return []
        if not isinstance(obj, dict):
            return []
        objects.append(obj)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
