"""The real default model: our engine on the dequantized GGUF must decode greedily exactly as
Hugging Face transformers' ``generate`` on the same file (fp32), token for token."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.engine.llm import LLM
from lmforge.engine.request import SamplingParams

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "List three prime numbers."}],
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2_llm():
    return LLM("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf_path):
    return AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name, dtype=torch.float32).eval()


def test_greedy_generation_matches_transformers(smollm2_llm, hf_smollm2):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    ours = smollm2_llm.chat(PROMPTS, params, use_tqdm=False)  # all three in one batch
    for conv, out in zip(PROMPTS, ours):
        ids = smollm2_llm.tokenizer.apply_chat_template(conv)
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            ref = hf_smollm2.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                      max_new_tokens=MAX_TOKENS, do_sample=False,
                                      eos_token_id=2, pad_token_id=2)
        assert out.token_ids == ref[0, len(ids):].tolist()


def test_answers_sensibly(smollm2_llm):
    out = smollm2_llm.chat(PROMPTS[0], SamplingParams(temperature=0, max_tokens=32),
                           use_tqdm=False)[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
