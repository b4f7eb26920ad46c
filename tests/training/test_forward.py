"""The training forward on our LlamaForCausalLM equals Hugging Face's on the same weights, with
padding, and gradients reach the weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.config import ModelConfig
from lmforge.models.loader import load_model
from lmforge.training.forward import causal_lm_logits


@pytest.mark.parametrize("family", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_padded_batch_logits_match_hugging_face(family, request):
    model_dir = request.getfixturevalue(family)
    ours = load_model(ModelConfig(model=str(model_dir), dtype="float32"), for_training=True).model
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # right padding
    mask[2, 4:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    logits = causal_lm_logits(ours, ids, mask)
    assert logits.shape == (3, 17, 49152)
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref[real], rtol=1e-4, atol=1e-4)
    # a padded row's tokens see nothing of the padding: same logits as the row alone
    alone = causal_lm_logits(ours, ids[2:3, :4])
    torch.testing.assert_close(logits[2, :4], alone[0], rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_weight(tiny_llama_dir):
    model = load_model(ModelConfig(model=str(tiny_llama_dir), dtype="float32"),
                       for_training=True).model
    ids = torch.randint(0, 49152, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    logits = causal_lm_logits(model, ids, mask)
    logits[mask.bool()].logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
