"""The whole engine on a tiny random Llama: batching, prefix caching, preemption, seeds, stops."""

import asyncio

import pytest

from lmforge.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmforge.engine.async_engine import AsyncEngine
from lmforge.engine.llm import LLM
from lmforge.engine.llm_engine import LLMEngine
from lmforge.engine.request import SamplingParams
from lmforge.errors import ContextLengthExceededError, InvalidRequestError

PROMPTS = ["The quick brown fox", "Once upon a time in a land far away",
           "def fibonacci(n):", "1, 2, 3, 4,"]


def make_llm(model_dir, num_blocks=256, block_size=4, budget=512, max_seqs=16,
             prefix_caching=True) -> LLM:
    return LLM(str(model_dir), config=EngineConfig(
        model=ModelConfig(model=str(model_dir), max_model_len=256, dtype="float32"),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                          enable_prefix_caching=prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget)))


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir)


def greedy(n=12, **kw):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def texts(outs):
    return [o.token_ids for o in outs]


def test_batched_greedy_equals_one_at_a_time(llm):
    batched = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    alone = [llm.generate([p], greedy(), use_tqdm=False)[0] for p in PROMPTS]
    assert texts(batched) == texts(alone)
    assert all(o.finish_reason == "length" and len(o.token_ids) == 12 for o in batched)


def test_chunked_prefill_and_tiny_budget_give_the_same_tokens(llm, tiny_llama_dir):
    small = make_llm(tiny_llama_dir, budget=16, max_seqs=16)
    assert texts(small.generate(PROMPTS, greedy(), use_tqdm=False)) == \
        texts(llm.generate(PROMPTS, greedy(), use_tqdm=False))


def test_preemption_under_a_tiny_cache_still_gives_the_same_tokens(llm, tiny_llama_dir):
    # 70 blocks x 4 tokens = 280 slots; 8 requests of ~60 tokens each cannot all stay resident
    tight = make_llm(tiny_llama_dir, num_blocks=70, budget=64)
    prompts = [p * 4 for p in PROMPTS] * 2
    preempted = []
    scheduler = tight.engine.scheduler
    orig_schedule = scheduler.schedule

    def schedule():
        out = orig_schedule()
        preempted.extend(out.preempted)
        return out

    scheduler.schedule = schedule
    got = tight.generate(prompts, greedy(40), use_tqdm=False)
    assert preempted, "the cache was meant to be too small for all requests at once"
    assert texts(got) == texts(llm.generate(prompts, greedy(40), use_tqdm=False))
    assert tight.engine.block_manager.num_free_blocks == 70


def test_prefix_cache_reuses_a_shared_prompt_and_changes_nothing(llm, tiny_llama_dir):
    system = "You are a helpful assistant who answers in one short sentence. " * 3
    prompts = [system + q for q in ("Why is the sky blue?", "What is 2+2?")]
    first = llm.generate(prompts[:1], greedy(), use_tqdm=False)[0]
    second = llm.generate(prompts[1:], greedy(), use_tqdm=False)[0]
    assert second.num_cached_tokens >= 32 and second.num_cached_tokens % 4 == 0
    uncached = make_llm(tiny_llama_dir, prefix_caching=False)
    assert texts(uncached.generate(prompts, greedy(), use_tqdm=False)) == \
        [first.token_ids, second.token_ids]


def test_seeded_sampling_is_independent_of_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], seeded, use_tqdm=False)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * 3
    engine = llm.engine
    engine.add_request("x1", llm.tokenizer.encode(PROMPTS[1]), others[0])
    engine.add_request("seeded", llm.tokenizer.encode(PROMPTS[0]), seeded)
    engine.add_request("x2", llm.tokenizer.encode(PROMPTS[2]), others[1])
    tokens = []
    while engine.has_unfinished_requests():
        tokens += [t for o in engine.step() if o.request_id == "seeded" for t in o.token_ids]
    assert tokens == alone
    other_seed = SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate([PROMPTS[0]], other_seed, use_tqdm=False)[0].token_ids != alone


def test_a_seeded_request_never_reads_the_prefix_cache(llm):
    """Cached KV plus a recomputed tail runs other kernels than a whole-prompt prefill (on a
    bf16 CPU: the 4-bit kernel for a few rows), so a seeded request repeated on an idle engine
    computes its whole prompt again, and gives the same tokens; an unseeded one reads the
    cache. (On this float32 model both paths would round alike: the count is what is checked.)
    """
    prompt = "You are a helpful assistant who answers in one short sentence. " * 3
    seeded = SamplingParams(temperature=0.3, seed=42, max_tokens=12, ignore_eos=True)
    first, again = (llm.generate([prompt], seeded, use_tqdm=False)[0] for _ in range(2))
    assert first.num_cached_tokens == again.num_cached_tokens == 0
    assert first.token_ids == again.token_ids
    unseeded = SamplingParams(temperature=0.3, max_tokens=12, ignore_eos=True)
    assert llm.generate([prompt], unseeded, use_tqdm=False)[0].num_cached_tokens >= 32


