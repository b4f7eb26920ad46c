"""Beam sampling (engine/beam_sampling.py, ``BeamSearch(sampling=...)``) against Hugging Face's
beam-search multinomial sampling (``generate(num_beams=k, do_sample=True)``).

Sampling cannot be compared draw for draw (different random streams), so these tests compare
laws, with chi-square tests whose seeds are fixed (no flakiness: a pass or a fail is final):

- the draw: the frequency of each drawn candidate set, from ``BeamSampling.draw`` and from HF's
  own ``_get_top_k_continuations`` (``torch.multinomial``) on the same flattened scores, against
  the exact law of sampling without replacement (Plackett-Luce, enumerated);
- the warpers: ``BeamSampling.warp`` against HF's warper classes on a whole row, exactly;
- whole searches: the frequency of the returned beams over thousands of seeded ``BeamSearch`` runs
  on the random Markov "model" of test_beam_search.py against as many HF ``generate`` runs
  (one batch, each row an independent search). The cases were chosen so that each of these
  changes fails one: no temperature, raw log-probs accumulated, no top-k, no top-p, no min-p,
  ``min_tokens_to_keep`` 1, ``width`` candidates drawn instead of ``beams_to_keep``, the drawn
  candidates ranked in draw order instead of by score (checked by mutating while writing it).
"""

from __future__ import annotations

import collections
import itertools
import math
import random

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmforge.engine.beam_sampling import BeamSampling
from lmforge.engine.beam_search import MAX_BEAM_LOGPROBS, BeamSearch, BeamSearchParams
from lmforge.engine.request import SamplingParams
from lmforge.errors import InvalidRequestError
from tests.engine.test_beam_search import Markov, MarkovConfig

MIN_P_VALUE = 1e-3  # a chi-square p-value below this fails


def chi_square_p(observed: dict, expected: dict, *, two_sample: bool = False) -> float:
    """p-value of a chi-square test: goodness of fit of counts ``observed`` to the counts
    ``expected`` (same total), or, ``two_sample``, homogeneity of two equal-sized samples.
    Outcomes with fewer than 10 expected (pooled) counts are merged; an observed outcome that
    cannot occur (expected 0) gives 0."""
    if not two_sample and any(expected.get(key, 0) == 0 for key in observed):
        return 0.0
    keys = set(observed) | set(expected)
    cells, rest = [], [0.0, 0.0]
    for key in keys:
        o, e = observed.get(key, 0), expected.get(key, 0)
        if (o + e if two_sample else e) >= 10:
            cells.append((o, e))
        else:
            rest[0] += o
            rest[1] += e
    if sum(rest) > 0:
        cells.append(tuple(rest))
    if two_sample:  # each sample against the pooled frequency
        stat = sum((o - (o + e) / 2) ** 2 / ((o + e) / 2) * 2 for o, e in cells)
    else:
        stat = sum((o - e) ** 2 / e for o, e in cells)
    df = torch.tensor((len(cells) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)))


def exact_set_law(scores: list[float], k: int) -> dict[frozenset[int], float]:
    """P(drawn set) when drawing ``k`` without replacement with probabilities softmax(scores):
    the sum over the set's orders of the sequential draw probabilities."""
    finite = [i for i, s in enumerate(scores) if s > -math.inf]
    weights = {i: math.exp(scores[i]) for i in finite}
    law: dict[frozenset[int], float] = collections.defaultdict(float)
    for order in itertools.permutations(finite, k):
        left, p = sum(weights.values()), 1.0
        for i in order:
            p *= weights[i] / left
            left -= weights[i]
        law[frozenset(order)] += p
    return law


def hf_draws(flat: torch.Tensor, num_beams: int, beams_to_keep: int, n: int
             ) -> collections.Counter:
    """The candidate sets HF's ``_get_top_k_continuations(do_sample=True)`` draws from the
    (num_beams * V,) scores ``flat``, ``n`` times (one batch row each); candidate = beam * V +
    token."""
    vocab = flat.shape[0] // num_beams
    model = Markov(MarkovConfig(vocab_size=vocab), torch.zeros(1, vocab, vocab))
    sequences = torch.arange(num_beams).view(1, num_beams, 1).expand(n, num_beams, 2).clone()
    torch.manual_seed(0)
    _, drawn, _ = model._get_top_k_continuations(
        accumulated_log_probs=flat.expand(n, -1).clone(), running_sequences=sequences,
        running_beam_indices=torch.zeros(n, num_beams, 1, dtype=torch.int32), cur_len=1,
        decoder_prompt_len=1, do_sample=True, beams_to_keep=beams_to_keep,
        num_beams=num_beams, batch_size=n)
    flat_ids = drawn[:, :, 0] * vocab + drawn[:, :, 1]  # (n, beams_to_keep): beam, token
    return collections.Counter(frozenset(row) for row in flat_ids.tolist())


