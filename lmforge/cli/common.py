"""What every command that talks to a server shares: ``--base-url`` / ``--api-key`` and the
client's configuration (``api_options``), the client's errors as one ``Error: ...`` line that
says what to run next (exit status 1), the model to use when ``--model`` is not given, and
output: a rich table for people by default, ``--json`` (the client object's
``model_dump(mode="json")``: one JSON document, a list for list commands) for scripts.

The hints follow simonw/llm's CLI errors: a dead server names ``lmforge serve`` and
``--base-url``, a refused key names ``--api-key``, an unknown id names the list command that
shows the known ones.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from lmforge import client
from lmforge.client.transport import DEFAULT_BASE_URL

# columns of a table when stdout is not a terminal (a pipe, a file, click's CliRunner): rich
# would assume 80 and cut ids short; scripts that need exact fields use --json
PIPE_WIDTH = 200
# which list command shows the ids a 404 was about, by the error's ``param``
_LIST_GROUP_BY_PARAM = {"model": "models", "batch_id": "batches", "job_id": "fine-tune"}


def api_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of a click command that calls ``lmforge.client``: adds ``--base-url`` (env
    ``LMFORGE_BASE_URL``) and ``--api-key`` (env ``LMFORGE_API_KEY``), configures the client
    with them for the command's run (the previous settings come back afterwards, so a process
    that runs several commands, as tests do, keeps its own), and turns the client's errors
    into ``Error: ...`` lines with exit status 1 (``describe``). Put it last, right above the
    function::

        @group.command("get")
        @click.argument("file_id")
        @api_options
        def get(file_id: str) -> None: ...
    """

    @click.option("--base-url", envvar="LMFORGE_BASE_URL", default=None, metavar="URL",
                  help=f"The lmforge server (env LMFORGE_BASE_URL; default {DEFAULT_BASE_URL}).")
    @click.option("--api-key", envvar="LMFORGE_API_KEY", default=None, metavar="KEY",
                  help="Sent as 'Authorization: Bearer KEY' (env LMFORGE_API_KEY).")
    @functools.wraps(command)
    def configured(base_url: str | None, api_key: str | None, **kwargs: Any) -> Any:
        previous = client.settings()
        client.configure(base_url=base_url, api_key=api_key)
        try:
            with reported_errors():
                return command(**kwargs)
        finally:
            client.configure(previous.base_url, previous.api_key,
                             max_retries=previous.max_retries, timeout=previous.timeout)

    return configured


@contextmanager
def reported_errors() -> Iterator[None]:
    """Raise the client's errors (and a missing local file) as ``click.ClickException``: one
    ``Error: ...`` line on stderr, exit status 1."""
    try:
        yield
    except client.APIError as e:
        raise click.ClickException(describe(e)) from e
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from e


def describe(error: client.APIError) -> str:
    """The error's message (with the HTTP status) and what to run next:

    - no answer: start a server with ``lmforge serve``, or point ``--base-url`` at yours;
    - 401/403: pass ``--api-key`` or set ``LMFORGE_API_KEY``;
    - 404: the list command of what was not found (``lmforge models list``, ...);
    - the rest (400, 409, 429, 5xx, a timeout): the server's (or client's) message as it is.
    """
    if isinstance(error, client.TimeoutError):
        return error.message
    if isinstance(error, client.APIConnectionError):
        cause = error.__cause__
        why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        return (f"cannot reach the lmforge server at {client.settings().resolved_base_url()}"
                f"{why}. Start one with `lmforge serve`, or point --base-url (or "
                "LMFORGE_BASE_URL) at yours.")
    if isinstance(error, client.AuthenticationError):
        return (f"{error}. Pass --api-key or set LMFORGE_API_KEY to a key the server was "
                "started with (`lmforge serve --api-key KEY`).")
    if isinstance(error, client.NotFoundError):
        if error.code == "unknown_url":
            return f"{error}. Is --base-url (or LMFORGE_BASE_URL) an lmforge server?"
        return f"{error}. See `lmforge {_list_group(error)} list`."
    return str(error)


def _list_group(error: client.NotFoundError) -> str:
    """The group whose ``list`` shows what ``error`` did not find: by the error's ``param``,
    else the running command's group, else ``models`` (``complete``, ``chat``)."""
    param = error.param or ""
    if param in _LIST_GROUP_BY_PARAM:
        return _LIST_GROUP_BY_PARAM[param]
    if "file" in param:  # file_id, input_file_id, training_file, validation_file
        return "files"
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.parent is not None and ctx.parent.parent is not None:
        return ctx.parent.command.name or "models"
    return "models"


def model_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--model`` (env ``LMFORGE_MODEL``); None when neither is given (see ``base_model``)."""
    return click.option("--model", envvar="LMFORGE_MODEL", default=None, metavar="NAME",
                        help="The model (env LMFORGE_MODEL; default: the server's base "
                             "model).")(command)


def base_model() -> str:
    """The server's base model: the first of ``Model.list()`` that is not fine-tuned.

    Raises:
        click.ClickException: the server lists none. The client's errors, as they come.
    """
    for model in client.Model.list().model_endpoints:
        if not model.fine_tuned:
            return model.name
    raise click.ClickException("the server lists no base model; pass --model (see `lmforge "
                               "models list`)")


# -- output -----------------------------------------------------------------------------------


def json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--json``: the command prints JSON for scripts instead of a table."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON (the client object's fields) instead of a table.")(command)


def echo_json(value: Any) -> None:
    """Print one JSON document, indented."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def print_table(table: Table) -> None:
    """Print a rich table on the current stdout: styled to the terminal's width, or, on a pipe,
    plain text PIPE_WIDTH wide without the padding at the ends of lines."""
    out = Console(highlight=False)
    if out.is_terminal:
        out.print(table)
        return
    out = Console(highlight=False, width=PIPE_WIDTH)
    with out.capture() as captured:
        out.print(table)
    click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def show(obj: BaseModel, as_json: bool) -> None:
    """Print one client object: its JSON, or a two-column table of every field."""
    fields = obj.model_dump(mode="json")
    if as_json:
        echo_json(fields)
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in fields.items():
        table.add_row(key, cell(key, value))
    print_table(table)


# a column: (header, field name or a function of the object's JSON fields)
Column = tuple[str, "str | Callable[[dict[str, Any]], Any]"]


def show_list(items: Sequence[BaseModel], as_json: bool, columns: Sequence[Column],
              noun: str) -> None:
    """Print client objects: a JSON list, or a table of ``columns`` (the first one, the id,
    never wrapped or cut), or ``No <noun>.`` for none."""
    rows = [item.model_dump(mode="json") for item in items]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"No {noun}.")
        return
    table = Table(pad_edge=False, box=None, header_style="bold")
    for i, (header, _) in enumerate(columns):
        table.add_column(header, no_wrap=i == 0, overflow="fold")
    for row in rows:
        table.add_row(*(cell(field, row.get(field)) if isinstance(field, str)
                        else cell(header, field(row)) for header, field in columns))
    print_table(table)


def cell(key: str, value: Any) -> str:
    """A field as table text: ``-`` for none, yes/no, Unix seconds (``*_at``, ``timestamp``)
    as local time, nested values as compact JSON."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and (key.endswith("_at") or key in ("created",
                                                                          "timestamp")):
        return local_time(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def local_time(seconds: float) -> str:
    """Unix seconds as ``YYYY-MM-DD HH:MM:SS`` in local time."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
