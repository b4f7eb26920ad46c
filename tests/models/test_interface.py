"""Every model family meets the ``CausalLM`` protocol the engine and the training loops use."""

import pytest

from lmforge.config import ModelConfig
from lmforge.models.interface import CausalLM
from lmforge.models.loader import load_model


@pytest.mark.parametrize("family", ["tiny_llama_dir", "tiny_gpt2_dir", "tiny_gpt1_dir"])
def test_each_family_is_a_causal_lm_whose_default_lora_targets_exist(family, request):
    model = load_model(ModelConfig(model=str(request.getfixturevalue(family)), dtype="float32"),
                       for_training=True).model
    assert isinstance(model, CausalLM)
    assert model.kv_cache_shape(16)[1] == 16
    layers = {name.rpartition(".")[2] for name, _ in model.named_modules()}
    assert set(model.default_lora_targets) <= layers
