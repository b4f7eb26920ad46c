"""LLMEngine: add / step / abort over one model.

``LLMEngine.step()`` is the one loop of lmforge: schedule -> execute -> sample -> update ->
outputs, as nano-vllm's and vLLM's ``EngineCore.step``. A request's state lives in three owners:
the ``Scheduler`` (its status, its place in the queues, the only writer of ``RequestStatus``),
the ``BlockManager`` (its block table) and the ``OutputProcessor`` (its detokenizer and prompt
logprobs until delivered). The offline ``LLM`` (``engine/llm.py``) and ``AsyncEngine`` drive it.
"""

from __future__ import annotations

import logging

import torch

from lmforge.config import EngineConfig
from lmforge.engine.block_manager import BlockManager
from lmforge.engine.memory import MemoryReport, resident_bytes, tensor_bytes
from lmforge.engine.model_runner import ModelRunner, kv_cache_dtype, num_kv_blocks
from lmforge.engine.output_processor import OutputProcessor
from lmforge.engine.pooling import EmbeddingTask, validate_embedding_inputs
from lmforge.engine.request import (
    ONLINE_PRIORITY,
    Request,
    RequestOutput,
    SamplingParams,
)
from lmforge.engine.sampler import Sampler
from lmforge.engine.scheduler import Scheduler
from lmforge.engine.structured import GrammarCompiler
from lmforge.errors import ContextLengthExceededError, InvalidRequestError
from lmforge.models.loader import LoadedModel, load_model
from lmforge.models.multi_lora import LoRAManager
from lmforge.startup import StartupProfile, phase

logger = logging.getLogger(__name__)