def test_draw_has_the_law_of_hugging_face_multinomial_without_replacement():
    # two beams x four tokens, running scores added, two candidates filtered out (-inf)
    flat = [-0.3, -1.2, -2.0, -math.inf, -1.0, -1.5, -math.inf, -2.5]
    n, k = 20000, 4
    law = exact_set_law(flat, k)
    expected = {s: p * n for s, p in law.items()}
    sampling = BeamSampling(rng=random.Random(0))
    ours = collections.Counter(frozenset(sampling.draw(flat, k)) for _ in range(n))
    hf = hf_draws(torch.tensor(flat), num_beams=2, beams_to_keep=k, n=n)
    assert chi_square_p(hf, expected) > MIN_P_VALUE  # the oracle is HF's law
    assert chi_square_p(ours, expected) > MIN_P_VALUE
    assert chi_square_p(ours, hf, two_sample=True) > MIN_P_VALUE
    assert len(ours) == len(law) == 15  # every set of 4 of the 6 finite candidates occurs
    # the test has power: always the k best (deterministic beam search's choice) is rejected
    greedy = collections.Counter({frozenset(sorted(range(8), key=lambda i: -flat[i])[:k]): n})
    assert chi_square_p(greedy, expected) < MIN_P_VALUE
    assert sampling.draw(flat[:3], k) == [0, 1, 2]  # fewer than k: all (HF pads with nothing)


@pytest.mark.parametrize("temperature, top_k, top_p, min_p, num_stops", [
    (1.0, 50, 1.0, 0.0, 1), (0.7, 5, 1.0, 0.0, 1), (1.3, 0, 0.6, 0.0, 1), (0.5, 8, 0.9, 0.2, 2),
    (1.0, 1, 1.0, 0.0, 3), (2.0, 0, 0.05, 0.0, 1), (0.8, 0, 1.0, 0.5, 2)])
def test_warp_equals_hugging_face_warpers(temperature, top_k, top_p, min_p, num_stops):
    generator = torch.Generator().manual_seed(7)
    row = (torch.randn(1, 40, generator=generator) * 2).log_softmax(-1)
    keep = max(2, num_stops + 1)  # HF _get_logits_processor with num_beams > 1
    warped = row.clone()
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    warpers += [TopKLogitsWarper(top_k, min_tokens_to_keep=keep)] if top_k else []
    warpers += [TopPLogitsWarper(top_p, min_tokens_to_keep=keep)] if top_p < 1.0 else []
    warpers += [MinPLogitsWarper(min_p, min_tokens_to_keep=keep)] if min_p else []
    for warper in warpers:
        warped = warper(None, warped)
    ref = {t: s for t, s in enumerate(warped[0].tolist()) if s > -math.inf}
    sampling = BeamSampling(temperature, top_k, top_p, min_p, num_stops)
    ours = sampling.warp(list(enumerate(row[0].tolist())))
    assert dict(ours) == pytest.approx(ref, rel=1e-5)
    assert [t for t, _ in ours] == sorted(ref, key=lambda t: -ref[t])  # best first
    if top_k and top_k < 40:  # the engine's top list suffices when it holds the top-k
        values, ids = row[0].topk(max(top_k, keep) + 1)
        assert sampling.warp(list(zip(ids.tolist(), values.tolist()))) == ours


def hf_best_beams(model, prompt: list[int], n: int, k: int, max_tokens: int, stops: set[int],
                  length_penalty: float, early_stopping, **warpers) -> collections.Counter:
    """The ``k`` returned beams of ``n`` HF beam-sampling searches, one batch row each."""
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt] * n), attention_mask=torch.ones(n, len(prompt), dtype=torch.long),
            num_beams=k, num_return_sequences=k, do_sample=True, max_new_tokens=max_tokens,
            eos_token_id=sorted(stops),
            pad_token_id=0, length_penalty=length_penalty, early_stopping=early_stopping,
            use_cache=False, return_dict_in_generate=True, output_scores=True, **warpers)
    lengths = (out.beam_indices >= 0).sum(dim=1).tolist()  # -1 pads the unused steps
    beams = [tuple(seq[len(prompt):len(prompt) + length].tolist())
             for seq, length in zip(out.sequences, lengths)]
    return collections.Counter(tuple(beams[i:i + k]) for i in range(0, len(beams), k))


