"""Sampler tests on hand-made requests and synthetic logits; no model is loaded.

Distribution checks repeat one row thousands of times in a single batched call and compare the
counts with a naive oracle (softmax, nucleus, min-p set). The sampler's own generator is seeded, so
every test is deterministic.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.engine.request import Request, SamplingParams
from lmforge.engine.penalties import apply_penalties
from lmforge.engine.sampler import TOP_P_CANDIDATES, Sampler, apply_top_k_top_p, exponential_race

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]
# Chi-square critical values at p = 0.001, by degrees of freedom.
CHI2_999 = {0: 0.0, 1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32,
            8: 26.12, 9: 27.88}


def req(prompt=(), output=(), rid="r", **params) -> Request:
    request = Request(rid, list(prompt), SamplingParams(**params))
    for token in output:
        request.append_output_token(token)
    return request


def draw(probs: list[float], n: int, device="cpu", seed=0, **params) -> torch.Tensor:
    """Counts (V,) of n draws from one row of logits log(probs), repeated n times in one batch."""
    logits = torch.tensor(probs).log().repeat(n, 1).to(device)
    requests = [req(**params) for _ in range(n)]
    tokens = Sampler(len(probs), device, seed=seed).sample(logits, requests)
    return torch.bincount(torch.tensor(tokens), minlength=len(probs))


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs / probs.sum() * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def nucleus(probs: list[float], top_p: float) -> set[int]:
    """Naive top-p oracle: the smallest set of most likely tokens with mass >= top_p."""
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    kept, mass = set(), 0.0
    for t in order:
        kept.add(t)
        mass += probs[t]
        if mass >= top_p:
            break
    return kept


# Probabilities shuffled over the ids so "most likely" never coincides with "lowest id".
PROBS = [0.05, 0.3, 0.02, 0.1, 0.2, 0.01, 0.15, 0.06, 0.08, 0.03]


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_and_ignores_other_rows(device):
    torch.manual_seed(0)
    logits = torch.randn(6, 300, device=device) * 4
    settings = [dict(temperature=0.0), dict(temperature=1.0, top_k=3),
                dict(temperature=0.0, top_p=0.1), dict(temperature=0.7, min_p=0.2, seed=1),
                dict(temperature=0.0), dict(temperature=1.5, repetition_penalty=2.0,
                                            presence_penalty=1.0, output=[int(logits[5].argmax())])]
    before = logits.clone()
    tokens = Sampler(300, device).sample(logits, [req(**s) for s in settings])
    argmax = logits.argmax(dim=-1).tolist()
    assert [tokens[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]
    assert torch.equal(logits, before)  # the caller's logits are not modified
    all_greedy = Sampler(300, device).sample(logits, [req(temperature=0.0) for _ in range(6)])
    assert all_greedy == argmax


def test_padded_vocab_columns_are_never_sampled():
    logits = torch.zeros(64, 40)
    logits[:, 32:] = 100.0  # embedding padding beyond the tokenizer's 32 ids
    requests = [req(temperature=0.0 if i % 2 else 1.0) for i in range(64)]
    assert max(Sampler(32).sample(logits, requests)) < 32


def test_top_k_1_equals_greedy():
    torch.manual_seed(1)
    logits = torch.randn(32, 500)
    tokens = Sampler(500).sample(logits, [req(temperature=1.3, top_k=1) for _ in range(32)])
    assert tokens == logits.argmax(dim=-1).tolist()


def test_top_k_keeps_exactly_the_k_best():
    counts = draw(PROBS, 3000, top_k=4)
    assert set(counts.nonzero().flatten().tolist()) == {1, 4, 6, 3}


def test_per_row_top_k_in_a_mixed_batch():
    """Rows with top-k off must not be filtered by the batch's largest k (and vice versa)."""
    n = 2000
    logits = torch.tensor(PROBS).log().repeat(2 * n, 1)
    requests = [req(top_k=2 if i % 2 else 0) for i in range(2 * n)]
    tokens = torch.tensor(Sampler(10).sample(logits, requests))
    assert set(tokens[1::2].tolist()) == {1, 4}
    assert set(tokens[0::2].tolist()) == set(range(10))


def test_small_top_p_keeps_only_the_top_token():
    torch.manual_seed(2)
    logits = torch.randn(64, 1000)
    # 1 - 1e-9 rounds to 1.0 in float32: the top token must survive by rule, not by rounding.
    requests = [req(top_p=1e-3 if i % 2 else 1e-9) for i in range(64)]
    tokens = Sampler(1000).sample(logits, requests)
    assert tokens == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("top_p", [0.45, 0.6, 0.72, 0.9])
def test_top_p_samples_exactly_the_nucleus_renormalized(top_p):
    counts = draw(PROBS, 4000, top_p=top_p)
    kept = nucleus(PROBS, top_p)
    assert set(counts.nonzero().flatten().tolist()) == kept
    renormalized = torch.tensor([p if t in kept else 0.0 for t, p in enumerate(PROBS)])
    assert chi2(counts, renormalized) < CHI2_999[len(kept) - 1] + 1e-6


