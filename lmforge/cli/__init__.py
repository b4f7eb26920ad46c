"""The ``lmforge`` command line (click): ``main`` and its commands, one module per group.

``serve`` and ``batches run`` run the engine in this process (``serve.py``, ``batches.py``),
``tokenizer train`` trains a tokenizer (``tokenizer.py``) and ``pretrain`` a GPT
(``pretrain.py``), ``preference`` runs the synthetic-data pipeline against any OpenAI
endpoints (``preference.py``); every other command
is a few lines over ``lmforge.client`` against a running server (``common.py`` holds what they
share: ``--base-url``/``--api-key``, errors that say what to run next, tables and ``--json``).
"""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute"; a command's module is imported when it runs (or for
# --help), so `lmforge serve` does not import the client, rich tables or the preference
# pipeline (0.4-0.5 s of its start-up). click's documented LazyGroup pattern.
COMMANDS = {
    "serve": "lmforge.cli.serve:serve",
    "chat": "lmforge.cli.chat:chat",
    "complete": "lmforge.cli.chat:complete",
    "models": "lmforge.cli.models:models",
    "files": "lmforge.cli.files:files",
    "batches": "lmforge.cli.batches:batches",
    "batch": "lmforge.cli.batches:batches",  # an alias: `lmforge batch run --ray ...`
    "fine-tune": "lmforge.cli.fine_tune:fine_tune",
    "tokenizer": "lmforge.cli.tokenizer:tokenizer",
    "pretrain": "lmforge.cli.pretrain:pretrain",
    "preference": "lmforge.cli.preference:preference",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use (``COMMANDS``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *COMMANDS]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = COMMANDS[cmd_name].partition(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup)
@click.version_option(package_name="lmforge")
def main() -> None:
    """lmforge: a self-hosted LLM engine with an OpenAI-compatible API.

    Start a server with `lmforge serve`; the other commands talk to it (--base-url, env
    LMFORGE_BASE_URL; default http://127.0.0.1:8000).
    """
