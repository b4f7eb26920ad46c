"""Beam search (engine/beam_search.py) against Hugging Face ``generate(num_beams=...)``.

Two golden tests:

- on the tiny Llama (fp32) through the real engine: our ``n`` best beams equal HF's token for
  token, with equal scores. The random model never emits eos, so an extra stop token taken
  from HF's own beams (HF ``eos_token_id=[eos, X]``, ours ``stop_token_ids=[X]``) finishes
  hypotheses of different lengths that compete under the length penalty;
- the bookkeeping (``BeamSearch``) on a random Markov "model" whose next-token distribution
  depends on the position and the last token: its near-uniform-free, peaked distributions make
  HF's rules decide (only the best ``width`` finished candidates count, the early-stop
  heuristic, ``early_stopping`` True / False / "never", the length penalty's length). The chosen
  cases fail if any of those rules is changed (checked by mutating the module while writing it).
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from lmforge.config import CacheConfig, EngineConfig, ModelConfig
from lmforge.engine.async_engine import AsyncEngine
from lmforge.engine.beam_search import (
    BeamSearch,
    BeamSearchParams,
    Hypothesis,
    beam_search,
)
from lmforge.errors import ContextLengthExceededError, InvalidRequestError

PROMPTS = ["The sky is", "def f(x):"]
# (num_beams, num_return_sequences, length_penalty, early_stopping)
SETTINGS = [(4, 2, 1.0, False), (3, 3, 2.0, True), (5, 2, -0.5, "never")]
EOS = 2


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    engine = AsyncEngine.from_config(EngineConfig(
        model=ModelConfig(model=str(tiny_llama_dir), dtype="float32"),
        cache=CacheConfig(block_size=4, num_blocks=256)))
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def hf_beams(model, prompt: list[int], k: int, n: int, length_penalty: float,
             early_stopping, max_new_tokens: int, eos: list[int], use_cache: bool = True,
             **warpers) -> list[tuple[list[int], float]]:
    """HF's n best beams (``do_sample=False``, ``warpers`` then ignored): (generated tokens up
    to and with the stop token, score)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            num_beams=k, num_return_sequences=n, do_sample=False, max_new_tokens=max_new_tokens,
            length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos,
            pad_token_id=0, use_cache=use_cache, return_dict_in_generate=True,
            output_scores=True, **warpers)
    lengths = (out.beam_indices >= 0).sum(dim=1).tolist()  # -1 pads the unused steps
    return [(seq[len(prompt):len(prompt) + length].tolist(), float(score))
            for seq, length, score in zip(out.sequences, lengths, out.sequences_scores)]


def run_beam_search(engine, prompt, n=1, **kwargs):
    return asyncio.run(beam_search(engine, "beam", prompt, BeamSearchParams(**kwargs), n))


def stop_token_choices(hf_model, prompt: list[int]) -> list[int | None]:
    """No extra stop token; the first token HF's beams generate (most hypotheses finish at
    once); the last new token they reach (a few finish late)."""
    seen: list[int] = []
    for tokens, _ in hf_beams(hf_model, prompt, 4, 4, 1.0, False, 10, [EOS]):
        seen += [t for t in tokens if t not in seen]
    return [None, seen[0], seen[-1]]


@pytest.mark.parametrize("text", PROMPTS)
def test_best_beams_equal_hugging_face(engine, hf_model, text):
    prompt = engine.tokenizer.encode(text)
    cases = 0
    for extra in stop_token_choices(hf_model, prompt):
        for k, n, lp, es in SETTINGS:
            ref = hf_beams(hf_model, prompt, k, n, lp, es, 10,
                           [EOS] if extra is None else [EOS, extra])
            out = run_beam_search(engine, prompt, n, beam_width=k, max_tokens=10,
                                  length_penalty=lp, early_stopping=es,
                                  stop_token_ids=[] if extra is None else [extra])
            setting = (text, extra, k, n, lp, es)
            assert [s.token_ids for s in out.sequences] == [t for t, _ in ref], setting
            assert [s.score for s in out.sequences] == pytest.approx(
                [score for _, score in ref], abs=1e-4), setting
            for s in out.sequences:
                finished = s.token_ids[-1] in (EOS, extra)
                assert s.finish_reason == ("stop" if finished else "length"), setting
                assert finished or len(s.token_ids) == 10
            cases += 1
    assert cases == 9


