"""``lmforge models ...``: the models a server serves (the base model and its LoRA adapters,
fine-tuned ones among them), over ``lmforge.client.Model``::

    lmforge models list
    lmforge models download ft:smollm2-135m-instruct:pirate:ftjob-abc123 -o pirate-lora
    lmforge models delete ft:smollm2-135m-instruct:pirate:ftjob-abc123 --yes
"""

from __future__ import annotations

from pathlib import Path

import click

from lmforge.cli.common import api_options, echo_json, json_option, show, show_list
from lmforge.client import Model

MODEL_COLUMNS = (("name", "name"), ("base model", "model_name"), ("fine-tuned", "fine_tuned"))


@click.group()
def models() -> None:
    """List, inspect, delete and download served models (/v1/models)."""


@models.command("list")
@json_option
@api_options
def list_models(as_json: bool) -> None:
    """List served models: the base model first, then the adapters."""
    show_list(Model.list().model_endpoints, as_json, MODEL_COLUMNS, "models")


@models.command("get")
@click.argument("name")
@json_option
@api_options
def get(name: str, as_json: bool) -> None:
    """Show the served model NAME."""
    show(Model.get(name), as_json)


@models.command("delete")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@api_options
def delete(name: str, yes: bool, as_json: bool) -> None:
    """Stop serving the fine-tuned model or adapter NAME, for good (a fine-tuned model's files
    go too). Asks first unless --yes."""
    if not yes:
        click.confirm(f"Delete the model {name}? It cannot be undone", abort=True)
    deleted = Model.delete(name)
    if as_json:
        echo_json(deleted.model_dump(mode="json"))
    else:
        click.echo(f"Deleted {name}.")


@models.command("download")
@click.argument("name")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Write the adapter's PEFT files here (created if missing).")
@json_option
@api_options
def download(name: str, output_dir: Path | None, as_json: bool) -> None:
    """Download the PEFT adapter of the fine-tuned model NAME into a directory (-o), or print
    its URL. Load it with peft's PeftModel.from_pretrained, or serve it with `lmforge serve
    --lora NAME=DIR`."""
    result = Model.download(name, output_dir=output_dir)
    if as_json:
        echo_json(result.model_dump(mode="json"))
        return
    for path in (result.files or result.urls).values():
        click.echo(path)