def naive_top_k_top_p(row: torch.Tensor, k: int, p: float) -> set[int]:
    """Oracle: ids kept by HF TopK (ties kept) then TopP over the renormalized survivors."""
    probs = row.double().softmax(-1)
    if k:
        probs = torch.where(row >= row.topk(k).values[-1], probs, 0.0)
    probs = (probs / probs.sum()).tolist()
    return nucleus(probs, p) if p < 1.0 else {t for t, q in enumerate(probs) if q > 0}


def test_top_k_top_p_matches_naive_oracle_on_long_rows():
    """Peaked rows find their nucleus among the candidates; flat rows need the full sort."""
    vocab = 4 * TOP_P_CANDIDATES
    gen = torch.Generator().manual_seed(3)
    scales = [6.0, 0.05, 3.0, 0.3, 6.0, 0.05, 1.0, 0.3]
    settings = [(0, 0.9), (0, 0.9), (20, 0.5), (0, 1.0), (700, 0.95), (300, 0.99), (5, 1.0),
                (0, 0.3)]
    logits = torch.randn(len(scales), vocab, generator=gen) * torch.tensor(scales).unsqueeze(1)
    out = apply_top_k_top_p(logits.softmax(-1), torch.tensor([k or vocab for k, _ in settings]),
                            torch.tensor([p for _, p in settings]))
    for row, (k, p) in enumerate(settings):
        kept = set((out[row] > 0).nonzero().flatten().tolist())
        assert kept == naive_top_k_top_p(logits[row], k, p), (row, k, p)
    assert len(naive_top_k_top_p(logits[0], 0, 0.9)) < TOP_P_CANDIDATES  # candidates suffice
    assert len(naive_top_k_top_p(logits[1], 0, 0.9)) > TOP_P_CANDIDATES  # full sort needed


def test_top_k_is_applied_before_top_p():
    # top-k 3 leaves {1: .3, 4: .2, 6: .15}; renormalized, .3 + .2 = .77 >= .75 drops token 6.
    # (top-p first would keep {1, 4, 6} since .3 + .2 = .5 < .75.)
    counts = draw(PROBS, 3000, top_k=3, top_p=0.75)
    assert set(counts.nonzero().flatten().tolist()) == {1, 4}


def test_min_p_drops_tokens_below_fraction_of_max():
    counts = draw(PROBS, 4000, min_p=0.3)  # threshold 0.09: keeps .3, .2, .15, .1
    assert set(counts.nonzero().flatten().tolist()) == {1, 4, 6, 3}
    kept = torch.tensor([p if p >= 0.09 else 0.0 for p in PROBS])
    assert chi2(counts, kept) < CHI2_999[3]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_empirical_distribution_matches_softmax(device, temperature):
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, 1.5, -1.0, 0.7, 0.3, -0.2])
    counts = draw(logits.softmax(-1).tolist(), 6000, device, temperature=temperature).cpu()
    expected = (logits / temperature).softmax(-1)
    assert chi2(counts, expected) < CHI2_999[9]
    if temperature != 1.0:  # the check is sharp enough to notice a missing temperature
        assert chi2(counts, logits.softmax(-1)) > CHI2_999[9]


def test_penalty_arithmetic_matches_formula():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5, -2.0, 1.0],
                           [2.0, -1.0, 3.0, 0.5, -2.0, 1.0]])
    out = apply_penalties(logits, prompt_ids=[[0, 1, 0, 3], [0]], output_ids=[[3, 3, 4, 99], []],
                          repetition=torch.tensor([1.5, 1.0]),
                          frequency=torch.tensor([0.5, 0.0]), presence=torch.tensor([0.25, 0.0]))
    expected_row0 = [2.0 / 1.5,  # prompt token (twice), positive: divided once
                     -1.0 * 1.5,  # prompt token, negative: multiplied
                     3.0,  # never seen
                     0.5 / 1.5 - 0.5 * 2 - 0.25,  # in prompt and output (twice): one division
                     -2.0 * 1.5 - 0.5 * 1 - 0.25,  # output once
                     1.0]  # id 99 is outside the vocabulary and ignored
    assert out[0].tolist() == pytest.approx(expected_row0, rel=1e-6)
    assert torch.equal(out[1], logits[1])  # neutral parameters change nothing


def test_penalties_match_naive_oracle_on_random_batches():
    gen = torch.Generator().manual_seed(4)
    batch, vocab = 6, 40
    logits = torch.randn(batch, vocab, generator=gen) * 3
    prompts = [torch.randint(vocab, (n,), generator=gen).tolist() for n in (0, 5, 30, 7, 1, 12)]
    outputs = [torch.randint(vocab, (n,), generator=gen).tolist() for n in (9, 0, 25, 3, 40, 6)]
    rep, freq, pres = torch.rand(3, batch, generator=gen) * torch.tensor([[2.0], [4.0], [4.0]])
    rep, freq, pres = rep + 0.5, freq - 2.0, pres - 2.0
    out = apply_penalties(logits, prompts, outputs, rep, freq, pres)
    for b in range(batch):
        for t in range(vocab):
            c = outputs[b].count(t)
            l = logits[b, t].item()
            if t in prompts[b] + outputs[b]:
                l = l / rep[b].item() if l > 0 else l * rep[b].item()
            expected = l - freq[b].item() * c - pres[b].item() * (c > 0)
            assert out[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-5), (b, t)


