"""Training methods: the registry by name, and SFT's collator and loss (the micro-batch it
makes, the summed loss and its count that the loop divides)."""

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import InvalidRequestError
from lmforge.models.loader import load_model
from lmforge.training.data import Example
from lmforge.training.forward import causal_lm_logits
from lmforge.training.losses import IGNORE_INDEX, sft_loss
from lmforge.training.methods import METHODS, get_method
from lmforge.training.methods.sft import SFT, SFTBatch, collate, loss
from lmforge.training.trainer import TrainingConfig


def test_methods_are_chosen_by_name():
    assert get_method("sft") is SFT and set(METHODS) == {"sft", "dpo"}
    assert SFT.collate is collate and SFT.loss is loss
    with pytest.raises(InvalidRequestError, match="unknown training method 'ppo'.*dpo, sft") as e:
        get_method("ppo")
    assert e.value.param == "method"
    with pytest.raises(InvalidRequestError) as e:
        TrainingConfig(method="ppo").validate()
    assert e.value.param == "method"
    TrainingConfig().validate()  # "sft" by default


def test_collate_pads_right_and_masks_prompt_and_padding():
    batch = collate([Example([5, 6], [7, 2], 1), Example([5], [8], 2)], pad_id=0)
    assert isinstance(batch, SFTBatch)
    assert batch.input_ids.tolist() == [[5, 6, 7, 2], [5, 8, 0, 0]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 2],
                                     [IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.input_ids.dtype == batch.labels.dtype == torch.long
    assert batch.num_items == 3 and batch.num_tokens == 6
    moved = batch.to(torch.device("cpu"))
    assert isinstance(moved, SFTBatch) and torch.equal(moved.labels, batch.labels)


def test_sft_loss_is_the_sum_over_completion_tokens_and_their_count(tiny_llama_dir):
    model = load_model(ModelConfig(model=str(tiny_llama_dir), dtype="float32"),
                       for_training=True).model
    batch = collate([Example([5, 6, 9], [7, 8, 2], 1), Example([5], [8, 2], 2)], pad_id=0)
    summed, n, metrics = loss(model, batch)
    assert metrics == {}
    assert n == batch.num_items == 5 and summed.dtype == torch.float32
    logits = causal_lm_logits(model, batch.input_ids, batch.attention_mask)
    # the LM head ran on the labelled positions only; the full-logits loss agrees
    torch.testing.assert_close(summed, sft_loss(logits, batch.labels, num_items=1))
    torch.testing.assert_close(summed / n, sft_loss(logits, batch.labels))
    summed.backward()  # differentiable
