"""Embeddings: the pooling function, and the engine's pieces against Hugging Face's
``last_hidden_state`` mean-pooled and normalized (golden test), chunked or not."""

import asyncio

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from lmforge.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmforge.engine.async_engine import AsyncEngine
from lmforge.engine.llm import LLM
from lmforge.engine.llm_engine import LLMEngine
from lmforge.engine.pooling import MAX_EMBEDDING_INPUTS, mean_pool
from lmforge.engine.request import SamplingParams
from lmforge.errors import ContextLengthExceededError, InvalidRequestError

LENGTHS = [40, 1, 5, 23, 9]  # a long one first: with a budget of 7 it is split across pieces


def naive_mean_pool(hidden, lengths):
    return F.normalize(torch.stack([h.float().mean(0) for h in hidden.split(lengths)]), dim=-1)


def test_mean_pool_equals_the_naive_loop():
    torch.manual_seed(0)
    lengths = [3, 1, 7]
    hidden = torch.randn(sum(lengths), 16)
    pooled = mean_pool(hidden, lengths)
    torch.testing.assert_close(pooled, naive_mean_pool(hidden, lengths))
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3))
    # bf16 states are pooled in fp32
    assert mean_pool(hidden.bfloat16(), lengths).dtype == torch.float32
    # a zero mean stays zero instead of dividing by zero
    assert mean_pool(torch.zeros(2, 4), [2]).eq(0).all()


def make_engine(model_dir, budget: int, max_model_len: int = 64) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=ModelConfig(model=str(model_dir), dtype="float32", max_model_len=max_model_len),
        cache=CacheConfig(block_size=4, num_blocks=32),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget)))


def hf_embeddings(model_dir, prompts):
    """Hugging Face's LlamaModel last_hidden_state, mean over tokens, L2-normalized."""
    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        rows = [hf(torch.tensor([p])).last_hidden_state[0].mean(0) for p in prompts]
    return F.normalize(torch.stack(rows), dim=-1)


def run(task, model):
    """Drive ``task`` to the end, recording the tokens each step sends through the model."""
    sizes = []
    hook = model.register_forward_pre_hook(lambda _, args: sizes.append(len(args[0])))
    try:
        while not task.step():
            pass
    finally:
        hook.remove()
    return task.result(), sizes


@pytest.mark.parametrize("budget", [512, 7], ids=["one-piece", "pieces"])
def test_embeddings_match_hugging_face(tiny_llama_dir, budget):
    torch.manual_seed(0)
    prompts = [torch.randint(0, 49152, (n,)).tolist() for n in LENGTHS]
    engine = make_engine(tiny_llama_dir, budget)
    ours, sizes = run(engine.start_embedding(prompts), engine.model_runner.model)
    assert ours.shape == (len(LENGTHS), 64) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, hf_embeddings(tiny_llama_dir, prompts), rtol=0, atol=1e-5)
    assert sum(sizes) == sum(LENGTHS) and max(sizes) <= budget
    if budget == 7:
        # the 40-token prompt in 6 chunks (its 4-token tail with the 1-token prompt), then
        # whole prompts packed while they fit: 5, then 23 split, then 9 split
        assert sizes == [7, 7, 7, 7, 7, 5 + 1, 5, 7, 7, 7, 2, 7, 2]
    # the engine's paged KV cache was not touched
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(k.eq(0).all() for k, _ in engine.model_runner.kv_caches)


def test_llm_embed_takes_text_or_token_ids(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), config=make_engine(tiny_llama_dir, 512).config)
    text = llm.embed(["Hello there", "A second, longer sentence to embed."])
    ids = [llm.tokenizer.encode("Hello there")]
    torch.testing.assert_close(llm.embed(ids[0]), text[:1])
    torch.testing.assert_close(llm.embed("Hello there"), text[:1])
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))


def test_invalid_inputs_are_rejected_before_anything_runs(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, 512, max_model_len=32)
    with pytest.raises(InvalidRequestError, match="input must not be empty"):
        engine.start_embedding([])
    with pytest.raises(InvalidRequestError, match=r"input\[1\] is empty"):
        engine.start_embedding([[5], []])
    with pytest.raises(InvalidRequestError, match=r"token id 49152, outside the vocabulary"):
        engine.start_embedding([[5, 49152]])
    with pytest.raises(InvalidRequestError, match="token id -1"):
        engine.start_embedding([[-1]])
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_EMBEDDING_INPUTS}"):
        engine.start_embedding([[5]] * (MAX_EMBEDDING_INPUTS + 1))
    with pytest.raises(ContextLengthExceededError, match=r"length is 32 tokens.*has 33 tokens"):
        engine.start_embedding([[5] * 33])
    assert engine.start_embedding([[5] * 32]).num_tokens == 32  # the whole context is allowed


def test_async_engine_embeds_between_steps_and_drops_cancelled_work(tiny_llama_dir):
    torch.manual_seed(0)
    prompts = [torch.randint(0, 49152, (n,)).tolist() for n in LENGTHS]
    expected = LLM(str(tiny_llama_dir), config=make_engine(tiny_llama_dir, 7).config).embed(
        prompts)
    engine = AsyncEngine(make_engine(tiny_llama_dir, 7))
    forwards = []
    engine.engine.model_runner.model.register_forward_pre_hook(lambda *_: forwards.append(1))

    async def main():
        # queued before the loop runs, then cancelled: the loop must drop it unrun
        cancelled = asyncio.ensure_future(engine.embed("gone", prompts))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        engine.start()
        await asyncio.sleep(0.2)
        assert not forwards
        # an embedding and a generation side by side
        async def generate():
            return [o async for o in engine.generate("g", [5, 6, 7], SamplingParams(
                temperature=0, max_tokens=8, ignore_eos=True))]

        return await asyncio.gather(engine.embed("e", prompts), generate())

    try:
        embedded, generation = asyncio.run(main())
    finally:
        engine.shutdown()
    assert generation[-1].finished and generation[-1].num_output_tokens == 8
    assert torch.tensor(embedded).equal(expected)
