"""Engine configuration: a few dataclasses, documented on the field, checked by ``validate()``.

Errors name the fix, in the manner of vLLM's ``vllm/config/scheduler.py``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def lmforge_home() -> Path:
    """Where lmforge keeps its state: ``$LMFORGE_HOME``, default ``~/.lmforge`` (the jobs
    database, uploaded and produced files, caches)."""
    return Path(os.environ.get("LMFORGE_HOME", "~/.lmforge")).expanduser()


def lmforge_cache() -> Path:
    """Where lmforge keeps what it can compute again (converted tokenizers, dequantized and fused
    weights): ``$LMFORGE_CACHE``, default ``$LMFORGE_HOME/cache``. Deleting it loses nothing but
    start-up time; servers with different homes may share one (as ``HF_HUB_CACHE`` and
    ``HF_HOME``)."""
    cache = os.environ.get("LMFORGE_CACHE")
    return Path(cache).expanduser() if cache else lmforge_home() / "cache"


def file_cache_key(path: Path, *extra: object) -> str:
    """The key of what is derived from the file ``path`` (sha256 hex of its resolved path,
    size, modification time and ``extra``, e.g. the converter's version): a replaced or
    re-downloaded file gets a new one."""
    stat = path.stat()
    raw = "\0".join(map(str, (path.resolve(), stat.st_size, stat.st_mtime_ns, *extra)))
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass
class ModelConfig:
    """What to load and where to run it."""

    model: str = DEFAULT_MODEL  # a GGUF file, a Hugging Face directory, or a known alias
    served_model_name: str | None = None  # the id in /v1/models; defaults to the alias or dir name
    # parameter and KV-cache dtype: auto | float32 | bfloat16 | float16; auto = bfloat16 where the
    # hardware computes it natively (CPUs with AVX512-BF16/AMX, CUDA), else float32 (as vLLM)
    dtype: str = "auto"
    device: str = "cpu"  # torch device string: cpu, cuda, cuda:1
    max_model_len: int | None = None  # context length; None = the checkpoint's own
    chat_template: str | None = None  # Jinja text overriding the tokenizer's chat template
    seed: int = 0  # seeds the global generator used by unseeded sampling
    # keep a GGUF's 4-bit (Q4_0/Q4_1) weights next to the bf16 ones and decode small batches from
    # them (bf16 on CPU only; lmforge.models.quant); False computes everything in bf16
    gguf_int4: bool = True
    # batch-invariant kernels (lmforge.models.invariant): a request's tokens and logprobs do
    # not depend on the other requests of its steps nor on chunking; slower, and no prepacked
    # or 4-bit weights (SGLang's --enable-deterministic-inference)
    deterministic: bool = False
    # weight-only quantization of the dense linear layers at load (int8 | int4, groups of 32;
    # lmforge.models.quant_linear), float32 activations on the CPU; None keeps them as loaded
    quantization: str | None = None
    # quantized layers multiply int8 activations (groups of 32, llama.cpp's Q8_0 scheme) in
    # integer dot products: faster decoding, llama.cpp's numerics instead of float32's
    int8_activations: bool = False

    def validate(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
        if self.quantization not in (None, "int8", "int4"):
            raise ValueError(f"quantization {self.quantization!r} is not supported; use int8 or int4")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len ({self.max_model_len}) must be at least 1")


@dataclass
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # total KV blocks; None = from kv_cache_tokens or the memory
    # tokens the KV cache holds, all requests together (llama.cpp's -c), rounded up to blocks;
    # None = as many as kv_cache_memory_mb holds
    kv_cache_tokens: int | None = None
    kv_cache_memory_mb: int = 1024  # memory for K and V of all layers when neither is set
    # dtype of the cached K and V: auto = the model's; float16 halves a float32 model's cache
    # (llama.cpp caches f16), bfloat16 too with a coarser mantissa
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True  # reuse full blocks whose token prefix is already cached
    # LoRA adapters kept loaded in the model; past it the least recently used adapter that the
    # running step does not need is dropped and read from disk again at its next use
    max_loras: int = 8

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size ({self.block_size}) must be a power of two, e.g. 16")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks ({self.num_blocks}) must be at least 2")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 2 * self.block_size:
            raise ValueError(f"kv_cache_tokens ({self.kv_cache_tokens}) must be at least two "
                             f"blocks ({2 * self.block_size} tokens)")
        if self.num_blocks is not None and self.kv_cache_tokens is not None:
            raise ValueError("set num_blocks or kv_cache_tokens, not both")
        if self.kv_cache_memory_mb < 1:
            raise ValueError(f"kv_cache_memory_mb ({self.kv_cache_memory_mb}) must be positive")
        if self.max_loras < 1:
            raise ValueError(f"max_loras ({self.max_loras}) must be at least 1, e.g. 8")
        if self.kv_cache_dtype not in _DTYPES:
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; use one "
                             f"of {', '.join(_DTYPES)}")


@dataclass
class SchedulerConfig:
    """Continuous batching limits per engine step."""

    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 512  # token budget per step (prefill chunks + decodes)
    enable_chunked_prefill: bool = True  # split long prompts across steps within the budget
    # Admission (AsyncEngine.generate): a new request is refused (HTTP 429) while this many
    # requests, or this many prompt tokens, wait for their first token (queued or in prefill).
    # 0 = unbounded. The defaults keep a CPU server's backlog to tens of seconds of prefill.
    max_waiting_requests: int = 128
    max_waiting_tokens: int = 32768
    # Prefill tokens per step, summed, for requests of priority > 0 (batch jobs), so that a step
    # in flight when an online request arrives stays short and its time to first token stays
    # near the idle figure (benchmarks/batch_priority.py). Decodes, priority 0 and prompts that
    # cannot be split (chunked prefill off) are not capped; 0 = no cap. Background embedding
    # pieces use it as their size.
    max_background_prefill_tokens: int = 64

    def validate(self, max_model_len: int) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs ({self.max_num_seqs}) must be at least 1")
        if self.max_background_prefill_tokens < 0:
            raise ValueError(
                f"max_background_prefill_tokens ({self.max_background_prefill_tokens}) must be "
                "0 (no cap) or positive; set e.g. 64, or 0 to let batch prefill use the whole "
                "step budget")
        for name in ("max_waiting_requests", "max_waiting_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be 0 (unbounded) or "
                                 "positive")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than "
                f"max_num_seqs ({self.max_num_seqs}); increase max_num_batched_tokens or "
                "decrease max_num_seqs"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than "
                f"max_model_len ({max_model_len}) and chunked prefill is off, so a long prompt "
                "could never be scheduled; enable chunked prefill, increase "
                "max_num_batched_tokens or decrease max_model_len"
            )


@dataclass
class EngineConfig:
    """Everything ``LLMEngine`` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def validate(self, max_model_len: int) -> None:
        """Check every section; ``max_model_len`` is the resolved context length.

        Raises:
            ValueError: naming the field, its value and the fix.
        """
        self.model.validate()
        self.cache.validate()
        self.scheduler.validate(max_model_len)


@dataclass
class ServerConfig:
    """The HTTP front end."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # empty = no authentication
    # /health answers 503 when the engine loop has not stepped (or idled) for this long; vLLM's
    # VLLM_ENGINE_ITERATION_TIMEOUT_S is 60 too
    watchdog_timeout: float = 60.0
    # on SIGTERM/SIGINT, in-flight requests get this long to finish before they are aborted
    shutdown_timeout: float = 30.0
    # the jobs store (files, batches): a SQLAlchemy URL; None = SQLite at $LMFORGE_HOME/lmforge.db
    database_url: str | None = None
    # servers sharing that store drive each batch and fine-tuning job under a lease of this many
    # seconds, renewed every third of it; a killed server's jobs are taken over once it lapses
    job_lease_s: float = 15.0
    max_upload_mb: int = 512  # POST /v1/files answers 413 above this size
    # every other request body answers 413 above this size (MiB): JSON is parsed whole on the
    # event loop (~1 s per 30 MB of token ids). A full 128k-token context is ~1 MB of JSON token
    # ids, 2048 embedding inputs of 512 tokens ~5 MB of text: 32 leaves room for both
    max_request_mb: int = 32
    # batch lines in flight at once; they run at a lower priority than online requests
    batch_concurrency: int = 8
    # seconds a batch's completion_window ("24h") lasts; None = what it says (tests shorten it)
    batch_window_s: float | None = None
    # run fine-tuning jobs here (a worker beside the engine); False leaves them queued for a
    # server that does (several replicas on one database: let one of them train)
    fine_tuning: bool = True
    # LoRA adapters served from the start, name -> PEFT directory (``--lora name=path``); the
    # operator's choice, so any directory
    loras: dict[str, str] = field(default_factory=dict)
    # the only directories POST /v1/load_lora_adapter may serve adapters from (``--lora-root``,
    # repeatable): a lora_path is resolved (symlinks, "..") and must lie inside one of them
    lora_roots: list[str] = field(default_factory=lambda: [str(lmforge_home() / "adapters")])

    def validate(self) -> None:
        """Raises ValueError naming the field and the fix."""
        if self.watchdog_timeout <= 1:  # an idle engine loop refreshes its heartbeat each 1 s
            raise ValueError(f"watchdog_timeout ({self.watchdog_timeout}) must be more than 1 "
                             "second, the idle engine loop's heartbeat")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout ({self.shutdown_timeout}) must be 0 or positive")
        if self.max_upload_mb < 1:
            raise ValueError(f"max_upload_mb ({self.max_upload_mb}) must be at least 1")
        if self.max_request_mb < 1:
            raise ValueError(f"max_request_mb ({self.max_request_mb}) must be at least 1, e.g. 32")
        if self.batch_concurrency < 1:
            raise ValueError(f"batch_concurrency ({self.batch_concurrency}) must be at least 1")
        if self.batch_window_s is not None and self.batch_window_s <= 0:
            raise ValueError(f"batch_window_s ({self.batch_window_s}) must be positive")
        if self.job_lease_s <= 0:
            raise ValueError(f"job_lease_s ({self.job_lease_s}) must be positive, e.g. 15")
