"""Two adapters one after the other: folding both into the weights gives the same model as
folding their stacked adapter, which the engine can serve on the base as one (rank r1 + r2)."""

import torch

from lmforge.config import ModelConfig
from lmforge.models.lora import load_peft_adapter
from lmforge.models.lora_merge import merge_adapter_, stack_adapters
from lmforge.models.loader import load_model
from lmforge.training.forward import causal_lm_logits


def logits_with(model_dir, *adapters):
    loaded = load_model(ModelConfig(model=str(model_dir), dtype="float32"), for_training=True)
    for adapter in adapters:
        merge_adapter_(loaded.model, str(adapter))
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        return causal_lm_logits(loaded.model, ids, torch.ones_like(ids))


def test_the_stacked_adapter_is_both_adapters_applied(tiny_llama_dir, make_peft_adapter,
                                                      tmp_path):
    first = make_peft_adapter(tiny_llama_dir, tmp_path / "sft", 1, ["q_proj", "v_proj"])
    second = make_peft_adapter(tiny_llama_dir, tmp_path / "dpo", 2, ["v_proj", "down_proj"])
    stack_adapters(first, second, str(tmp_path / "both"), "tiny")
    config, weights = load_peft_adapter(tmp_path / "both")
    assert config.r == 8 and config.scaling == 1.0
    assert set(config.target_modules) == {"q_proj", "v_proj", "down_proj"}
    base, one = logits_with(tiny_llama_dir), logits_with(tiny_llama_dir, first)
    both = logits_with(tiny_llama_dir, first, second)
    assert not torch.allclose(base, one) and not torch.allclose(one, both)
    torch.testing.assert_close(logits_with(tiny_llama_dir, tmp_path / "both"), both,
                               rtol=1e-4, atol=1e-4)
