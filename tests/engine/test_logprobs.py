"""Logprobs, prompt logprobs and logit_bias through the whole engine, checked against Hugging Face
``transformers`` on the same tiny random Llama."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.engine.request import SamplingParams
from lmforge.errors import InvalidRequestError
from tests.engine.test_llm_engine import make_llm

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir)


@pytest.fixture(scope="module")
def hf_logprobs(tiny_llama_dir):
    """ids (L,) -> (L, V) float64 log-softmax of HF's logits at every position."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return run


def greedy(n=8, **kw):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def test_generated_logprobs_match_transformers(llm, hf_logprobs):
    out = llm.generate([PROMPT], greedy(logprobs=3), use_tqdm=False)[0]
    assert len(out.logprobs) == len(out.token_ids) == 8
    ref = hf_logprobs(out.prompt_token_ids + out.token_ids)[len(out.prompt_token_ids) - 1:-1]
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(float(ref[i, token]), abs=1e-4)
        assert len(entry.top) == 3
        assert entry.top[0] == (token, pytest.approx(entry.logprob))  # greedy = the likeliest
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        expected = ref[i].topk(3)
        assert [t for t, _ in entry.top] == expected.indices.tolist()


def test_logprobs_zero_gives_the_sampled_token_only_and_none_when_not_asked(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=4, logprobs=0, seed=3),
                       use_tqdm=False)[0]
    assert [e.top for e in out.logprobs] == [[]] * 4
    assert all(math.isfinite(e.logprob) and e.logprob <= 0 for e in out.logprobs)
    assert llm.generate([PROMPT], greedy(2), use_tqdm=False)[0].logprobs is None


@pytest.mark.parametrize("budget", [512, 5])  # whole prompt in one step, or chunks of 5
def test_prompt_logprobs_match_transformers(tiny_llama_dir, hf_logprobs, budget):
    llm = make_llm(tiny_llama_dir, budget=budget, max_seqs=4)
    llm.generate([PROMPT], greedy(2), use_tqdm=False)  # the prompt's blocks are now cached
    out = llm.generate([PROMPT], greedy(2, prompt_logprobs=2), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    assert out.num_cached_tokens == 0  # prompt logprobs need every position computed
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    ref = hf_logprobs(ids)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert entry.token_id == ids[pos]
        assert entry.logprob == pytest.approx(float(ref[pos - 1, ids[pos]]), abs=1e-4)
        assert [t for t, _ in entry.top] == ref[pos - 1].topk(2).indices.tolist()


def test_logit_bias_forces_and_bans_tokens(llm):
    plain = llm.generate([PROMPT], greedy(6), use_tqdm=False)[0].token_ids
    forced = llm.generate([PROMPT], greedy(6, logit_bias={7: 100}), use_tqdm=False)[0]
    assert forced.token_ids == [7] * 6
    banned = llm.generate([PROMPT], greedy(6, logit_bias={plain[0]: -100}),
                          use_tqdm=False)[0].token_ids
    assert banned[0] != plain[0]
    # sampled rows honour it too, and the logprobs stay the model's own (before the bias)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=5, seed=1, logprobs=1,
                                                logit_bias={9: 100}), use_tqdm=False)[0]
    assert out.token_ids == [9] * 5
    assert all(e.logprob < -0.5 for e in out.logprobs)  # a random model does not favour 9


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    ({"prompt_logprobs": 30}, "prompt_logprobs"), ({"logit_bias": {1: 101}}, "logit_bias"),
    ({"logit_bias": {1: float("nan")}}, "logit_bias"), ({"logit_bias": {-1: 1}}, "logit_bias"),
])
def test_bad_values_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_logit_bias_outside_the_vocabulary_is_rejected(llm):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary") as e:
        llm.generate([PROMPT], greedy(2, logit_bias={10**6: 1.0}), use_tqdm=False)
    assert e.value.param == "logit_bias"
