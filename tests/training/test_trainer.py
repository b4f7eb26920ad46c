"""The SFT loop on the tiny Llama: the loss falls, only adapter weights change, the best
checkpoint is the lowest validation loss, events arrive, should_stop stops, resume continues."""

import json

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import InvalidRequestError
from lmforge.models.loader import load_model
from lmforge.models.lora import LoRAConfig, LoRALinear, load_peft_adapter
from lmforge.training.events import CheckpointEvent, MessageEvent, ResumeEvent, StepEvent
from lmforge.training.trainer import STATE_FILE, TrainingConfig, cosine_with_warmup, train

ANSWER = "Bananas are the answer."


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Tell me about topic number {i}."},
                          {"role": "assistant", "content": ANSWER}]} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(**kw):
    base = dict(n_epochs=3, batch_size=4, learning_rate=3e-2, warmup_ratio=0.1,
                weight_decay=0.01, max_seq_len=64, gradient_accumulation_steps=2,
                lora=LoRAConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj",
                                                                   "down_proj")))
    base.update(kw)
    return TrainingConfig(**base)


def test_training_learns_the_adapter_and_leaves_the_base(load_scaled, tiny_llama_dir, train_file,
                                                        tmp_path):
    loaded = load_scaled(tiny_llama_dir)
    base_before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    events = []
    result = train(loaded, train_file, None, _config(), tmp_path / "out", on_event=events.append)

    metrics = [e for e in events if isinstance(e, StepEvent)]
    # 18 training rows (2 held out) -> 5 micro-batches -> 3 steps per epoch
    assert [e.step for e in metrics] == list(range(1, 10)) and result.steps == 9
    assert [e.epoch for e in metrics] == [1] * 3 + [2] * 3 + [3] * 3
    evals = [e.eval_loss for e in metrics if e.eval_loss is not None]
    assert len(evals) == 3 and evals[-1] < evals[0] - 2.0
    assert [e.step for e in metrics if e.eval_loss is not None] == [3, 6, 9]
    assert metrics[-1].train_loss < metrics[0].train_loss * 0.6
    assert metrics[0].learning_rate == 0.0  # warmup starts at 0, as transformers
    assert max(e.learning_rate for e in metrics) == pytest.approx(3e-2, rel=0.2)
    assert any(isinstance(e, MessageEvent) for e in events)
    assert result.trained_tokens > 0 and not result.stopped
    # each epoch's last step is followed by its checkpoint, with the same losses
    checkpoints = [e for e in events if isinstance(e, CheckpointEvent)]
    assert [(c.step, c.epoch, c.eval_loss) for c in checkpoints] == [
        (3, 1, evals[0]), (6, 2, evals[1]), (9, 3, evals[2])]
    for c in checkpoints:
        step = events[events.index(c) - 1]
        assert isinstance(step, StepEvent) and (step.step, step.train_loss) == (c.step,
                                                                                c.train_loss)
        assert c.path == tmp_path / "out" / f"checkpoint-{c.step}"

    assert result.best_eval_loss == min(evals)
    kept = sorted((tmp_path / "out").glob("checkpoint-*/*"))  # every adapter; the last's state
    assert [str(p.relative_to(tmp_path / "out")) for p in kept if p.name == STATE_FILE] == [
        f"checkpoint-9/{STATE_FILE}"]
    assert sum(p.name == "adapter_model.safetensors" for p in kept) == 3
    config, weights = load_peft_adapter(result.best_checkpoint)
    assert config.r == 4 and set(config.target_modules) == {"q_proj", "v_proj", "down_proj"}
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)

    lora = [m for m in loaded.model.modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 3 * 2 and all(m.lora_B.weight.abs().sum() > 0 for m in lora)
    after = loaded.model.state_dict()
    for key, before in base_before.items():
        now = after[key.replace("q_proj.", "q_proj.base.").replace("v_proj.", "v_proj.base.")
                    .replace("down_proj.", "down_proj.base.")]
        assert torch.equal(now, before), key


def test_best_checkpoint_is_the_lowest_validation_loss(load_scaled, tiny_llama_dir, train_file,
                                                       tmp_path,
                                                      monkeypatch):
    from lmforge.training import trainer

    scripted = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(trainer._Loop, "evaluate", lambda self: (next(scripted), {}))
    result = train(load_scaled(tiny_llama_dir), train_file, None, _config(), tmp_path)
    assert result.best_eval_loss == 1.0 and result.best_checkpoint == tmp_path / "checkpoint-6"
    # every checkpoint is kept, a model of its own
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-3", "checkpoint-6", "checkpoint-9"]
    config, weights = load_peft_adapter(result.best_checkpoint)
    assert config.r == 4 and set(config.target_modules) == {"q_proj", "v_proj", "down_proj"}
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)


