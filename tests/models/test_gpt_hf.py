"""Writing GPT checkpoints (``models/gpt_hf.py``): a model we built and trained saves as a Hugging
Face directory that ``transformers`` loads with our logits, GPT-2 and GPT-1 (ReLU, as the seed's),
and reads back into an equal model; GPT-2's initialization has the paper's statistics."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.config import ModelConfig
from lmforge.errors import ModelLoadError
from lmforge.models.gpt import GPTConfig, GPTLMHeadModel
from lmforge.models.gpt_hf import gpt_config_from_hf, gpt_config_to_hf, save_gpt_pretrained
from lmforge.models.loader import load_model
from lmforge.training.forward import causal_lm_logits

SIZES = {"vocab_size": 300, "n_positions": 64, "n_embd": 48, "n_layer": 3, "n_head": 4}


def _trained_model(config: GPTConfig) -> GPTLMHeadModel:
    """A GPT after GPT-2's init and a few AdamW steps (so no weight is still at its init)."""
    torch.manual_seed(0)
    model = GPTLMHeadModel(config)
    model.init_weights_()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, config.vocab_size, (4, 32))
    for _ in range(3):
        logits = causal_lm_logits(model, ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("arch,activation,hf_class", [
    ("gpt2", "gelu_new", "GPT2LMHeadModel"),
    ("openai-gpt", "gelu_new", "OpenAIGPTLMHeadModel"),
    ("openai-gpt", "relu", "OpenAIGPTLMHeadModel"),
])
def test_saved_model_loads_in_transformers_and_lmforge_with_equal_logits(
        tmp_path, arch, activation, hf_class):
    config = GPTConfig(**SIZES, activation_function=activation, architecture=arch, dropout=0.1)
    model = _trained_model(config).eval()
    save_gpt_pretrained(model, tmp_path, bos_token_id=0, eos_token_id=0)

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == hf_class
    back = load_model(ModelConfig(model=str(tmp_path), dtype="float32"),
                      for_training=True).model.eval()
    ids = torch.randint(0, SIZES["vocab_size"], (2, 40))
    with torch.no_grad():
        ours = causal_lm_logits(model, ids)
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(causal_lm_logits(back, ids), ours, atol=1e-6, rtol=1e-6)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 0, "eos_token_id": 0}


def test_config_round_trips_and_serving_never_drops():
    config = GPTConfig(**SIZES, n_inner=100, activation_function="gelu", dropout=0.2)
    back = gpt_config_from_hf(gpt_config_to_hf(config), "gpt2")
    assert back == GPTConfig(**SIZES, n_inner=100, activation_function="gelu", dropout=0.0)
    assert gpt_config_to_hf(config)["resid_pdrop"] == 0.2


def test_gpt1_cannot_save_an_activation_hf_gpt1_lacks():
    config = GPTConfig(**SIZES, activation_function="gelu", architecture="openai-gpt")
    with pytest.raises(ModelLoadError, match="activation"):
        gpt_config_to_hf(config)


def test_dropout_is_active_in_training_only():
    model = GPTLMHeadModel(GPTConfig(**SIZES, dropout=0.5))
    model.init_weights_()
    ids = torch.randint(0, SIZES["vocab_size"], (1, 16))
    with torch.no_grad():
        model.train()
        assert not torch.equal(causal_lm_logits(model, ids), causal_lm_logits(model, ids))
        model.eval()
        torch.testing.assert_close(causal_lm_logits(model, ids), causal_lm_logits(model, ids))


def test_init_is_gpt2s():
    torch.manual_seed(0)
    model = GPTLMHeadModel(GPTConfig(vocab_size=4000, n_positions=256, n_embd=256, n_layer=8,
                                     n_head=4))
    model.init_weights_()
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.02)  # /sqrt(16)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.all(block.attn.c_attn.bias == 0) and torch.all(block.ln_1.weight == 1)
    assert model.lm_head.weight is model.transformer.wte.weight
