"""The offline ``LLM``: generate, chat and embed in one process, vLLM's ``LLM`` class.

It drives an ``LLMEngine`` directly (no thread, no event loop): every prompt is queued, then
``step()`` runs until all are finished, continuous batching doing the rest.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lmforge.config import EngineConfig, ModelConfig
from lmforge.engine.llm_engine import LLMEngine
from lmforge.engine.request import CompletionOutput, SamplingParams, TokenLogprob


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

        Raises (all ``ValueError`` subclasses, before anything runs; the checks of seed 001's
        ``GPT.generate``, with OpenAI's ranges where they differ):
            ContextLengthExceededError: a prompt plus ``max_tokens`` longer than the context.
            InvalidRequestError: from ``SamplingParams``: ``temperature`` < 0 (0 is greedy, as
                ``do_sample=False``), ``top_k`` < 0 (0 or -1 disables it), ``top_p`` outside
                (0, 1]; an empty prompt or a token outside the vocabulary.
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
             lora: str | None = None) -> list[GenerationOutput]:
        engine = self.engine
        rids = [f"offline-{next(self._ids)}" for _ in prompt_ids]
        for n, (rid, ids) in enumerate(zip(rids, prompt_ids)):
            try:
                engine.add_request(rid, ids, params, lora=lora)
            except Exception:  # a bad prompt: none of the list runs, nothing is left queued
                for queued in rids[:n]:
                    engine.abort_request(queued)
                raise
        results = {rid: CompletionOutput() for rid in rids}
        num_done = 0
        with tqdm(total=len(rids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while num_done < len(rids):
                for out in engine.step():
                    results[out.request_id].add(out)
                    num_done += out.finished
                    bar.update(int(out.finished))
        outputs = []
        for rid, ids in zip(rids, prompt_ids):
            r = results[rid]
            outputs.append(GenerationOutput(
                ids, r.text, r.token_ids, r.finish_reason, r.num_cached_tokens,
                r.logprobs if params.logprobs is not None else None, r.prompt_logprobs))
        return outputs