def test_presence_and_frequency_penalties_flip_the_argmax():
    logits = torch.tensor([[1.0, 0.9, 0.0]]).repeat(4, 1)
    requests = [req(temperature=0.0, output=[0], presence_penalty=0.2),
                req(temperature=0.0, output=[0, 0], frequency_penalty=0.06),  # 1 - .12 < .9
                req(temperature=0.0, output=[0], frequency_penalty=0.06),  # 1 - .06 > .9
                req(temperature=0.0, output=[1], presence_penalty=-0.2)]  # negative: encourages
    assert Sampler(3).sample(logits, requests) == [1, 1, 0, 1]


def test_repetition_penalty_covers_prompt_but_presence_does_not():
    logits = torch.tensor([[2.0, 1.8, -1.0, -1.1]]).repeat(4, 1)
    requests = [req(temperature=0.0, prompt=[0], repetition_penalty=1.2),  # 2 / 1.2 < 1.8
                req(temperature=0.0, prompt=[0], presence_penalty=2.0, frequency_penalty=2.0),
                req(temperature=0.0, prompt=[0, 1, 2], repetition_penalty=1.2),  # 1.67 > 1.5
                req(temperature=0.0, prompt=[0, 1], output=[2], repetition_penalty=1.2)]
    assert Sampler(4).sample(logits, requests) == [1, 0, 0, 0]
    # Negative logits are multiplied: -1.0 * 1.2 = -1.2 < -1.1, so token 3 overtakes token 2.
    negative = torch.tensor([[-1.0, -1.1]])
    assert Sampler(2).sample(negative, [req(temperature=0.0, prompt=[0],
                                            repetition_penalty=1.2)]) == [1]


def run_seeded(seed: int, batch_size: int, row: int, steps: int = 20) -> list[int]:
    """Tokens of one seeded request decoded for ``steps`` steps inside a given batch layout."""
    vocab = 1000
    target = req(prompt=[1, 2, 3], rid="target", seed=seed, temperature=0.9, top_p=0.95,
                 repetition_penalty=1.1)
    others = [req(rid=f"o{i}", temperature=1.0 + 0.1 * (i % 3), top_k=50 * (i % 2),
                  seed=(1000 + i) if i % 3 == 0 else None, min_p=0.05 * (i % 2))
              for i in range(batch_size - 1)]
    batch = others[:row] + [target] + others[row:]
    sampler = Sampler(vocab, seed=batch_size * 7 + row)  # unseeded rows differ per layout
    noise = torch.Generator().manual_seed(batch_size)
    for step in range(steps):
        logits = torch.randn(batch_size, vocab, generator=noise) * 3
        logits[row] = torch.randn(vocab, generator=torch.Generator().manual_seed(step)) * 2
        for request, token in zip(batch, sampler.sample(logits, batch)):
            request.append_output_token(token)
    return target.output_token_ids


def test_seeded_request_is_independent_of_batch_and_row():
    alone = run_seeded(seed=123, batch_size=1, row=0)
    assert run_seeded(seed=123, batch_size=5, row=3) == alone
    assert run_seeded(seed=123, batch_size=9, row=0) == alone
    assert run_seeded(seed=123, batch_size=16, row=15) == alone
    assert run_seeded(seed=124, batch_size=1, row=0) != alone
    assert len(set(alone)) > 5  # it really sampled, not a constant argmax


def test_rejects_wrong_shapes():
    sampler = Sampler(10)
    with pytest.raises(ValueError, match="num_requests"):
        sampler.sample(torch.zeros(2, 10), [req()])
    with pytest.raises(ValueError, match="vocab_size"):
        sampler.sample(torch.zeros(1, 8), [req()])


def test_tiny_temperature_is_greedy_instead_of_overflowing():
    # 2e38 / 1e-7 overflows float32 to inf and softmax would turn the row into NaNs.
    logits = torch.tensor([[1e38, 2e38, -1e38]])
    assert Sampler(3).sample(logits, [req(temperature=1e-7)]) == [1]


def test_out_of_range_seeds_wrap_instead_of_failing_the_step():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(5))
    first = Sampler(50).sample(logits, [req(seed=2**70), req(seed=-3)])
    again = Sampler(50, seed=9).sample(logits, [req(seed=2**70), req(seed=-3)])
    assert first == again


@pytest.mark.parametrize("draw_value", [0.0, 1.0 - 2**-24])
def test_extreme_uniform_draws_never_pick_a_zero_probability_token(monkeypatch, draw_value):
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, *a, **k: self.fill_(draw_value))
    probs = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.3, 0.0, 0.7]])
    tokens = exponential_race(probs, {}, torch.Generator()).tolist()
    assert tokens[0] == 2 and tokens[1] in (1, 3)
