"""The training forward on our LlamaForCausalLM equals Hugging Face's on the same weights, with
padding, and gradients reach the weights; the labelled-positions-only path (``label_logps``)
equals the full-logits one, values and gradients."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.config import ModelConfig
from lmforge.models.loader import load_model
from lmforge.training.forward import causal_lm_logits, label_logps
from lmforge.training.losses import IGNORE_INDEX, token_logps


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


def test_label_logps_equal_the_full_logits_path(tiny_llama_dir):
    def run(fn):
        model = load_model(ModelConfig(model=str(tiny_llama_dir), dtype="float32"),
                           for_training=True).model
        logps, mask = fn(model)
        (logps.sum() * 0.5).backward()
        return logps.detach(), mask, {n: p.grad for n, p in model.named_parameters()}

    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (3, 10))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # a prompt of 4 tokens
    mask[1, 7:] = 0  # row 1: right padding
    labels[1, 7:] = IGNORE_INDEX
    mask[2, :3] = 0  # row 2: left padding, then a 2-token prompt
    labels[2, :5] = IGNORE_INDEX
    full = run(lambda m: token_logps(causal_lm_logits(m, ids, mask), labels))
    sparse = run(lambda m: label_logps(m, ids, mask, labels))
    assert torch.equal(full[1], sparse[1]) and int(sparse[1].sum()) == 6 + 3 + 5
    torch.testing.assert_close(sparse[0], full[0], rtol=1e-5, atol=1e-5)
    for name, grad in full[2].items():
        torch.testing.assert_close(sparse[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
