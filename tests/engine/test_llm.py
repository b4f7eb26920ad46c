"""The offline ``LLM`` raises what seed 001's ``GPT.generate`` raises (``ValueError`` for an input
longer than the context, temperature <= 0 when sampling, top_k <= 0, top_p outside (0, 1]), with
OpenAI's ranges where they differ (temperature 0 is greedy; top_k 0 or -1 disables it), before
anything runs: a bad prompt in a list leaves nothing queued."""

import pytest

from lmforge.config import CacheConfig, EngineConfig, ModelConfig
from lmforge.engine.llm import LLM
from lmforge.engine.request import SamplingParams
from lmforge.errors import ContextLengthExceededError, InvalidRequestError


@pytest.fixture(scope="module")
def llm(tiny_gpt2_dir):
    return LLM(str(tiny_gpt2_dir), config=EngineConfig(
        model=ModelConfig(model=str(tiny_gpt2_dir), dtype="float32", max_model_len=64),
        cache=CacheConfig(block_size=4, num_blocks=64)))


def test_an_input_longer_than_the_context_is_a_value_error(llm):
    with pytest.raises(ValueError, match="maximum context length is 64") as e:
        llm.generate([list(range(1, 80))], SamplingParams(max_tokens=4), use_tqdm=False)
    assert isinstance(e.value, ContextLengthExceededError)


@pytest.mark.parametrize("settings,param", [
    ({"temperature": -0.5}, "temperature"), ({"top_k": -2}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
])
def test_the_seeds_sampling_checks_are_value_errors_naming_the_parameter(settings, param):
    with pytest.raises(ValueError) as e:
        SamplingParams(**settings)
    assert isinstance(e.value, InvalidRequestError) and e.value.param == param


def test_the_openai_ranges_are_accepted_too(llm):
    greedy = SamplingParams(max_tokens=4, temperature=0.0, top_k=0)  # do_sample=False
    sampled = SamplingParams(max_tokens=4, temperature=0.7, top_k=50, top_p=0.9, seed=1)
    outputs = llm.generate([[1, 2, 3]] * 2, greedy, use_tqdm=False)
    assert outputs[0].token_ids == outputs[1].token_ids and len(outputs[0].token_ids) == 4
    assert len(llm.generate([1, 2, 3], sampled, use_tqdm=False)[0].token_ids) == 4


def test_a_bad_prompt_in_a_list_runs_none_and_leaves_nothing_queued(llm):
    with pytest.raises(ContextLengthExceededError):
        llm.generate([[1, 2, 3], list(range(1, 80))], SamplingParams(max_tokens=4),
                     use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4),
                            use_tqdm=False)[0].token_ids) == 4
