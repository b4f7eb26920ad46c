"""``--kv-cache-dtype float16`` on a float32 model: twice the tokens in the same memory, and
logprobs within a stated bound of the float32 cache's, chunked prefills and decodes reading
the float16 cache."""

from __future__ import annotations

import torch

from lmforge.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmforge.engine.llm import LLM
from lmforge.engine.request import SamplingParams

PROMPT = list(range(3000, 3100))
# what the float16 cache may move a logprob of the default model (nats); measured: 0.0047 on
# the prompt, 0.0008 on the decoded tokens
MAX_LOGPROB_DRIFT = 0.03


def run(gguf_path, kv_dtype: str):
    llm = LLM(str(gguf_path), config=EngineConfig(
        model=ModelConfig(model=str(gguf_path), dtype="float32", max_model_len=512),
        cache=CacheConfig(kv_cache_memory_mb=64, kv_cache_dtype=kv_dtype,
                          enable_prefix_caching=False),
        # 32-token chunks: every chunk after the first attends to the cached ones
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32)))
    params = SamplingParams(max_tokens=8, temperature=0.0, prompt_logprobs=0, logprobs=0,
                            ignore_eos=True)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    return llm, out


def test_a_float16_cache_holds_twice_the_tokens_within_the_bound(smollm2_gguf_path):
    full, reference = run(smollm2_gguf_path, "auto")
    half, out = run(smollm2_gguf_path, "float16")
    assert half.engine.model_runner.kv_caches[0][0].dtype == torch.float16
    assert full.engine.model_runner.kv_caches[0][0].dtype == torch.float32
    assert half.engine.block_manager.num_blocks == 2 * full.engine.block_manager.num_blocks
    prompt_drift = max(abs(a.logprob - b.logprob)
                       for a, b in zip(out.prompt_logprobs[1:], reference.prompt_logprobs[1:]))
    assert 0 < prompt_drift < MAX_LOGPROB_DRIFT  # not zero: the chunks did read float16
    assert out.token_ids == reference.token_ids
    decode_drift = max(abs(a.logprob - b.logprob)
                       for a, b in zip(out.logprobs, reference.logprobs))
    assert decode_drift < MAX_LOGPROB_DRIFT
