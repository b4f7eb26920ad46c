"""Request priority on a real tiny model: batch requests run behind online ones, with the same
results (greedy) as when each runs alone; embeddings honour the priority too."""

import asyncio
import threading

import torch

from lmforge.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmforge.engine.async_engine import AsyncEngine
from lmforge.engine.llm import LLM
from lmforge.engine.request import BATCH_PRIORITY, SamplingParams

BATCH = ["The quick brown fox jumps over the lazy dog. " * 3, "Once upon a time, " * 6,
         "def fibonacci(n):\n    return n if n < 2 else " * 2, "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"]
ONLINE = ["Hello, how are you?", "What is the capital of France? Think carefully.",
          "Write a haiku about the sea."]


def make_llm(model_dir, cap: int) -> LLM:
    return LLM(str(model_dir), config=EngineConfig(
        model=ModelConfig(model=str(model_dir), max_model_len=256, dtype="float32"),
        # no prefix caching: the runs alone must not hand the joint run cached prompts
        cache=CacheConfig(block_size=4, num_blocks=256, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64,
                                  max_background_prefill_tokens=cap)))


def greedy(n=10) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


class HoldBackProbe:
    """Wraps ``scheduler.schedule``: pauses the engine thread at the second step (the batch is
    then part-way through its prefill) until ``release`` is set, and records whether a step
    ever gave an online request prefill tokens while a running batch request with prompt left
    got none (the priority rule)."""

    def __init__(self, scheduler):
        self.scheduler, self.schedule = scheduler, scheduler.schedule
        self.calls, self.seen = 0, False
        self.paused, self.release = threading.Event(), threading.Event()
        scheduler.schedule = self

    def __call__(self):
        self.calls += 1
        if self.calls == 2:
            self.paused.set()
            self.release.wait(timeout=30)
        out = self.schedule()
        online_prefill = any(r.priority == 0 and n > 1
                             for r, n in zip(out.requests, out.num_new_tokens))
        held = [r for r in self.scheduler.running if r.priority > 0 and r not in out.requests
                and r.num_tokens - r.num_computed_tokens > 1]
        self.seen |= online_prefill and bool(held)
        return out


def test_online_and_batch_requests_together_give_the_tokens_each_gives_alone(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir, cap=8)
    alone = {p: llm.generate([p], greedy(), use_tqdm=False)[0].token_ids for p in BATCH + ONLINE}
    engine = AsyncEngine(llm.engine)
    probe = HoldBackProbe(llm.engine.scheduler)
    engine.start()

    async def run(rid: str, prompt: str, priority: int) -> list[int]:
        ids = engine.tokenizer.encode(prompt)
        return [t async for out in engine.generate(rid, ids, greedy(), priority=priority)
                for t in out.token_ids]

    async def main():
        batch = [asyncio.ensure_future(run(f"b{i}", p, BATCH_PRIORITY))
                 for i, p in enumerate(BATCH)]
        assert await asyncio.to_thread(probe.paused.wait, 30)
        online = [asyncio.ensure_future(run(f"o{i}", p, 0)) for i, p in enumerate(ONLINE)]
        await asyncio.sleep(0)  # each has sent its request to the engine
        probe.release.set()
        return await asyncio.gather(*batch), await asyncio.gather(*online)

    try:
        batch, online = asyncio.run(main())
    finally:
        probe.release.set()
        engine.shutdown()
    assert batch == [alone[p] for p in BATCH]
    assert online == [alone[p] for p in ONLINE]
    assert probe.seen, "no step held batch prefill back for an online one"


def test_batch_priority_embeddings_equal_online_ones(tiny_llama_dir):
    engine = AsyncEngine(make_llm(tiny_llama_dir, cap=8).engine)  # batch pieces of 8 tokens
    engine.start()
    prompts = [engine.tokenizer.encode(p) for p in BATCH]

    async def main():
        return await asyncio.gather(engine.embed("e0", prompts),
                                    engine.embed("e1", prompts, priority=BATCH_PRIORITY))

    try:
        online, batch = asyncio.run(main())
    finally:
        engine.shutdown()
    torch.testing.assert_close(torch.tensor(batch), torch.tensor(online), rtol=0, atol=1e-5)
