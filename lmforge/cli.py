"""The ``lmforge`` command line (click). ``lmforge serve`` runs the OpenAI-compatible server.

    lmforge serve --model smollm2-135m-instruct --port 8000
    python -m lmforge.cli serve --model ./my-hf-dir --chat-template template.jinja
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
import uvicorn

from lmforge.config import (
    DEFAULT_MODEL,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
)
from lmforge.errors import ModelLoadError

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class StartupError(click.ClickException):
    """A bad model or configuration at startup: one line ``Error: ...`` and exit code 2 (the
    code click uses for usage errors)."""

    exit_code = 2


@click.group()
@click.version_option(package_name="lmforge")
def main() -> None:
    """lmforge: a self-hosted LLM engine with an OpenAI-compatible API."""


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="A GGUF file, a Hugging Face model directory, or a known alias.")
@click.option("--served-model-name", default=None,
              help="The model id clients send (default: the alias or directory name).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int, help="0 picks a free port.")
@click.option("--chat-template", "chat_template_file", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A Jinja file overriding the tokenizer's chat template.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="auto: bfloat16 where the hardware computes it natively, else float32.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--max-model-len", type=int, default=None,
              help="Context length in tokens (default: the model's own).")
@click.option("--gguf-int4/--no-gguf-int4", default=True, show_default=True,
              help="Decode small batches from a GGUF's own 4-bit weights (bf16 on CPU).")
@click.option("--max-num-seqs", type=int, default=None, help="Requests running at once.")
@click.option("--max-num-batched-tokens", type=int, default=None,
              help="Token budget per engine step.")
@click.option("--block-size", type=int, default=None, help="Tokens per KV-cache block.")
@click.option("--num-kv-blocks", type=int, default=None,
              help="KV-cache blocks (default: derived from --kv-cache-memory-mb).")
@click.option("--kv-cache-memory-mb", type=int, default=None,
              help="Memory for the KV cache when --num-kv-blocks is not given.")
@click.option("--no-prefix-caching", is_flag=True, help="Do not reuse cached prompt prefixes.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of unseeded sampling.")
@click.option("--api-key", "api_keys", multiple=True, envvar="LMFORGE_API_KEY",
              help="Require 'Authorization: Bearer KEY' (repeatable; env LMFORGE_API_KEY).")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(_LOG_LEVELS))
def serve(chat_template_file: Path | None, api_keys: tuple[str, ...], log_level: str,
          host: str, port: int, **options: Any) -> None:
    """Serve a model behind the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models)."""
    # imported here so that `lmforge --help` and other commands do not pay for torch
    from lmforge.engine.async_engine import AsyncEngine
    from lmforge.server import build_app

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    chat_template = chat_template_file.read_text(encoding="utf-8") if chat_template_file else None
    config = engine_config(chat_template=chat_template, **options)
    try:
        engine = AsyncEngine.from_config(config)
    except (ModelLoadError, ValueError) as e:
        raise StartupError(str(e)) from e
    app = build_app(engine, ServerConfig(host=host, port=port, api_keys=list(api_keys)),
                    chat_template=chat_template)
    server = _AnnouncingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    server.model_name = engine.model_name
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass


def engine_config(*, model: str, served_model_name: str | None, dtype: str, device: str,
                  max_model_len: int | None, chat_template: str | None, seed: int,
                  gguf_int4: bool,
                  max_num_seqs: int | None, max_num_batched_tokens: int | None,
                  block_size: int | None, num_kv_blocks: int | None,
                  kv_cache_memory_mb: int | None, no_prefix_caching: bool) -> EngineConfig:
    """``EngineConfig`` from CLI options; an option left out keeps the dataclass default."""
    def given(**kwargs: Any) -> dict[str, Any]:
        return {k: v for k, v in kwargs.items() if v is not None}

    return EngineConfig(
        model=ModelConfig(model=model, served_model_name=served_model_name, dtype=dtype,
                          device=device, max_model_len=max_model_len,
                          chat_template=chat_template, seed=seed, gguf_int4=gguf_int4),
        cache=CacheConfig(enable_prefix_caching=not no_prefix_caching,
                          **given(block_size=block_size, num_blocks=num_kv_blocks,
                                  kv_cache_memory_mb=kv_cache_memory_mb)),
        scheduler=SchedulerConfig(**given(max_num_seqs=max_num_seqs,
                                          max_num_batched_tokens=max_num_batched_tokens)),
    )


class _AnnouncingServer(uvicorn.Server):
    """Prints the URL once the socket listens (with ``--port 0``, the port it got)."""

    model_name = ""

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            click.echo(f"lmforge serving {self.model_name} on http://{host}:{port}/v1")


if __name__ == "__main__":
    main()