def our_best_beams(table: torch.Tensor, prompt: list[int], n: int, k: int, max_tokens: int,
                   stops: set[int], length_penalty: float, early_stopping, temperature: float = 1.0,
                   top_k: int = 50, top_p: float = 1.0, min_p: float = 0.0
                   ) -> collections.Counter:
    """The ``k`` returned beams of ``n`` ``BeamSearch`` beam-sampling runs (seeds 0..n-1),
    each beam offering its whole next-token distribution, likeliest first."""
    rows: dict[tuple[int, int], list[tuple[int, float]]] = {}

    def top(seq: list[int]) -> list[tuple[int, float]]:
        key = (len(seq) - 1, seq[-1])
        if key not in rows:
            values, ids = table[key].sort(descending=True)
            rows[key] = list(zip(ids.tolist(), values.tolist()))
        return rows[key]

    def finish_reason_of(ids):
        return "stop" if ids[-1] in stops else "length" if len(ids) >= max_tokens else None

    returned: collections.Counter = collections.Counter()
    for seed in range(n):
        sampling = BeamSampling(temperature, top_k, top_p, min_p, len(stops), random.Random(seed))
        search = BeamSearch(k, max_tokens, length_penalty, early_stopping, finish_reason_of,
                            sampling=sampling)
        while not search.done:
            search.step([top(prompt + beam.token_ids) for beam in search.live])
        returned[tuple(tuple(h.token_ids) for h in search.best(k))] += 1
    return returned


# (k, max_tokens, stops, length_penalty, early_stopping, warpers)
LAW_CASES = [
    (2, 3, {0}, 1.0, False, {"temperature": 0.6, "top_k": 3}),
    (2, 4, {0, 1}, 0.5, True, {"temperature": 1.5, "top_k": 0, "top_p": 0.7}),
    (3, 3, {0}, -0.5, "never", {"temperature": 1.0}),  # explicit 1.0 samples too
    (2, 3, {0, 1}, 1.0, False, {"temperature": 1.3, "top_p": 0.5}),  # min_tokens_to_keep = 3
    (2, 3, {0}, 1.0, False, {"temperature": 0.8, "top_k": 0, "min_p": 0.3}),
]


@pytest.mark.parametrize("k, max_tokens, stops, length_penalty, early_stopping, warpers",
                         LAW_CASES)
def test_beam_sampling_law_equals_hugging_face_generate(k, max_tokens, stops, length_penalty,
                                                        early_stopping, warpers):
    vocab, n, prompt = 12, 4000, [3]
    table = torch.randn(8, vocab, vocab, generator=torch.Generator().manual_seed(1)
                        ).log_softmax(-1)
    model = Markov(MarkovConfig(vocab_size=vocab), table).eval()
    args = (prompt, n, k, max_tokens, stops, length_penalty, early_stopping)
    hf = hf_best_beams(model, *args, **warpers)
    ours = our_best_beams(table, *args, **warpers)
    assert len(hf) > 3  # the searches do vary
    assert chi_square_p(ours, hf, two_sample=True) > MIN_P_VALUE, (hf.most_common(5),
                                                                  ours.most_common(5))


def test_step_requests_may_ask_for_more_logprobs_than_users():
    assert BeamSearchParams(beam_width=4).num_logprobs(1) == 8  # deterministic: 2 width
    sampled = BeamSearchParams(beam_width=4, do_sample=True)
    assert sampled.top_k == 50 and sampled.num_logprobs(1) == 50  # HF's default top_k
    assert BeamSearchParams(beam_width=4, do_sample=True, top_k=3).num_logprobs(1) == 8
    assert BeamSearchParams(beam_width=2, do_sample=True, top_k=1).num_logprobs(6) == 8
    for top_k in (0, -1, 100):  # no top-k, or a larger one: each beam's 64 likeliest
        assert BeamSearchParams(beam_width=2, do_sample=True, top_k=top_k).num_logprobs(1) == 64
    assert sampled.step_params(MAX_BEAM_LOGPROBS).logprobs == 64
    for too_many in (lambda: sampled.step_params(65), lambda: SamplingParams(logprobs=21)):
        with pytest.raises(InvalidRequestError) as e:
            too_many()
        assert e.value.param == "logprobs"
    with pytest.raises(InvalidRequestError) as e:
        BeamSearchParams(beam_width=2, do_sample=True, temperature=0.0)
    assert e.value.param == "temperature"
    with pytest.raises(InvalidRequestError) as e:
        BeamSearchParams(beam_width=2, top_p=1.5)  # ranges are checked in both modes
    assert e.value.param == "top_p"
