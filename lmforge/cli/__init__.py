"""The ``lmforge`` command line (click): ``main`` and its commands, one module per group.

``serve`` and ``batches run`` run the engine in this process (``serve.py``, ``batches.py``),
``tokenizer train`` trains a tokenizer (``tokenizer.py``) and ``pretrain`` a GPT
(``pretrain.py``), ``preference`` runs the synthetic-data pipeline against any OpenAI
endpoints (``preference.py``); every other command
is a few lines over ``lmforge.client`` against a running server (``common.py`` holds what they
share: ``--base-url``/``--api-key``, errors that say what to run next, tables and ``--json``).
"""

from __future__ import annotations

import click

from lmforge.cli.batches import batches
from lmforge.cli.chat import chat, complete
from lmforge.cli.files import files
from lmforge.cli.fine_tune import fine_tune
from lmforge.cli.models import models
from lmforge.cli.preference import preference
from lmforge.cli.pretrain import pretrain
from lmforge.cli.serve import serve
from lmforge.cli.tokenizer import tokenizer


@click.group()
@click.version_option(package_name="lmforge")
def main() -> None:
    """lmforge: a self-hosted LLM engine with an OpenAI-compatible API.

    Start a server with `lmforge serve`; the other commands talk to it (--base-url, env
    LMFORGE_BASE_URL; default http://127.0.0.1:8000).
    """


for _command in (serve, chat, complete, models, files, batches, fine_tune, tokenizer,
                 pretrain, preference):
    main.add_command(_command)
