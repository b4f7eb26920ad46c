"""Structured-output request fields: OpenAI's ``response_format`` and vLLM/SGLang's extras.

OpenAI API reference, "Structured Outputs": ``{"type": "text"}``, ``{"type": "json_object"}``,
``{"type": "json_schema", "json_schema": {"name", "description", "schema", "strict"}}``.
vLLM's extras ``guided_json`` (a schema, as an object or a JSON string), ``guided_regex``,
``guided_choice``; SGLang's ``regex`` and vLLM's newer ``choice`` spellings of the last two.

``structured_output_spec`` turns whichever of them a request sets into one plain dict with the
fields of ``engine.request.StructuredOutput`` (protocol does not import the engine).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from lmforge.errors import InvalidRequestError
from lmforge.protocol.base import RequestModel

_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name


class TextFormat(RequestModel):
    type: Literal["text"]


class JSONObjectFormat(RequestModel):
    type: Literal["json_object"]


class JSONSchema(RequestModel):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = False


class JSONSchemaFormat(RequestModel):
    type: Literal["json_schema"]
    json_schema: JSONSchema


_FORMATS = {"text": "TextFormat", "json_object": "JSONObjectFormat",
            "json_schema": "JSONSchemaFormat"}


def _format_tag(value: Any) -> str | None:
    """The union member a ``response_format`` value is meant as, by its ``type``. The tags are
    class names, so error locations read ``response_format.json_schema.name`` (app.py drops
    capitalized union tags), not ``response_format.json_schema.json_schema.name``."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return _FORMATS.get(kind) if isinstance(kind, str) else None


ResponseFormat = Annotated[
    Annotated[TextFormat, Tag("TextFormat")]
    | Annotated[JSONObjectFormat, Tag("JSONObjectFormat")]
    | Annotated[JSONSchemaFormat, Tag("JSONSchemaFormat")],
    Discriminator(_format_tag, custom_error_type="invalid_response_format",
                  custom_error_message="type must be one of 'text', 'json_object', "
                                       "'json_schema'")]

# Request fields that constrain the output, in the order their errors are reported.
STRUCTURED_FIELDS = ("response_format", "guided_json", "regex", "guided_regex", "choice",
                     "guided_choice")


def structured_output_spec(fields: dict[str, Any]) -> dict[str, Any] | None:
    """The one constraint among ``fields`` (request field name -> value) as ``StructuredOutput``
    keyword arguments, or None when none is set (``response_format`` text counts as unset).

    Examples: ``{"regex": "[0-9]+"}`` -> ``{"regex": "[0-9]+", "param": "regex"}``;
    ``{"response_format": JSONObjectFormat(type="json_object")}`` ->
    ``{"json_schema": {"type": "object"}, "strict": True, "param": "response_format"}``.

    Raises:
        InvalidRequestError: two constraints at once, a bad schema name, a ``guided_json``
            string that is not JSON, or a schema that is not an object.
    """
    given = [(name, fields[name]) for name in STRUCTURED_FIELDS
             if fields.get(name) is not None and not isinstance(fields[name], TextFormat)]
    if not given:
        return None
    if len(given) > 1:
        names = ", ".join(name for name, _ in given)
        raise InvalidRequestError(f"Only one of {names} may be set; they all constrain the "
                                  "output", param=given[1][0])
    name, value = given[0]
    if name in ("regex", "guided_regex"):
        return {"regex": value, "param": name}
    if name in ("choice", "guided_choice"):
        return {"choice": tuple(value), "param": name}
    if name == "guided_json":
        return {"json_schema": _schema_object(value, name), "strict": True, "param": name}
    if isinstance(value, JSONObjectFormat):
        return {"json_schema": {"type": "object"}, "strict": True, "param": name}
    spec = value.json_schema
    if not _SCHEMA_NAME.match(spec.name):
        raise InvalidRequestError(
            "response_format.json_schema.name must be 1-64 characters of a-z, A-Z, 0-9, _ "
            f"and -, got {spec.name!r}", param="response_format.json_schema.name")
    schema = {} if spec.schema_ is None else spec.schema_
    return {"json_schema": schema, "strict": bool(spec.strict), "param": name}


def _schema_object(value: Any, param: str) -> dict[str, Any]:
    """A schema given as an object or as a JSON string, as a dict."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{param} is not valid JSON: {e}", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{param} must be a JSON schema object", param=param)
    return value
