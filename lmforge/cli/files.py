"""``lmforge files ...``: the server's stored files, over ``lmforge.client.File``::

    lmforge files upload requests.jsonl --purpose batch
    lmforge files list --purpose batch --limit 20
    lmforge files download file-abc123 -o results.jsonl
"""

from __future__ import annotations

from pathlib import Path

import click

from lmforge.cli.common import api_options, echo_json, json_option, show, show_list
from lmforge.client import File
from lmforge.protocol.files import OUTPUT_PURPOSES, UPLOAD_PURPOSES

FILE_COLUMNS = (("id", "id"), ("filename", "filename"), ("purpose", "purpose"),
                ("bytes", "size"), ("created", "created_at"))


@click.group()
def files() -> None:
    """Upload, list, download and delete files (/v1/files)."""


@files.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--purpose", required=True, type=click.Choice(UPLOAD_PURPOSES),
              help="What the file is for; batch and fine-tune files must be JSONL (fine-tune: "
                   "or CSV).")
@click.option("--expires-after", type=int, default=None, metavar="S",
              help="Delete the file S seconds after the upload (3600 to 2592000).")
@json_option
@api_options
def upload(path: Path, purpose: str, expires_after: int | None, as_json: bool) -> None:
    """Upload PATH and print the stored file."""
    show(File.upload(path, purpose=purpose, expires_after_s=expires_after), as_json)


@files.command("list")
@click.option("--purpose", type=click.Choice(UPLOAD_PURPOSES + OUTPUT_PURPOSES), default=None,
              help="Only files of this purpose.")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="At most N files (the newest).")
@json_option
@api_options
def list_files(purpose: str | None, limit: int | None, as_json: bool) -> None:
    """List stored files, newest first."""
    show_list(File.list(purpose).files[:limit], as_json, FILE_COLUMNS, "files")


@files.command("get")
@click.argument("file_id")
@json_option
@api_options
def get(file_id: str, as_json: bool) -> None:
    """Show the file FILE_ID."""
    show(File.get(file_id), as_json)


@files.command("download")
@click.argument("file_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the content to this file (default: the raw bytes to stdout).")
@click.option("--json", "as_json", is_flag=True,
              help="With -o: print {id, path, bytes} as JSON.")
@api_options
def download(file_id: str, output: Path | None, as_json: bool) -> None:
    """Write the content of FILE_ID to stdout, or to a file with -o."""
    if output is None:
        if as_json:
            raise click.UsageError("--json needs -o (without it the content goes to stdout)")
        with click.open_file("-", "wb") as sink:  # binary stdout, left open
            for chunk in File.iter_content(file_id):
                sink.write(chunk)
        return
    path = File.download_to(file_id, output)  # a partial download never takes the name
    written = {"id": file_id, "path": str(path), "bytes": path.stat().st_size}
    if as_json:
        echo_json(written)
    else:
        click.echo(f"Wrote {written['bytes']} bytes to {path}")


@files.command("delete")
@click.argument("file_id")
@json_option
@api_options
def delete(file_id: str, as_json: bool) -> None:
    """Delete FILE_ID and its content."""
    deleted = File.delete(file_id)
    if as_json:
        echo_json(deleted.model_dump(mode="json"))
    else:
        click.echo(f"Deleted {file_id}.")
