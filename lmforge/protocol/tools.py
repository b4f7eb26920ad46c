"""Tool calling wire schemas (OpenAI API reference, "Function calling": ``tools``,
``tool_choice``, the message's ``tool_calls`` and the streamed ``delta.tool_calls``)."""

from __future__ import annotations

from typing import Any, Literal

from lmforge.protocol.base import RequestModel, ResponseModel


class FunctionDefinition(RequestModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    """``{"type": "function", "function": {"name": "..."}}``: call exactly this function."""

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(ResponseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(ResponseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(ResponseModel):
    """One streamed piece of a tool call: the first piece of call ``index`` carries ``id``,
    ``type`` and the function name; later pieces append to ``function.arguments``."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta
