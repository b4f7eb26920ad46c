"""The DPO method on the tiny Llama: its batch layout, log 2 at step 0 (policy == reference), and a
short run through the shared loop that moves held-out pairs' implicit rewards the preferred way
while the base weights stay bit-identical."""

import json
import math

import pytest
import torch

from lmforge.models.lora import LoRAConfig, inject_lora, lora_disabled
from lmforge.training.losses import IGNORE_INDEX
from lmforge.training.methods import get_method
from lmforge.training.methods.dpo import DPO, collate, sequence_logps_of
from lmforge.training.preferences import PreferenceExample, read_preferences
from lmforge.training.trainer import TrainingConfig, train

GOOD = "Bananas are the answer."
BAD = "I could not say, since there are so many things one might consider here."


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(first, n):
    return [{"input": {"messages": [{"role": "user", "content": f"Tell me about topic {i}."}]},
             "preferred_output": [{"role": "assistant", "content": GOOD}],
             "non_preferred_output": [{"role": "assistant", "content": BAD}]}
            for i in range(first, first + n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    for name, rows in (("train", _rows(0, 20)), ("held_out", _rows(100, 10))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_collate_puts_chosen_rows_first_with_prompts_masked():
    pairs = [PreferenceExample([5, 6], [7, 2], [8, 9, 2], 1), PreferenceExample([5], [7], [8], 2)]
    batch = collate(pairs, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 2, 0], [5, 7, 0, 0, 0],
                                        [5, 6, 8, 9, 2], [5, 8, 0, 0, 0]]
    assert batch.labels[2].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 8, 9, 2]
    assert batch.num_items == 2 and batch.num_tokens == 4 + 2 + 5 + 2
    assert get_method("dpo") is DPO


def test_the_loss_is_log_2_while_the_policy_is_the_reference(load_scaled, tiny_llama_dir,
                                                                files):
    loaded = load_scaled(tiny_llama_dir)
    inject_lora(loaded.model, LoRAConfig(r=4))  # lora_B = 0: the policy is the base
    pairs = read_preferences(files / "train.jsonl", loaded.tokenizer, 128)[:4]
    plain_dpo = TrainingConfig(method="dpo", rpo_alpha=0)  # the DPO loss alone
    summed, n, metrics = DPO.loss(loaded.model, collate(pairs, 0), plain_dpo)
    assert metrics["rewards/margins"] == pytest.approx(0, abs=1e-4) and metrics["rewards/accuracies"] == 0
    assert n == 4 and summed.item() / n == pytest.approx(math.log(2), abs=1e-4)
    summed.backward()  # and it has a gradient for the adapter


def test_dpo_training_prefers_the_chosen_answers_on_held_out_prompts(load_scaled, tiny_llama_dir,
                                                                     files,
                                                                     tmp_path):
    loaded = load_scaled(tiny_llama_dir)
    base_before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    config = TrainingConfig(method="dpo", n_epochs=3, batch_size=4, learning_rate=1e-2,
                            warmup_ratio=0.1, max_seq_len=128, beta=0.1, rpo_alpha=0,
                            lora=LoRAConfig(r=4, lora_alpha=8))
    result = train(loaded, files / "train.jsonl", None, config, tmp_path / "out")
    assert result.best_eval_loss < math.log(2) - 0.3

    held_out = collate(read_preferences(files / "held_out.jsonl", loaded.tokenizer, 128), 0)
    model = loaded.model.eval()
    with torch.no_grad():
        chosen, rejected = sequence_logps_of(model, held_out)
        with lora_disabled(model):
            ref_chosen, ref_rejected = sequence_logps_of(model, held_out)
    margins = (chosen - ref_chosen) - (rejected - ref_rejected)
    assert bool((margins > 0).all()), margins  # rewards/accuracies = 1 on unseen prompts
    after = model.state_dict()
    for key, before in base_before.items():
        now = after.get(key, after.get(key.replace(".weight", ".base.weight")))
        assert torch.equal(now, before), key


def test_rpo_adds_the_chosen_answers_mean_token_nll(load_scaled, tiny_llama_dir, files):
    loaded = load_scaled(tiny_llama_dir)
    inject_lora(loaded.model, LoRAConfig(r=4))
    batch = collate(read_preferences(files / "train.jsonl", loaded.tokenizer, 128)[:3], 0)
    plain = DPO.loss(loaded.model, batch, TrainingConfig(method="dpo", rpo_alpha=0)).loss
    rpo = DPO.loss(loaded.model, batch, TrainingConfig(method="dpo", rpo_alpha=0.5)).loss
    with torch.no_grad():
        chosen_mean, _ = sequence_logps_of(loaded.model, batch, average=True)
    torch.testing.assert_close(rpo, plain + 0.5 * (-chosen_mean).sum(), rtol=1e-5, atol=1e-5)


def test_a_stop_during_the_reference_pass_ends_the_run_at_once(load_scaled, tiny_llama_dir,
                                                               files, tmp_path):
    loaded = load_scaled(tiny_llama_dir)
    polls = []

    def should_stop() -> bool:  # stop at the second poll: one reference batch computed
        polls.append(1)
        return len(polls) >= 2

    config = TrainingConfig(method="dpo", n_epochs=1, batch_size=4, max_seq_len=128)
    result = train(loaded, files / "train.jsonl", None, config, tmp_path / "out",
                   should_stop=should_stop)
    assert result.stopped and result.steps == 0 and result.best_checkpoint is None
    assert len(polls) == 2  # no further batch, no training step
    assert not (tmp_path / "out" / "prepared" / "train.pt").exists()  # nothing half-saved
