"""``lmforge serve``: the OpenAI-compatible server on the engine, in this process::

    lmforge serve --model smollm2-135m-instruct --port 8000
    python -m lmforge.cli serve --model ./my-hf-dir --chat-template template.jinja

``precheck`` and ``StartupError`` also serve ``lmforge batches run`` (``batches.py``), the other
command that runs the engine in this process.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import click
import uvicorn

from lmforge.cli.serve_ray import pop_ray_options, ray_options, serve_ray
from lmforge.config import (
    DEFAULT_MODEL,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
)
from lmforge.errors import ModelLoadError, ServiceUnavailableError

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# after --shutdown-timeout has aborted what still runs, uvicorn waits this much longer for the
# aborted responses to be written before it cancels their tasks
_ABORT_GRACE_S = 5.0
logger = logging.getLogger(__name__)


class StartupError(click.ClickException):
    """A bad model or configuration at startup: one line ``Error: ...`` and exit code 2 (the
    code click uses for usage errors)."""

    exit_code = 2


@click.command()
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
@click.option("--quantization", type=click.Choice(["int8", "int4"]), default=None,
              help="Weight-only quantization of the dense linear layers at load (groups of 32, "
                   "float32 activations, CPU; as --load_in_8bit). A GGUF's quantized weights "
                   "are kept as they are without it.")
@click.option("--int8-activations", is_flag=True,
              help="Quantized layers (a GGUF's codes, --quantization) multiply activations "
                   "quantized to int8 in groups of 32, in integer dot products, as llama.cpp "
                   "does: faster decoding, and llama.cpp's drift from float32 (float32 CPU).")
@click.option("--deterministic", is_flag=True,
              help="Batch-invariant kernels: a request's output does not depend on the other "
                   "requests in its batch or on chunking (slower; no packed or 4-bit weights).")
@click.option("--max-num-seqs", type=int, default=None, help="Requests running at once.")
@click.option("--max-num-batched-tokens", type=int, default=None,
              help="Token budget per engine step.")
@click.option("--block-size", type=int, default=None, help="Tokens per KV-cache block.")
@click.option("--num-kv-blocks", type=int, default=None,
              help="KV-cache blocks (default: derived from --kv-cache-memory-mb).")
@click.option("--kv-cache-tokens", type=int, default=None,
              help="Tokens the KV cache holds, all requests together (llama.cpp's -c).")
@click.option("--kv-cache-memory", "kv_cache_memory", default=None, metavar="SIZE",
              help="Memory for the KV cache, e.g. 512MiB, 2GiB, 1.5GB (default 1GiB); "
                   "it becomes resident as it fills.")
@click.option("--kv-cache-memory-mb", type=int, default=None,
              help="The same in MiB.")
@click.option("--kv-cache-dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="dtype of the cached keys and values; auto = the model's (float16 halves a "
                   "float32 model's cache, as llama.cpp's f16 cache).")
@click.option("--no-prefix-caching", is_flag=True, help="Do not reuse cached prompt prefixes.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of unseeded sampling.")
@click.option("--max-waiting-requests", type=int, default=None,
              help="Answer 429 while this many requests wait for their first token "
                   "(default 128; 0 = unbounded).")
@click.option("--max-waiting-tokens", type=int, default=None,
              help="Answer 429 while this many prompt tokens wait (default 32768; 0 = "
                   "unbounded).")
@click.option("--max-background-prefill-tokens", type=int, default=None,
              help="Prefill tokens per step for batch jobs (priority > 0), so that online "
                   "requests keep a short time to first token (default 64; 0 = no cap).")
@click.option("--api-key", "api_keys", multiple=True, envvar="LMFORGE_API_KEY",
              help="Require 'Authorization: Bearer KEY' or 'x-api-key: KEY' on every route but "
                   "GET /health (repeatable; env LMFORGE_API_KEY).")
@click.option("--watchdog-timeout", type=float, default=60.0, show_default=True,
              help="/health answers 503 when the engine loop has not stepped for this many "
                   "seconds.")
@click.option("--shutdown-timeout", type=float, default=30.0, show_default=True,
              help="On SIGTERM/SIGINT, seconds in-flight requests get to finish before they are "
                   "aborted.")
@click.option("--batch-concurrency", type=int, default=8, show_default=True,
              help="Batch lines (/v1/batches) in flight at once; they run behind online "
                   "requests.")
@click.option("--batch-window-s", type=float, default=None,
              help="Seconds a batch's completion_window lasts (default: what it says, 24h).")
@click.option("--max-upload-mb", type=int, default=512, show_default=True,
              help="POST /v1/files answers 413 for a file larger than this.")
@click.option("--max-request-mb", type=int, default=32, show_default=True,
              help="Requests other than POST /v1/files answer 413 for a body larger than "
                   "this many MiB.")
@click.option("--database-url", default=None,
              help="The jobs store (files, batches) as a SQLAlchemy URL, e.g. "
                   "postgresql://user@host/db (default: SQLite in $LMFORGE_HOME).")
@click.option("--job-lease-s", type=float, default=15.0, show_default=True,
              help="Servers sharing a jobs store drive each batch or fine-tuning job under a "
                   "lease renewed every third of this; a dead server's jobs are taken over "
                   "this many seconds after its last renewal.")
@click.option("--lora", "loras", multiple=True, metavar="NAME=PATH",
              help="Serve the PEFT LoRA adapter directory PATH as the model NAME (repeatable).")
@click.option("--lora-root", "lora_roots", multiple=True, metavar="DIR",
              help="POST /v1/load_lora_adapter serves only adapter directories inside DIR "
                   "(repeatable; default $LMFORGE_HOME/adapters).")
@click.option("--max-loras", type=int, default=None,
              help="LoRA adapters kept loaded at once (default 8; others load on demand).")
@click.option("--fine-tuning/--no-fine-tuning", default=True, show_default=True,
              help="Run fine-tuning jobs on this server (a worker beside the engine).")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(_LOG_LEVELS))
@ray_options
def serve(chat_template_file: Path | None, api_keys: tuple[str, ...], log_level: str,
          host: str, port: int, watchdog_timeout: float, shutdown_timeout: float,
          batch_concurrency: int, batch_window_s: float | None, max_upload_mb: int,
          max_request_mb: int, database_url: str | None, job_lease_s: float, fine_tuning: bool,
          loras: tuple[str, ...], lora_roots: tuple[str, ...], **options: Any) -> None:
    """Serve a model behind the OpenAI API.

    Routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /v1/files,
    /v1/batches, /v1/fine_tuning/jobs (see README.md).
    The server listens at once and loads the model in the background (/health answers 503
    until it is ready). SIGTERM or Ctrl-C stops accepting connections, lets in-flight requests
    finish for up to --shutdown-timeout seconds, aborts the rest, and exits with status 0.
    """
    # imported here so that `lmforge --help` and other commands do not pay for torch
    from lmforge.engine.async_engine import AsyncEngine
    from lmforge.server import build_loading_app
    from lmforge.startup import StartupProfile

    profile = StartupProfile()
    profile.since_start("imports")

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    chat_template = chat_template_file.read_text(encoding="utf-8") if chat_template_file else None
    on_ray = pop_ray_options(options)
    config = engine_config(chat_template=chat_template, **options)
    server_config = ServerConfig(host=host, port=port, api_keys=list(api_keys),
                                 watchdog_timeout=watchdog_timeout,
                                 batch_concurrency=batch_concurrency,
                                 batch_window_s=batch_window_s, fine_tuning=fine_tuning,
                                 loras=_lora_modules(loras),
                                 max_upload_mb=max_upload_mb, max_request_mb=max_request_mb,
                                 database_url=database_url, shutdown_timeout=shutdown_timeout,
                                 job_lease_s=job_lease_s)
    if lora_roots:  # else the dataclass default, $LMFORGE_HOME/adapters
        server_config.lora_roots = list(lora_roots)
    try:
        with profile.phase("jobs store"):
            model_name = precheck(config, server_config)
    except (ModelLoadError, ValueError) as e:
        raise StartupError(str(e)) from e
    if on_ray is not None:
        return serve_ray(on_ray, config, server_config, model_name, chat_template)
    loading = AsyncEngine.load_in_background(config, profile)
    app = build_loading_app(loading, server_config, chat_template=chat_template,
                            on_ready=lambda engine: server.on_ready(engine))
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                    timeout_graceful_shutdown=shutdown_timeout + _ABORT_GRACE_S),
                     model_name, shutdown_timeout, profile)
    loading.add_done_callback(server.exit_if_failed)
    _run_until_stopped(server, loading)


def _run_until_stopped(server: _Server, loading: Future) -> None:
    """Run uvicorn until SIGTERM or Ctrl-C (exit status 0), or until loading failed.

    Raises:
        StartupError: the model failed to load (``loading``'s error).
    """
    # uvicorn catches SIGTERM, shuts down gracefully, then raises the signal again to the handler
    # that was installed before it ran: a no-op one there makes that a normal exit (status 0)
    previous = signal.signal(signal.SIGTERM, _ignore_signal)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    if loading.done() and not loading.cancelled() and loading.exception() is not None:
        raise StartupError(str(loading.exception()))


def _lora_modules(pairs: tuple[str, ...]) -> dict[str, str]:
    """``("name=path", ...)`` -> {name: path}. Raises click.BadParameter for a malformed pair."""
    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{pair!r} is not NAME=PATH", param_hint="--lora")
        out[name] = path
    return out


def precheck(config: EngineConfig, server_config: ServerConfig) -> str:
    """Fail before listening on what needs no loaded model: a missing model path and bad
    configuration fields. Returns the model's default served name.

    Raises:
        ModelLoadError, ValueError: naming the problem and the fix.
    """
    from lmforge.models.loader import resolve_model_path

    _, name = resolve_model_path(config.model.model)
    config.model.validate()
    config.cache.validate()
    # max_model_len matters only without chunked prefill; LLMEngine checks it again when loaded
    config.scheduler.validate(config.model.max_model_len or 0)
    server_config.validate()
    _open_store(server_config.database_url)
    from lmforge.models.lora import read_peft_config

    for path in server_config.loras.values():
        read_peft_config(path)  # ModelLoadError naming the problem, before loading the model
    return config.model.served_model_name or name


def _open_store(url: str | None) -> None:
    """Open (and migrate) the jobs store once, so a bad ``--database-url`` is one line at
    startup. Raises ValueError (the URL itself is left out: it may hold a password)."""
    import sqlalchemy

    from lmforge.jobs.store import Store

    try:
        Store(url).close()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError) as e:
        where = "--database-url" if url else "the SQLite database in $LMFORGE_HOME"
        raise ValueError(f"cannot open the jobs store ({where}): {type(e).__name__}: "
                         f"{str(e).splitlines()[0]}") from e


def _ignore_signal(signum: int, frame: Any) -> None:
    """See ``serve``: uvicorn has already shut down when this runs."""


def engine_config(*, model: str, served_model_name: str | None, dtype: str, device: str,
                  max_model_len: int | None, chat_template: str | None, seed: int,
                  gguf_int4: bool,
                  max_num_seqs: int | None, max_num_batched_tokens: int | None,
                  block_size: int | None, num_kv_blocks: int | None,
                  kv_cache_memory_mb: int | None, no_prefix_caching: bool,
                  kv_cache_tokens: int | None = None, kv_cache_memory: str | None = None,
                  deterministic: bool = False, kv_cache_dtype: str = "auto",
                  max_waiting_requests: int | None = None,
                  max_waiting_tokens: int | None = None,
                  max_background_prefill_tokens: int | None = None,
                  max_loras: int | None = None,
                  quantization: str | None = None,
                  int8_activations: bool = False) -> EngineConfig:
    """``EngineConfig`` from CLI options; an option left out keeps the dataclass default."""
    def given(**kwargs: Any) -> dict[str, Any]:
        return {k: v for k, v in kwargs.items() if v is not None}

    if kv_cache_memory is not None:
        if kv_cache_memory_mb is not None:
            raise click.UsageError("give --kv-cache-memory or --kv-cache-memory-mb, not both")
        kv_cache_memory_mb = max(1, parse_size(kv_cache_memory, "--kv-cache-memory") // 2**20)

    return EngineConfig(
        model=ModelConfig(model=model, served_model_name=served_model_name, dtype=dtype,
                          device=device, max_model_len=max_model_len,
                          chat_template=chat_template, seed=seed, gguf_int4=gguf_int4,
                          deterministic=deterministic, quantization=quantization,
                          int8_activations=int8_activations),
        cache=CacheConfig(enable_prefix_caching=not no_prefix_caching,
                          kv_cache_dtype=kv_cache_dtype,
                          **given(block_size=block_size, num_blocks=num_kv_blocks,
                                  kv_cache_tokens=kv_cache_tokens,
                                  kv_cache_memory_mb=kv_cache_memory_mb,
                                  max_loras=max_loras)),
        scheduler=SchedulerConfig(**given(max_num_seqs=max_num_seqs,
                                          max_num_batched_tokens=max_num_batched_tokens,
                                          max_waiting_requests=max_waiting_requests,
                                          max_waiting_tokens=max_waiting_tokens,
                                          max_background_prefill_tokens=(
                                              max_background_prefill_tokens))),
    )


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
               "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
               "tib": 2**40}


def parse_size(text: str, option: str) -> int:
    """``"2GiB"`` -> 2147483648 bytes: a number and a unit (B, KB/KiB, MB/MiB, GB/GiB, TB/TiB,
    case-insensitive; SI units are powers of 10, IEC ones of 2; no unit = bytes).

    Raises:
        click.BadParameter: naming ``option`` and the accepted forms.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise click.BadParameter(f"{text!r} is not a size; write e.g. 512MiB, 2GiB or 1.5GB",
                                 param_hint=option)
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


class _Server(uvicorn.Server):
    """uvicorn, plus: prints the URL (with ``--port 0``, the port it got) once the socket
    listens and again once the model is ready ("lmforge serving NAME on URL/v1"), exits when
    loading fails, and aborts the requests still running ``shutdown_timeout`` seconds into a
    graceful shutdown, so that their clients get a 503 error (an error event in a stream)
    rather than a cut connection.

    uvicorn's graceful shutdown (``uvicorn.Server.shutdown``) closes the listening sockets,
    closes idle keep-alive connections, lets each in-flight response (streams included) run to
    its end with ``Connection: close``, and cancels the tasks still running after
    ``timeout_graceful_shutdown`` (here the shutdown timeout plus a grace for the aborts).
    """

    def __init__(self, config: uvicorn.Config, model_name: str, shutdown_timeout: float,
                 profile: Any = None):
        super().__init__(config)
        self.model_name = model_name
        self.profile = profile  # a StartupProfile, summarized once the model is ready
        self.shutdown_timeout = shutdown_timeout
        self.url: str | None = None
        self.ready = False

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.url = f"http://{host}:{port}"
            if not self.ready:
                click.echo(f"lmforge listening on {self.url}, loading {self.model_name} "
                           "(GET /health answers 503 until it is ready)")
            self._announce()

    def on_ready(self, engine: Any) -> None:
        """The app's ``on_ready`` (called in the event loop, like ``startup``)."""
        self.model_name, self.ready = engine.model_name, True
        if self.profile is not None:
            click.echo(f"lmforge {self.profile.summary()}")
        click.echo(f"lmforge memory: {engine.memory_report().summary()}")
        click.echo(f"lmforge kernels: {engine.kernels}")
        self._announce()

    def _announce(self) -> None:
        if self.ready and self.url is not None:
            click.echo(f"lmforge serving {self.model_name} on {self.url}/v1")

    def exit_if_failed(self, loading: Future) -> None:
        """Done-callback of the loading future (engine thread): a failed load stops the server;
        ``serve`` then reports the error."""
        if loading.cancelled() or loading.exception() is not None:
            self.should_exit = True

    async def shutdown(self, sockets: Any = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.shutdown_timeout, self._abort_in_flight)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _abort_in_flight(self) -> None:
        engine = self.config.app.state.engine
        if engine is not None:
            logger.warning("shutdown timeout (%g s) reached: aborting the requests still running",
                           self.shutdown_timeout)
            engine.abort_all(ServiceUnavailableError(
                "the server is shutting down and stopped this request; retry it",
                code="shutting_down"))