def test_stop_tokens_make_hypotheses_of_different_lengths_compete(engine, hf_model):
    """The golden test is not vacuous: with a stop token, the returned beams of one search
    have different lengths and finish reasons (and still equal HF's)."""
    prompt = engine.tokenizer.encode(PROMPTS[0])
    extra = stop_token_choices(hf_model, prompt)[1]
    out = run_beam_search(engine, prompt, 4, beam_width=4, max_tokens=10,
                          stop_token_ids=[extra], length_penalty=0.5)
    assert {s.finish_reason for s in out.sequences} == {"stop", "length"}
    assert len({len(s.token_ids) for s in out.sequences}) == 4
    ref = hf_beams(hf_model, prompt, 4, 4, 0.5, False, 10, [EOS, extra])
    assert [s.token_ids for s in out.sequences] == [t for t, _ in ref]


def test_sampling_fields_are_ignored_without_do_sample_as_by_hugging_face(engine, hf_model):
    """``do_sample=False``: HF ignores its warpers, and so do we: still HF's beams, token for
    token (top_k 2 < width 4 would leave two beams after the first step if it were applied)."""
    prompt = engine.tokenizer.encode(PROMPTS[1])
    warpers = {"temperature": 0.7, "top_k": 2, "top_p": 0.5, "min_p": 0.2}
    ref = hf_beams(hf_model, prompt, 4, 3, 1.0, False, 8, [EOS], **warpers)
    out = run_beam_search(engine, prompt, 3, beam_width=4, max_tokens=8, seed=5, **warpers)
    assert [s.token_ids for s in out.sequences] == [t for t, _ in ref]
    assert [s.score for s in out.sequences] == pytest.approx([sc for _, sc in ref], abs=1e-4)


def sample_beams(engine, prompt, seed, n=2, **kwargs) -> list[list[int]]:
    params = {"beam_width": 4, "max_tokens": 6, "do_sample": True, "temperature": 0.7,
              "top_k": 40}
    out = run_beam_search(engine, prompt, n, seed=seed, **{**params, **kwargs})
    return [s.token_ids for s in out.sequences]


def test_beam_sampling_is_reproducible_with_a_seed_and_varies_without(engine):
    prompt = engine.tokenizer.encode(PROMPTS[0])
    first = sample_beams(engine, prompt, seed=1)
    assert sample_beams(engine, prompt, seed=1) == first
    other_seeds = [sample_beams(engine, prompt, seed=s) for s in (2, 3, 4)]
    assert any(beams != first for beams in other_seeds)
    unseeded = [sample_beams(engine, prompt, seed=None) for _ in range(3)]
    assert any(beams != unseeded[0] for beams in unseeded[1:])
    deterministic = run_beam_search(engine, prompt, 2, beam_width=4, max_tokens=6)
    assert first != [s.token_ids for s in deterministic.sequences]


def test_beam_sampling_draws_within_top_k_and_scores_with_warped_logprobs(engine, monkeypatch):
    prompt = engine.tokenizer.encode(PROMPTS[1])
    asked: list[int] = []
    generate = engine.generate

    def spy(request_id, prompt, params, **kwargs):
        asked.append(params.logprobs)
        return generate(request_id, prompt, params, **kwargs)

    monkeypatch.setattr(engine, "generate", spy)
    out = run_beam_search(engine, prompt, 3, beam_width=3, max_tokens=5, do_sample=True,
                          temperature=0.5, top_k=4, logprobs=20, seed=0)
    for s in out.sequences:
        assert all(e.token_id in [t for t, _ in e.top[:4]] for e in s.logprobs)  # top_k 4
        # the reported logprobs are raw; the beam's score sums them divided by the temperature
        assert s.cumulative_logprob == pytest.approx(sum(e.logprob for e in s.logprobs) / 0.5)
    run_beam_search(engine, prompt, beam_width=2, max_tokens=2, do_sample=True, seed=0)
    assert asked[0] == 20 and asked[-1] == 50  # HF's default top_k 50: more than users get