def test_stop_then_resume_continues_from_the_checkpoint(load_scaled, tiny_llama_dir, train_file,
                                                        tmp_path):
    config = _config(n_epochs=2)
    full = []
    train(load_scaled(tiny_llama_dir), train_file, None, config, tmp_path / "full",
          on_event=full.append)
    polls = iter(range(100))
    stopped = train(load_scaled(tiny_llama_dir), train_file, None, config, tmp_path / "run",
                    should_stop=lambda: next(polls) >= 4)  # after step 4, in epoch 2
    assert stopped.stopped and stopped.steps == 4
    assert stopped.best_checkpoint.name == "checkpoint-3"

    resumed = []
    result = train(load_scaled(tiny_llama_dir), train_file, None, config, tmp_path / "run",
                   on_event=resumed.append)
    steps = [e for e in resumed if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == [4, 5, 6]  # step 4 was never checkpointed: redone
    assert resumed[0] == ResumeEvent(checkpoint="checkpoint-3", epoch=1, step=3)
    assert [e for e in resumed if isinstance(e, ResumeEvent)] == [resumed[0]]
    assert [e for e in full if isinstance(e, ResumeEvent)] == [  # nothing to resume: step 1
        ResumeEvent(checkpoint=None, epoch=0, step=0)]
    assert result.steps == 6
    # same data order, weights and optimizer state: the same losses as the uninterrupted run
    expected = {e.step: e.train_loss for e in full if isinstance(e, StepEvent)}
    for e in steps:
        assert e.train_loss == pytest.approx(expected[e.step], rel=1e-4)


def test_config_and_schedule():
    with pytest.raises(InvalidRequestError) as e:
        TrainingConfig(n_epochs=0).validate()
    assert e.value.param == "n_epochs"
    with pytest.raises(InvalidRequestError, match="target_modules"):
        TrainingConfig(lora=LoRAConfig(target_modules=("nope",))).validate()
    assert cosine_with_warmup(0, 2, 10) == 0 and cosine_with_warmup(1, 2, 10) == 0.5
    assert cosine_with_warmup(2, 2, 10) == 1.0 and cosine_with_warmup(6, 2, 10) == 0.5
    assert cosine_with_warmup(10, 2, 10) == 0.0


def test_max_seq_len_beyond_the_model_is_refused(load_scaled, tiny_llama_dir, train_file,
                                                 tmp_path):
    with pytest.raises(InvalidRequestError, match="exceeds the model's context"):
        train(load_scaled(tiny_llama_dir), train_file, None, _config(max_seq_len=4096), tmp_path)


def test_a_gpt_base_trains_with_its_familys_default_targets(tiny_gpt2_dir, train_file, tmp_path):
    """No target_modules: GPT's c_attn, c_proj and c_fc get adapters (Llama's seven names would
    match nothing in a GPT), saved for PEFT with fan_in_fan_out, and the loss falls."""
    loaded = load_model(ModelConfig(model=str(tiny_gpt2_dir), dtype="float32"), for_training=True)
    events = []
    result = train(loaded, train_file, None, _config(lora=LoRAConfig(r=4, lora_alpha=8)),
                   tmp_path / "out", on_event=events.append)
    evals = [e.eval_loss for e in events if isinstance(e, StepEvent) and e.eval_loss is not None]
    assert evals[-1] < evals[0] - 1.0
    config, _ = load_peft_adapter(result.best_checkpoint)
    assert set(config.target_modules) == {"c_attn", "c_proj", "c_fc"} and config.fan_in_fan_out