class LLMEngine:
    """The continuous-batching engine over one model.

    Args:
        config: engine configuration (validated here).
        loaded: an already loaded model; by default ``config.model`` is loaded.
        profile: records the start-up phases (loading, KV cache, grammar compiler).

    Raises:
        ModelLoadError: the model cannot be loaded.
        ValueError: the configuration is inconsistent (the message names the fix).
    """

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None,
                 profile: StartupProfile | None = None):
        loaded = loaded or load_model(config.model, profile=profile)
        self.config = config
        self.model_name = loaded.name
        self.kernels = loaded.kernels  # which linear-layer path runs (LoadedModel.kernels)
        self.tokenizer = loaded.tokenizer
        self.max_model_len = min(config.model.max_model_len or loaded.config.max_position_embeddings,
                                 loaded.config.max_position_embeddings)
        config.validate(self.max_model_len)
        cache = config.cache
        num_blocks = num_kv_blocks(loaded.model, cache)
        if num_blocks * cache.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * cache.block_size} tokens, fewer than "
                f"max_model_len ({self.max_model_len}); increase kv_cache_tokens, "
                "kv_cache_memory_mb or num_blocks, or decrease max_model_len")
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching,
                                          batch_invariant=config.model.deterministic)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len)
        self.loras = LoRAManager(loaded.model, cache.max_loras)
        with phase(profile, "KV cache"):
            self.model_runner = ModelRunner(loaded.model, self.block_manager, num_blocks,
                                            cache.block_size, self.loras,
                                            deterministic=config.model.deterministic,
                                            kv_dtype=kv_cache_dtype(loaded.model,
                                                                    cache.kv_cache_dtype))
        self.sampler = Sampler(loaded.config.vocab_size, self.model_runner.device,
                               seed=config.model.seed)
        self.vocab_size = loaded.config.vocab_size
        with phase(profile, "grammar compiler"):
            self.structured = GrammarCompiler(self.tokenizer.hf, self.vocab_size,
                                              sorted(self.tokenizer.eos_token_ids))
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler)
        self.weight_bytes = tensor_bytes(loaded.model)  # the base model, before any adapter

    def memory_report(self) -> MemoryReport:
        """Weights, KV cache (reserved and written) and resident memory, now."""
        runner, blocks = self.model_runner, self.block_manager
        per_block = runner.kv_cache_bytes // blocks.num_blocks
        return MemoryReport(self.weight_bytes, runner.kv_cache_bytes,
                            blocks.num_blocks * blocks.block_size,
                            blocks.num_touched_blocks * per_block, resident_bytes())

    def add_lora(self, name: str, directory: str) -> None:
        """Register a PEFT LoRA adapter directory under ``name``; requests then name it with
        ``add_request(..., lora=name)``. Its weights are read at first use
        (``models.multi_lora.LoRAManager``; at most ``CacheConfig.max_loras`` stay loaded).

        Raises:
            InvalidRequestError: ``name`` is taken.
            ModelLoadError: missing or invalid adapter, or unsupported options.
        """
        self.loras.register(name, directory)

    def remove_lora(self, name: str) -> None:
        """Unregister an adapter and drop its weights.

        Raises:
            InvalidRequestError: unknown name, or requests still use it (abort them first).
        """
        self.loras.get(name)
        users = [r for r in self.scheduler.requests.values() if r.lora_name == name]
        if users:
            raise InvalidRequestError(f"the LoRA adapter {name!r} is in use by {len(users)} "
                                      "request(s); wait for them to finish or abort them",
                                      param="lora_name")
        self.loras.unregister(name)

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, after: str | None = None,
                    priority: int = ONLINE_PRIORITY, lora: str | None = None) -> None:
        """Queue a request. Validation errors are raised here, before anything is queued.

        Args:
            lora: the name of a LoRA adapter (``add_lora``) to run the request with; None =
                the base model. Its weights are read now if they are not loaded.
            priority: smaller is scheduled first; online requests run at ``ONLINE_PRIORITY``
                (0), batch jobs at ``BATCH_PRIORITY`` (1) behind them (``engine/scheduler.py``).
            after: the id of a running request with the same prompt (the first choice of an
                ``n`` > 1 request): this one waits (``WAITING_FOR_PREFIX``) until that one has
                computed its prompt, then reads the prompt's full KV blocks from the prefix cache
                instead of computing them again (only the last, partial block is recomputed, as
                in vLLM). Unknown or already-past-prefill ids queue it at once
                (``Scheduler.add_request``).

        Raises:
            InvalidRequestError: empty prompt, token id outside the vocabulary, duplicate id,
                an invalid grammar (``params.structured``).
            ContextLengthExceededError: prompt + max_tokens exceeds max_model_len.
            InvalidRequestError: an unknown ``lora`` (naming it).
            ModelLoadError: the adapter's files cannot be read or do not fit the model.
        """
        self.validate_prompt(prompt_token_ids, params)
        if request_id in self.scheduler.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        lora_id = None
        if lora is not None:
            lora_id = self.loras.get(lora).lora_id
            self.loras.activate({lora})  # loaded at first use, so a bad adapter fails here
        request = Request(request_id, prompt_token_ids, params, self.tokenizer.eos_token_ids,
                          priority=priority, lora_name=lora, lora_id=lora_id)
        if params.structured is not None:
            request.grammar = self.structured.matcher(params.structured)
        if request.max_tokens is None:
            request.max_tokens = self.max_model_len - len(prompt_token_ids)
        self.output_processor.add_request(request)
        self.scheduler.add_request(request, after)

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Check a prompt against the vocabulary and the context length (see ``add_request``)."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty; send at least one token",
                                      param="prompt")
        bad = next((t for t in prompt_token_ids
                    if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})",
                param="prompt")
        bad = next((t for t in params.logit_bias if t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"logit_bias token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                param="logit_bias")
        if params.structured is not None:
            self.structured.compile(params.structured)  # cached; raises on a bad grammar
        wanted = n + (params.max_tokens or 0)
        if n >= self.max_model_len or wanted > self.max_model_len:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {wanted} tokens ({n} in the prompt, {params.max_tokens or 0} for "
                "the completion). Please reduce the prompt or max_tokens.")

    def start_embedding(self, prompts: list[list[int]],
                        priority: int = ONLINE_PRIORITY) -> EmbeddingTask:
        """Validate the token-id prompts of one embeddings request and return its task.

        Runs nothing: the thread that runs the model drives ``task.step()``, each call computing
        at most ``max_num_batched_tokens`` tokens (``lmforge.engine.pooling``), or, for a
        ``priority`` > 0, at most ``max_background_prefill_tokens`` (when set), then reads
        ``task.result()``, (len(prompts), hidden_size) float32 unit vectors.

        Raises:
            InvalidRequestError: no prompts, too many, an empty one, a token id outside the
                vocabulary.
            ContextLengthExceededError: a prompt longer than max_model_len.
        """
        validate_embedding_inputs(prompts, self.vocab_size, self.max_model_len)
        limits = self.config.scheduler
        piece = limits.max_num_batched_tokens
        if priority > ONLINE_PRIORITY and limits.max_background_prefill_tokens:
            piece = min(piece, limits.max_background_prefill_tokens)
        return EmbeddingTask(self.model_runner.model, prompts, self.config.cache.block_size, piece)

    def abort_request(self, request_id: str) -> None:
        """Finish a request as aborted and free its KV blocks now. Unknown ids are ignored."""
        self.scheduler.abort_request(request_id)
        self.output_processor.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Run one engine step and return the outputs of requests that produced a token."""
        scheduled = self.scheduler.schedule()
        if not scheduled.requests:
            return []
        model_output = self.model_runner.execute(scheduled)
        self._record_prompt_logprobs(model_output.prompt_logits)
        sampling = scheduled.sampling_requests()
        sampled = self.sampler.sample(model_output.logits, sampling)
        logprobs = self.sampler.logprobs(model_output.logits, sampling, sampled)
        self.scheduler.update(scheduled, sampled)
        return self.output_processor.process(sampling, logprobs)

    def _record_prompt_logprobs(self, prompt_logits: dict[str, tuple[int, torch.Tensor]]) -> None:
        """The prompt logprobs computed this step (logits of positions ``first ..``), to the
        output processor until the request's first output carries them."""
        for request_id, (first, logits) in prompt_logits.items():
            request = self.scheduler.requests[request_id]
            targets = request.prompt_token_ids[first:first + logits.shape[0]]
            entries = self.sampler.prompt_logprobs(logits, targets,
                                                   request.params.prompt_logprobs)
            self.output_processor.record_prompt_logprobs(request, first, entries)
