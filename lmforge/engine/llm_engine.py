"""LLMEngine (add / step / abort) and the offline ``LLM`` class built on it.

``LLMEngine.step()`` is the one loop of lmforge: schedule -> execute -> sample -> update ->
outputs, as nano-vllm's and vLLM's ``EngineCore.step``.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lmforge.config import EngineConfig, ModelConfig
from lmforge.engine.block_manager import BlockManager
from lmforge.engine.model_runner import ModelRunner, num_kv_blocks
from lmforge.engine.pooling import EmbeddingTask, validate_embedding_inputs
from lmforge.engine.request import (
    ONLINE_PRIORITY,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
    TokenLogprob,
)
from lmforge.engine.sampler import Sampler
from lmforge.engine.scheduler import Scheduler, SchedulerOutput
from lmforge.engine.structured import GrammarCompiler
from lmforge.errors import ContextLengthExceededError, InvalidRequestError
from lmforge.models.loader import LoadedModel, load_model
from lmforge.models.multi_lora import LoRAManager
from lmforge.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    """The continuous-batching engine over one model.

    Args:
        config: engine configuration (validated here).
        loaded: an already loaded model; by default ``config.model`` is loaded.

    Raises:
        ModelLoadError: the model cannot be loaded.
        ValueError: the configuration is inconsistent (the message names the fix).
    """

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        loaded = loaded or load_model(config.model)
        self.config = config
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.max_model_len = min(config.model.max_model_len or loaded.config.max_position_embeddings,
                                 loaded.config.max_position_embeddings)
        config.validate(self.max_model_len)
        cache = config.cache
        num_blocks = num_kv_blocks(loaded.model, cache)
        if num_blocks * cache.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * cache.block_size} tokens, fewer than "
                f"max_model_len ({self.max_model_len}); increase kv_cache_memory_mb / num_blocks "
                "or decrease max_model_len")
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len)
        self.loras = LoRAManager(loaded.model, cache.max_loras)
        self.model_runner = ModelRunner(loaded.model, self.block_manager, num_blocks,
                                        cache.block_size, self.loras)
        self.sampler = Sampler(loaded.config.vocab_size, self.model_runner.device,
                               seed=config.model.seed)
        self.vocab_size = loaded.config.vocab_size
        self.structured = GrammarCompiler(self.tokenizer.hf, self.vocab_size,
                                          sorted(self.tokenizer.eos_token_ids))
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.prompt_logprobs: dict[str, list[TokenLogprob | None]] = {}  # until delivered
        # requests waiting for another one's prompt to be computed (``add_request(after=)``)
        self.held: dict[str, list[Request]] = {}
        self.held_ids: set[str] = set()

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
        users = [r.request_id for r in self._all_requests() if r.lora_name == name]
        if users:
            raise InvalidRequestError(f"the LoRA adapter {name!r} is in use by {len(users)} "
                                      "request(s); wait for them to finish or abort them",
                                      param="lora_name")
        self.loras.unregister(name)

    def _all_requests(self) -> list[Request]:
        held = [r for group in self.held.values() for r in group]
        return list(self.scheduler.requests.values()) + held

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
                ``n`` > 1 request): this one is held back until that one has computed its prompt,
                then reads the prompt's full KV blocks from the prefix cache instead of computing
                them again (only the last, partial block is recomputed, as in vLLM). Unknown or
                already-past-prefill ids release it at once.

        Raises:
            InvalidRequestError: empty prompt, token id outside the vocabulary, duplicate id,
                an invalid grammar (``params.structured``).
            ContextLengthExceededError: prompt + max_tokens exceeds max_model_len.
            InvalidRequestError: an unknown ``lora`` (naming it).
            ModelLoadError: the adapter's files cannot be read or do not fit the model.
        """
        self.validate_prompt(prompt_token_ids, params)
        if request_id in self.scheduler.requests or request_id in self.held_ids:
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
        self.detokenizers[request_id] = IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, stop=params.stop,
            skip_special_tokens=params.skip_special_tokens,
            include_stop_str_in_output=params.include_stop_str_in_output)
        first = self.scheduler.requests.get(after) if after is not None else None
        if first is not None and not first.output_token_ids:
            self.held.setdefault(after, []).append(request)
            self.held_ids.add(request_id)
        else:
            self.scheduler.add_request(request)

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
        if request_id in self.held_ids:
            self.held_ids.discard(request_id)
            for group in self.held.values():
                group[:] = [r for r in group if r.request_id != request_id]
        self.scheduler.abort_request(request_id)
        self.detokenizers.pop(request_id, None)
        self.prompt_logprobs.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.held_ids)

    def step(self) -> list[RequestOutput]:
        """Run one engine step and return the outputs of requests that produced a token."""
        scheduled = self.scheduler.schedule()
        if not scheduled.requests:
            self._release_held()
            return []
        model_output = self.model_runner.execute(scheduled)
        self._record_prompt_logprobs(model_output.prompt_logits)
        sampling = scheduled.sampling_requests()
        sampled = self.sampler.sample(model_output.logits, sampling)
        logprobs = self.sampler.logprobs(model_output.logits, sampling, sampled)
        self.scheduler.update(scheduled, sampled)
        outputs = self._make_outputs(scheduled, logprobs)
        self._release_held()
        return outputs

    def _release_held(self) -> None:
        """Queue the held requests whose first request has computed its prompt (or is gone)."""
        for after in list(self.held):
            first = self.scheduler.requests.get(after)
            if first is None or first.output_token_ids:
                for request in self.held.pop(after):
                    self.held_ids.discard(request.request_id)
                    self.scheduler.add_request(request)

    def _record_prompt_logprobs(self, prompt_logits: dict[str, tuple[int, torch.Tensor]]) -> None:
        """Keep the prompt logprobs computed this step, by position (a recomputation after
        preemption overwrites instead of appending)."""
        for request_id, (first, logits) in prompt_logits.items():
            request = self.scheduler.requests[request_id]
            targets = request.prompt_token_ids[first:first + logits.shape[0]]
            entries = self.sampler.prompt_logprobs(logits, targets,
                                                   request.params.prompt_logprobs)
            stored = self.prompt_logprobs.setdefault(
                request_id, [None] * request.num_prompt_tokens)
            stored[first:first + len(entries)] = entries

    def _advance_grammar(self, request: Request, token: int) -> None:
        """Feed the sampled token to the request's grammar; finish the request ("stop") once
        the grammar is complete, so that it never waits for an EOS the model may not pick.

        A grammar can also fail here, in the grammar library (a resource limit such as a
        regex the lexer cannot expand, ``a{1000000}``): the request then finishes with
        ``FINISHED_ERROR`` and its ``error``, never as a normal-looking stop."""
        if request.grammar is None or request.status.is_finished():
            return
        if not request.grammar.accept(token) or request.grammar.failed:
            request.error = request.grammar.failure_message()
            logger.warning("request %s: its grammar failed after %d tokens: %s",
                           request.request_id, request.num_output_tokens, request.error)
            self.scheduler.finish_request(request, RequestStatus.FINISHED_ERROR)
        elif request.grammar.is_terminated:
            self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED)

    def _make_outputs(self, scheduled: SchedulerOutput,
                      logprobs: list[TokenLogprob | None]) -> list[RequestOutput]:
        outputs = []
        for request, logprob in zip(scheduled.sampling_requests(), logprobs):
            detok = self.detokenizers[request.request_id]
            token = request.output_token_ids[-1]
            self._advance_grammar(request, token)
            # A stop token id (eos included) ends the text without being part of it, as in vLLM.
            stop_token = (request.status == RequestStatus.FINISHED_STOPPED
                          and token in request.stop_token_ids
                          and not request.params.include_stop_str_in_output)
            text = "" if stop_token else detok.update([token])
            if detok.stopped:  # a stop string wins over length, as in vLLM
                self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED)
                request.status = RequestStatus.FINISHED_STOPPED
            elif request.status.is_finished():
                text += detok.flush()
            if request.status.is_finished():
                del self.detokenizers[request.request_id]
            prompt_logprobs = None
            if request.params.prompt_logprobs is not None and request.num_output_tokens == 1:
                prompt_logprobs = self.prompt_logprobs.pop(request.request_id, None) or [None]
            outputs.append(RequestOutput(
                request_id=request.request_id, text=text, token_ids=[token],
                finished=request.status.is_finished(),
                finish_reason=request.status.finish_reason,
                num_prompt_tokens=request.num_prompt_tokens,
                num_cached_tokens=request.num_cached_tokens,
                num_output_tokens=request.num_output_tokens,
                logprobs=None if logprob is None else [logprob],
                prompt_logprobs=prompt_logprobs, error=request.error,
                error_param=request.params.structured.param if request.error else None))
        return outputs