class MarkovConfig(PretrainedConfig):
    model_type = "markov"

    def __init__(self, vocab_size: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size


class Markov(PreTrainedModel, GenerationMixin):
    """logits[t] = table[t, input_ids[t]]: a pure function of the position and the last token
    (so permutations of a sequence score differently and exact ties do not happen)."""

    config_class = MarkovConfig

    def __init__(self, config: MarkovConfig, table: torch.Tensor):
        super().__init__(config)
        self.table = torch.nn.Parameter(table, requires_grad=False)  # (positions, V, V)

    def forward(self, input_ids=None, **kwargs):
        positions = torch.arange(input_ids.shape[1])
        return CausalLMOutputWithPast(logits=self.table[positions, input_ids])


def markov_beams(table: torch.Tensor, prompt: list[int], k: int, n: int, length_penalty: float,
                 early_stopping, max_tokens: int, stops: set[int]) -> list[list[int]]:
    """``BeamSearch`` fed with each beam's top ``max(2k, k + stops)`` tokens, as
    ``beam_search`` asks the engine for."""
    num_top = max(2 * k, k + len(stops))

    def finish_reason_of(ids):
        if ids[-1] in stops:
            return "stop"
        return "length" if len(ids) >= max_tokens else None

    search = BeamSearch(k, max_tokens, length_penalty, early_stopping, finish_reason_of)
    while not search.done:
        tops = []
        for beam in search.live:
            seq = prompt + beam.token_ids
            values, ids = table[len(seq) - 1, seq[-1]].topk(num_top)
            tops.append(list(zip(ids.tolist(), values.tolist())))
        search.step(tops)
    return [h.token_ids for h in search.best(n)]


def test_bookkeeping_equals_hugging_face_on_a_markov_model():
    vocab, compared = 10, 0
    for seed in range(24):
        generator = torch.Generator().manual_seed(seed)
        scale = (1.0, 3.0, 6.0)[seed % 3]  # from flat to peaked next-token distributions
        table = (torch.randn(20, vocab, vocab, generator=generator) * scale).log_softmax(-1)
        model = Markov(MarkovConfig(vocab_size=vocab), table).eval()
        rnd = random.Random(seed)
        for _ in range(6):
            k = rnd.choice([2, 3, 4])
            n = rnd.randint(1, k)
            lp = rnd.choice([-1.0, 0.0, 0.5, 1.0, 2.0])
            es = rnd.choice([True, False, "never"])
            m = rnd.choice([4, 6, 9])
            stops = rnd.choice([{0}, {0, 1}])
            prompt = [rnd.randrange(2, vocab)]
            ref = [t for t, _ in hf_beams(model, prompt, k, n, lp, es, m, sorted(stops),
                                          use_cache=False)]
            assert markov_beams(table, prompt, k, n, lp, es, m, stops) == ref, (
                seed, prompt, k, n, lp, es, m, stops)
            compared += 1
    assert compared == 144


def test_step_ranks_ties_by_beam_then_token_and_keeps_only_top_width_finished():
    search = BeamSearch(2, max_tokens=5,
                        finish_reason_of=lambda ids: "stop" if ids[-1] == 0 else None)
    search.step([[(7, -1.0), (5, -1.0), (0, -3.0), (4, -4.0)]])
    assert [b.token_ids for b in search.live] == [[5], [7]]  # equal logprobs: lower id first
    assert search.hypotheses == []  # the stop token ranked third of two
    search.step([[(0, -0.5), (3, -2.0)], [(0, -0.1), (6, -0.2)]])
    # candidates: [7,0] -1.1, [7,6] -1.2, [5,0] -1.5, ...; [5,0] ranks third: not kept
    assert [h.token_ids for h in search.hypotheses] == [[7, 0]]
    assert search.hypotheses[0].score == pytest.approx(-1.1 / 2)  # 2 generated tokens
    assert [b.token_ids for b in search.live] == [[7, 6], [5, 3]]


def test_best_fills_up_with_live_beams_when_too_few_finished():
    search = BeamSearch(3, max_tokens=9)
    search.step([[(1, -0.5), (2, -1.0), (3, -2.0)]])
    best = search.best(2)
    assert [(h.token_ids, h.finish_reason) for h in best] == [([1], "length"), ([2], "length")]
    assert isinstance(best[0], Hypothesis)
    with pytest.raises(ValueError, match="one top list per live beam"):
        search.step([[(1, -0.1)]])


def test_logprobs_follow_each_beam_and_sum_to_its_cumulative_logprob(engine):
    prompt = engine.tokenizer.encode(PROMPTS[1])
    out = run_beam_search(engine, prompt, 3, beam_width=3, max_tokens=6, logprobs=2,
                          prompt_logprobs=1)
    for s in out.sequences:
        assert [e.token_id for e in s.logprobs] == s.token_ids
        assert sum(e.logprob for e in s.logprobs) == pytest.approx(s.cumulative_logprob)
        assert all(len(e.top) == 2 and e.top[0][1] >= e.top[1][1] for e in s.logprobs)
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    assert out.num_prompt_tokens == len(prompt)
    without = run_beam_search(engine, prompt, 3, beam_width=3, max_tokens=6)
    assert [s.token_ids for s in without.sequences] == [s.token_ids for s in out.sequences]
    assert all(s.logprobs is None for s in without.sequences)


def test_stop_string_finishes_a_beam_and_is_cut_from_its_text(engine):
    prompt = engine.tokenizer.encode(PROMPTS[0])
    free = run_beam_search(engine, prompt, 1, beam_width=2, max_tokens=8)
    best = free.sequences[0]
    stop = engine.tokenizer.decode(best.token_ids[2:4])  # the text of its 3rd and 4th tokens
    assert stop and stop in best.text
    # length_penalty 0: a score is the summed logprob, so the shorter stopped beam wins
    out = run_beam_search(engine, prompt, 2, beam_width=2, max_tokens=8, stop=[stop],
                          length_penalty=0.0)
    stopped = [s for s in out.sequences if s.finish_reason == "stop"]
    assert stopped and all(stop not in s.text for s in out.sequences)
    assert stopped[0].text == best.text[:best.text.index(stop)]
    kept = run_beam_search(engine, prompt, 2, beam_width=2, max_tokens=8, stop=[stop],
                           length_penalty=0.0, include_stop_str_in_output=True)
    assert [s.text for s in kept.sequences if s.finish_reason == "stop"][0].endswith(stop)


def test_eos_finishes_beams_unless_ignore_eos_and_width_one_works(engine, monkeypatch):
    prompt = engine.tokenizer.encode(PROMPTS[0])
    first = run_beam_search(engine, prompt, beam_width=3, max_tokens=4).sequences[0].token_ids[0]
    # the random model never samples the real eos: make its favourite first token one
    monkeypatch.setattr(engine.tokenizer, "eos_token_ids", frozenset({EOS, first}))
    out = run_beam_search(engine, prompt, beam_width=3, max_tokens=4, length_penalty=0.0)
    assert out.sequences[0].token_ids == [first] and out.sequences[0].finish_reason == "stop"
    ignored = run_beam_search(engine, prompt, 3, beam_width=3, max_tokens=4, ignore_eos=True,
                              length_penalty=0.0)
    assert all(len(s.token_ids) == 4 for s in ignored.sequences)
    narrow = run_beam_search(engine, prompt, beam_width=1, max_tokens=4, ignore_eos=True)
    assert len(narrow.sequences) == 1 and len(narrow.sequences[0].token_ids) == 4


def wait_idle(engine, deadline_s: float = 5.0):
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        stats = engine.stats()
        if (stats.num_running, stats.num_waiting) == (0, 0) and \
                stats.num_free_blocks == stats.num_total_blocks:
            return
        time.sleep(0.01)
    pytest.fail(f"engine not idle within {deadline_s} s: {engine.stats()}")


def test_cancelling_a_search_aborts_its_requests(engine):
    prompt = engine.tokenizer.encode(PROMPTS[0])

    async def cancel_midway():
        task = asyncio.ensure_future(beam_search(engine, "cancelled", prompt, BeamSearchParams(
            beam_width=4, max_tokens=400, early_stopping="never", ignore_eos=True)))
        await asyncio.sleep(0.2)
        assert not task.done()  # 400 steps of 4 beams take seconds
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    wait_idle(engine)
    time.sleep(0.1)
    assert engine.stats().num_running + engine.stats().num_waiting == 0  # no step follows


def test_invalid_parameters_raise_naming_them(engine):
    prompt = engine.tokenizer.encode(PROMPTS[0])
    for kwargs, param in [({"beam_width": 11}, "num_beams"), ({"beam_width": 0}, "num_beams"),
                          ({"beam_width": 2, "length_penalty": float("nan")}, "length_penalty"),
                          ({"beam_width": 2, "early_stopping": "sometimes"}, "early_stopping"),
                          ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
                          ({"beam_width": 2, "logprobs": 21}, "logprobs")]:
        with pytest.raises(InvalidRequestError) as e:
            BeamSearchParams(**kwargs)
        assert e.value.param == param
    with pytest.raises(InvalidRequestError) as e:
        run_beam_search(engine, prompt, 3, beam_width=2)
    assert e.value.param == "n"
    with pytest.raises(ContextLengthExceededError):
        run_beam_search(engine, prompt, beam_width=2, max_tokens=600)


def test_a_search_admitted_once_is_never_refused_halfway(engine, monkeypatch):
    # At most one waiting request: each step of 3 beams sends 3 requests at once, which the
    # limit would refuse if the steps after the first were admitted like new requests.
    monkeypatch.setattr(engine.engine.config.scheduler, "max_waiting_requests", 1)
    prompt = engine.tokenizer.encode(PROMPTS[0])
    before = engine.counters.prompt_tokens
    out = run_beam_search(engine, prompt, n=3, beam_width=3, max_tokens=5, ignore_eos=True)
    assert [len(s.token_ids) for s in out.sequences] == [5, 5, 5]
    assert engine.counters.prompt_tokens == before + len(prompt)  # counted once, as one request
