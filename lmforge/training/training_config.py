"""``TrainingConfig``: the hyperparameters of one LoRA fine-tuning run (``trainer.train``), with
OpenAI's fine-tuning names where they exist and TRL's ``DPOConfig`` names for DPO's."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import InvalidRequestError
from lmforge.models.lora import LoRAConfig
from lmforge.training.losses import DPO_LOSS_TYPES
from lmforge.training.methods import get_method


@dataclass
class TrainingConfig:
    """Hyperparameters of one LoRA fine-tuning run (OpenAI's fine-tuning names where they
    exist)."""

    method: str = "sft"  # the training method, by name (``methods.METHODS``)
    n_epochs: int = 3
    batch_size: int = 8  # examples per micro-batch
    eval_batch_size: int | None = None  # examples per validation batch; None = batch_size
    learning_rate: float = 2e-4  # base learning rate of AdamW
    learning_rate_multiplier: float = 1.0  # OpenAI's: the peak rate is learning_rate * this
    warmup_ratio: float = 0.03  # share of the optimizer steps spent warming up linearly
    weight_decay: float = 0.0  # AdamW's decoupled weight decay on the LoRA weights
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_seq_len: int = 1024  # tokens per example; longer rows are cut from the end
    seed: int = 0  # LoRA init, shuffling, the validation hold-out
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    device: str = "cpu"
    # DPO's (method "dpo"; OpenAI's method.dpo.hyperparameters.beta, TRL's DPOConfig names)
    beta: float = 0.1  # strength of the KL penalty to the reference model
    dpo_loss_type: str = "sigmoid"  # losses.DPO_LOSS_TYPES
    label_smoothing: float = 0.0  # share of preference labels assumed flipped (sigmoid, robust)
    # weight of the chosen answers' mean token NLL added to the DPO loss (TRL's rpo_alpha; RPO,
    # Pang et al. 2024; Llama 3's DPO recipe used 0.2). 0 is plain DPO, which on off-policy
    # pairs lowers the likelihood of both answers: measured on SmolLM2-135M with 54 Shakespeare
    # pairs (tests/server/test_fine_tune_smollm2.py's set), plain DPO at the SFT rate (2e-4,
    # 162 steps) drifted into apologies (0 of 20 held-out replies in one sentence) and at 2e-5
    # changed nothing (0 of 20); with 0.2, 20 of 20 (108 steps, 40 pairs).
    rpo_alpha: float = 0.2

    @property
    def peak_learning_rate(self) -> float:
        return self.learning_rate * self.learning_rate_multiplier

    def validate(self) -> None:
        """Raises InvalidRequestError naming the field (as ``param``) and its valid range."""
        checks = [
            ("n_epochs", self.n_epochs >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("eval_batch_size", self.eval_batch_size is None or self.eval_batch_size >= 1,
             "at least 1"),
            ("learning_rate", self.learning_rate > 0, "positive, e.g. 2e-4"),
            ("learning_rate_multiplier", self.learning_rate_multiplier > 0, "positive"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "at least 0"),
            ("max_grad_norm", self.max_grad_norm >= 0, "at least 0 (0 = no clipping)"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "at least 1"),
            ("max_seq_len", self.max_seq_len >= 2, "at least 2"),
            ("beta", self.beta > 0, "positive, e.g. 0.1"),
            ("dpo_loss_type", self.dpo_loss_type in DPO_LOSS_TYPES,
             f"one of {', '.join(DPO_LOSS_TYPES)}"),
            ("label_smoothing", 0 <= self.label_smoothing < 0.5, "in [0, 0.5)"),
            ("rpo_alpha", self.rpo_alpha >= 0, "at least 0 (0 = plain DPO)"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise InvalidRequestError(f"{name} ({getattr(self, name)}) must be {want}",
                                          param=name)
        get_method(self.method)
        try:
            self.lora.validate()
        except ValueError as e:
            raise InvalidRequestError(str(e), param="lora") from None