@dataclass
class GenerationOutput:
    """The finished result of one prompt in offline use."""

    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    num_cached_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token, if ``params.logprobs`` is set
    # one per prompt token (None for the first), if ``params.prompt_logprobs`` is set
    prompt_logprobs: list[TokenLogprob | None] | None = None


class LLM:
    """Offline generation: ``LLM("smollm2-135m-instruct").generate(["Hello"], params)``.

    Args:
        model: alias, GGUF file or HF directory.
        **kwargs: ModelConfig fields (dtype, device, max_model_len, chat_template, seed).
    """

    def __init__(self, model: str, config: EngineConfig | None = None, **kwargs):
        config = config or EngineConfig(model=ModelConfig(model=model, **kwargs))
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | None = None, use_tqdm: bool = True,
                 lora: str | None = None) -> list[GenerationOutput]:
        """Generate for all prompts in continuous batches; results in prompt order.

        ``lora``: an adapter registered with ``self.engine.add_lora`` (None = the base model).
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        return self._run(ids, params or SamplingParams(), use_tqdm, lora)

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[GenerationOutput]:
        """Generate replies to one conversation or a list of them (chat template applied)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        template = self.engine.config.model.chat_template
        ids = [self.tokenizer.apply_chat_template(c, chat_template=template) for c in convs]
        return self._run(ids, params or SamplingParams(), use_tqdm)

    def embed(self, prompts: str | list[str] | list[int] | list[list[int]]) -> torch.Tensor:
        """Embeddings of a prompt or a list of prompts (text or token ids): the mean of the
        final hidden states over each prompt's tokens, L2-normalized (``engine.pooling``).

        Returns:
            (num_prompts, hidden_size) float32 unit vectors, in prompt order.

        Raises:
            InvalidRequestError, ContextLengthExceededError: as ``LLMEngine.start_embedding``.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        task = self.engine.start_embedding(ids)
        while not task.step():
            pass
        return task.result()

    def _run(self, prompt_ids: list[list[int]], params: SamplingParams, use_tqdm: bool,
             lora: str | None = None):
        engine = self.engine
        rids = [f"offline-{next(self._ids)}" for _ in prompt_ids]
        for rid, ids in zip(rids, prompt_ids):
            engine.add_request(rid, ids, params, lora=lora)
        texts = {rid: [] for rid in rids}
        tokens = {rid: [] for rid in rids}
        logprobs = {rid: [] for rid in rids}
        prompt_logprobs = {}
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(rids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while len(done) < len(rids):
                for out in engine.step():
                    texts[out.request_id].append(out.text)
                    tokens[out.request_id].extend(out.token_ids)
                    logprobs[out.request_id].extend(out.logprobs or [])
                    if out.prompt_logprobs is not None:
                        prompt_logprobs[out.request_id] = out.prompt_logprobs
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [GenerationOutput(ids, "".join(texts[r]), tokens[r], done[r].finish_reason,
                                 done[r].num_cached_tokens,
                                 logprobs[r] if params.logprobs is not None else None,
                                 prompt_logprobs.get(r))
                for r, ids in zip(rids, prompt_ids)]
