"""``--deterministic``: a seeded request gives the same tokens and the same logprobs, to the last
bit, alone and inside a batch of 16 other requests whose prompts chunk its prefill differently,
and again when its prompt comes from the prefix cache; the batch-invariant kernels match the
plain ones to float rounding."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from lmforge.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmforge.engine.llm import LLM
from lmforge.engine.request import SamplingParams
from lmforge.models.invariant import invariant_attention, tiled_linear

TARGET = SamplingParams(max_tokens=8, temperature=0.8, seed=7, logprobs=2, ignore_eos=True)


def make_llm(gguf_path, prefix_caching: bool) -> LLM:
    config = EngineConfig(
        model=ModelConfig(model=str(gguf_path), dtype="float32", deterministic=True,
                          max_model_len=512),
        cache=CacheConfig(num_blocks=256, enable_prefix_caching=prefix_caching),
        # a small step budget: the batch's prefills are cut into chunks that share steps
        scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=64))
    return LLM(str(gguf_path), config=config)


def fingerprint(output) -> list[tuple[int, float, tuple]]:
    """Tokens, their logprobs and the top-2 alternatives, exactly."""
    return [(lp.token_id, lp.logprob, tuple(lp.top)) for lp in output.logprobs]


def target_alone_and_in_a_batch(llm: LLM):
    rng = random.Random(0)
    target = [rng.randrange(100, 40000) for _ in range(83)]
    others = [[rng.randrange(100, 40000) for _ in range(rng.randrange(5, 70))]
              for _ in range(16)]
    alone = llm.generate([target], TARGET, use_tqdm=False)[0]
    batch = llm.generate([*others[:7], target, *others[7:]], TARGET, use_tqdm=False)
    return alone, batch[7]


def test_a_seeded_request_is_the_same_alone_and_inside_a_batch(smollm2_gguf_path):
    # no prefix cache: the target's prompt is computed both times, in other chunks
    alone, in_batch = target_alone_and_in_a_batch(make_llm(smollm2_gguf_path, False))
    assert len(alone.token_ids) == 8
    assert fingerprint(in_batch) == fingerprint(alone)


def test_a_cached_prompt_gives_the_same_numbers(smollm2_gguf_path):
    llm = make_llm(smollm2_gguf_path, True)
    blocks = llm.engine.block_manager
    prompt = list(range(2000, 2070))
    first = llm.generate([prompt], TARGET, use_tqdm=False)[0]
    hits = blocks.num_hits
    again = llm.generate([prompt], TARGET, use_tqdm=False)[0]
    assert blocks.num_hits - hits == 64  # 4 full blocks read from the cache
    assert fingerprint(again) == fingerprint(first)


def test_the_invariant_kernels_match_the_plain_ones():
    torch.manual_seed(0)
    x, w, b = torch.randn(37, 96), torch.randn(80, 96), torch.randn(80)
    out = tiled_linear(x, w, b)
    torch.testing.assert_close(out, F.linear(x, w, b))
    assert torch.equal(tiled_linear(x[5:6], w, b)[0], out[5])  # any batch, same bits
    q, k, v = torch.randn(50, 6, 16), torch.randn(2, 130, 16), torch.randn(2, 130, 16)
    full = invariant_attention(q, k, v, 0, 0.25)
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k[:, :50][None], v[:, :50][None], is_causal=True, scale=0.25,
        enable_gqa=True)[0].transpose(0, 1)
    torch.testing.assert_close(full, expected)
    for start, end in [(0, 1), (17, 18), (20, 50), (49, 50)]:  # a decode, a chunk: same bits
        assert torch.equal(invariant_attention(q[start:end], k, v, start, 0.25),
                           full[start:end])