def test_stop_string_cuts_the_text(llm):
    free = llm.generate([PROMPTS[1]], greedy(20), use_tqdm=False)[0]
    stop = free.text[5:9]
    assert stop.strip(), f"pick a visible stop string from {free.text!r}"
    cut = llm.generate([PROMPTS[1]], greedy(20, stop=[stop]), use_tqdm=False)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.index(stop)]


def test_stop_token_ids_and_eos(llm):
    free = llm.generate([PROMPTS[2]], greedy(10), use_tqdm=False)[0]
    stop_at = free.token_ids[3]
    out = llm.generate([PROMPTS[2]], greedy(10, stop_token_ids=[stop_at]), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_at
    assert len(out.token_ids) == free.token_ids.index(stop_at) + 1
    # the stop token ends the text without being part of it, unless asked for (as in vLLM)
    assert out.text == llm.tokenizer.decode(out.token_ids[:-1])
    kept = llm.generate([PROMPTS[2]], greedy(10, stop_token_ids=[stop_at],
                                             include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.text == llm.tokenizer.decode(kept.token_ids) != out.text


def test_eos_is_not_in_the_text_even_with_special_tokens_kept(llm):
    eos = 2  # <|im_end|> in SmolLM2's vocabulary
    forced = dict(temperature=0, max_tokens=5, logit_bias={eos: 100},
                  skip_special_tokens=False)
    out = llm.generate([PROMPTS[0]], SamplingParams(**forced), use_tqdm=False)[0]
    assert (out.token_ids, out.text, out.finish_reason) == ([eos], "", "stop")
    out = llm.generate([PROMPTS[0]], SamplingParams(**forced, include_stop_str_in_output=True),
                       use_tqdm=False)[0]
    assert out.text == "<|im_end|>"


def test_validation_errors(llm):
    engine: LLMEngine = llm.engine
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("e", [], greedy())
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request("v", [10**7], greedy())
    with pytest.raises(ContextLengthExceededError, match="256"):
        engine.add_request("c", [5] * 200, greedy(100))
    assert not engine.has_unfinished_requests()


def test_max_tokens_none_runs_to_the_context_length(llm):
    out = llm.generate([[5] * 250], SamplingParams(temperature=0, max_tokens=None,
                                                     ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_async_engine_streams_and_abort_frees_blocks(tiny_llama_dir):
    engine = AsyncEngine(make_llm(tiny_llama_dir).engine)
    engine.start()
    ids = engine.tokenizer.encode(PROMPTS[0])

    async def main():
        deltas = [o async for o in engine.generate("full", ids, greedy(5))]
        assert [o.finished for o in deltas] == [False] * 4 + [True]
        gen = engine.generate("cut", ids, greedy(200))
        await gen.__anext__()
        assert engine.stats().num_running == 1
        await gen.aclose()  # the consumer leaves: the request must be aborted
        for _ in range(100):
            stats = engine.stats()
            if stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"blocks not freed: {engine.stats()}")

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_later_choices_wait_for_the_first_and_share_its_prompt_blocks(tiny_llama_dir):
    engine = make_llm(tiny_llama_dir).engine  # block size 4
    prompt = engine.tokenizer.encode("One prompt, several choices: " * 3)
    engine.add_request("c0", prompt, greedy(5))
    engine.add_request("c1", prompt, greedy(5), after="c0")
    engine.add_request("c2", prompt, greedy(5), after="c0")
    assert [r.request_id for r in engine.scheduler.waiting] == ["c0"]  # the others are held
    tokens, cached = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            cached[out.request_id] = out.num_cached_tokens
    assert tokens["c1"] == tokens["c2"] == tokens["c0"] and len(tokens["c0"]) == 5
    full_blocks = (len(prompt) - 1) // 4 * 4
    assert cached == {"c0": 0, "c1": full_blocks, "c2": full_blocks}


def test_aborting_the_first_choice_releases_the_others(tiny_llama_dir):
    engine = make_llm(tiny_llama_dir).engine
    prompt = engine.tokenizer.encode("abort the first one")
    engine.add_request("a0", prompt, greedy(3))
    engine.add_request("a1", prompt, greedy(3), after="a0")
    engine.abort_request("a0")
    finished = [o.request_id for _ in range(10) for o in engine.step() if o.finished]
    assert finished == ["a1"] and not engine.has_unfinished_requests()


def test_a_stop_string_in_the_last_allowed_token_finishes_with_stop_not_length(llm):
    """The token that reaches max_tokens also completes a stop string: "stop" wins (vLLM's rule;
    ``Scheduler.finish_request(force=True)`` replaces the "length" the scheduler set)."""
    def sample(seed, **kw):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=6, ignore_eos=True, **kw)
        return llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]

    for seed in range(20):  # a seeded draw whose last token's text appears only there
        free = sample(seed)
        last = free.text[len(llm.tokenizer.decode(free.token_ids[:-1])):]
        if last.strip() and last not in free.text[:-len(last)]:
            break
    else:
        pytest.fail("no seed ends on a token text that appears only once")
    out = sample(seed, stop=[last])
    assert free.finish_reason == "length" and out.token_ids == free.token_ids
    assert (out.finish_reason, out.text) == ("stop", free.text[:-len(last)])
