"""CLI commands that talk to a running lmforge server over HTTP (httpx): the client helpers
and ``lmforge files ...`` (``cli_jobs.py`` has ``batches`` and ``fine-tune`` on the same helpers).

Every such command takes ``--base-url`` (env ``LMFORGE_BASE_URL``) and ``--api-key`` (env
``LMFORGE_API_KEY``) through ``api_options``, prints one pretty JSON object for scripts to
parse, and turns the server's OpenAI error envelope into one ``Error: <message>`` line with
exit status 1 (``request``)::

    lmforge files upload requests.jsonl --purpose batch
    lmforge files list --purpose batch --limit 20
    lmforge files download file-abc123 -o results.jsonl
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import httpx

from lmforge.protocol.files import MAX_LIST_LIMIT, OUTPUT_PURPOSES, UPLOAD_PURPOSES

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# seconds per connect / per read or write of a chunk (not for a whole upload or download)
_TIMEOUT = httpx.Timeout(120.0, connect=10.0)


def api_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of a click command that talks to a server: adds ``--base-url`` and
    ``--api-key`` and passes the command an open ``httpx.Client`` as its first argument
    (closed when the command returns)::

        @group.command("get")
        @click.argument("file_id")
        @api_options
        def get(client: httpx.Client, file_id: str) -> None: ...
    """

    @click.option("--base-url", envvar="LMFORGE_BASE_URL", default=DEFAULT_BASE_URL,
                  show_default=True, help="The lmforge server (env LMFORGE_BASE_URL).")
    @click.option("--api-key", envvar="LMFORGE_API_KEY", default=None,
                  help="Sent as 'Authorization: Bearer KEY' (env LMFORGE_API_KEY).")
    @functools.wraps(command)
    def with_client(base_url: str, api_key: str | None, **kwargs: Any) -> Any:
        with api_client(base_url, api_key) as client:
            return command(client, **kwargs)

    return with_client


def api_client(base_url: str, api_key: str | None = None) -> httpx.Client:
    """An ``httpx.Client`` on the server's root URL (a trailing ``/v1``, as OpenAI clients
    write it, is dropped: routes are requested as ``/v1/...``)."""
    root = base_url.rstrip("/")
    root = root[: -len("/v1")] if root.endswith("/v1") else root
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=root, headers=headers, timeout=_TIMEOUT)


def request(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """``client.request(method, path, **kwargs)``, read and checked.

    Raises:
        click.ClickException: the server answered >= 400 (its error message, and the status),
            or could not be reached (naming the URL and how to point at another).
    """
    with _reaching(client):
        response = client.request(method, path, **kwargs)
    check(response)
    return response


@contextmanager
def stream(client: httpx.Client, method: str, path: str, **kwargs: Any
           ) -> Iterator[httpx.Response]:
    """Like ``request``, for a body to read in chunks (``response.iter_bytes()``)."""
    with _reaching(client), client.stream(method, path, **kwargs) as response:
        if response.status_code >= 400:
            response.read()
            check(response)
        yield response


def check(response: httpx.Response) -> None:
    """Raise ``click.ClickException`` with the server's message for a status >= 400."""
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:500] or response.reason_phrase
    raise click.ClickException(f"{message} (HTTP {response.status_code})")


@contextmanager
def _reaching(client: httpx.Client) -> Iterator[None]:
    try:
        yield
    except httpx.TransportError as e:
        raise click.ClickException(
            f"Cannot reach the lmforge server at {client.base_url} ({type(e).__name__}: {e}). "
            "Start one with `lmforge serve`, or point at yours with --base-url or "
            "LMFORGE_BASE_URL.") from e


def echo_json(value: Any) -> None:
    """Print one JSON value, indented, for people and scripts alike."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


@click.group()
def files() -> None:
    """Upload, list, inspect, download and delete files (the server's /v1/files)."""


@files.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--purpose", required=True, type=click.Choice(UPLOAD_PURPOSES),
              help="What the file is for; batch and fine-tune files must be JSONL.")
@click.option("--expires-after", type=int, default=None,
              help="Delete the file this many seconds after upload (3600 to 2592000).")
@api_options
def upload(client: httpx.Client, path: Path, purpose: str, expires_after: int | None) -> None:
    """Upload PATH and print its file object."""
    data = {"purpose": purpose}
    if expires_after is not None:
        data |= {"expires_after[anchor]": "created_at",
                 "expires_after[seconds]": str(expires_after)}
    with open(path, "rb") as f:  # httpx streams it from disk
        echo_json(request(client, "POST", "/v1/files", data=data,
                          files={"file": (path.name, f)}).json())


@files.command("list")
@click.option("--purpose", type=click.Choice(UPLOAD_PURPOSES + OUTPUT_PURPOSES), default=None,
              help="Only files of this purpose.")
@click.option("--limit", type=click.IntRange(1, MAX_LIST_LIMIT), default=None,
              help=f"At most this many files (default and maximum {MAX_LIST_LIMIT}).")
@click.option("--after", default=None, help="A file id: list the files after it.")
@click.option("--order", type=click.Choice(["desc", "asc"]), default="desc", show_default=True,
              help="By creation time: desc = newest first.")
@api_options
def list_files(client: httpx.Client, **params: Any) -> None:
    """Print a page of files, newest first (the server's list object)."""
    given = {k: v for k, v in params.items() if v is not None}
    echo_json(request(client, "GET", "/v1/files", params=given).json())


@files.command("get")
@click.argument("file_id")
@api_options
def get(client: httpx.Client, file_id: str) -> None:
    """Print the file object of FILE_ID."""
    echo_json(request(client, "GET", f"/v1/files/{file_id}").json())


@files.command("download")
@click.argument("file_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the content here and print {id, path, bytes} (default: the raw "
                   "content to stdout).")
@api_options
def download(client: httpx.Client, file_id: str, output: Path | None) -> None:
    """Write the content of FILE_ID to stdout, or to --output."""
    with stream(client, "GET", f"/v1/files/{file_id}/content") as response:
        if output is None:
            with click.open_file("-", "wb") as sink:  # binary stdout, left open
                for chunk in response.iter_bytes():
                    sink.write(chunk)
            return
        # a partial download never takes the name: written aside, renamed once complete
        partial = output.with_name(output.name + ".part")
        size = 0
        try:
            with open(partial, "wb") as f:
                for chunk in response.iter_bytes():
                    size += f.write(chunk)
            os.replace(partial, output)
        finally:
            partial.unlink(missing_ok=True)
    echo_json({"id": file_id, "path": str(output), "bytes": size})


@files.command("delete")
@click.argument("file_id")
@api_options
def delete(client: httpx.Client, file_id: str) -> None:
    """Delete FILE_ID and print {id, object, deleted}."""
    echo_json(request(client, "DELETE", f"/v1/files/{file_id}").json())
