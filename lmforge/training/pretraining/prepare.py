"""Everything a pretraining run needs before its first step: the run directory, the tokenizer,
the token files, the model and its optimizer.

The run directory (``--out``) is claimed by ``pretrain_run.json`` (the settings that identify the
run, ``PretrainConfig.identity``): a later invocation with the same settings resumes the run, one
with different settings is refused, and a directory that holds anything else is never written to.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lmforge.errors import InvalidRequestError
from lmforge.models.gpt import GPTConfig, GPTLMHeadModel
from lmforge.training.bpe import ENDOFTEXT, train_bpe_tokenizer
from lmforge.training.pretraining.config import ARCHITECTURES, PretrainConfig
from lmforge.training.pretraining.tokens import (
    TokenStream,
    tokenize_corpus,
    unigram_cross_entropy,
)

RUN_FILE = "pretrain_run.json"
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def claim_run_dir(config: PretrainConfig) -> Path:
    """Create or reopen the run directory.

    Raises:
        InvalidRequestError: it holds a run with other settings (naming them), or files that are
            not a pretraining run's.
    """
    out = Path(config.out)
    marker = out / RUN_FILE
    identity = json.loads(json.dumps(config.identity()))  # as JSON reads it back
    if marker.exists():
        previous = json.loads(marker.read_text())
        changed = sorted(k for k in identity if previous.get(k) != identity[k])
        if changed:
            raise InvalidRequestError(
                f"{out} holds a pretraining run with other settings ({', '.join(changed)} "
                f"differ); use a new --out, or the same settings to resume it", param="out")
        return out
    if out.exists() and any(out.iterdir()):
        raise InvalidRequestError(f"{out} is not empty and holds no pretraining run; give a new "
                                  "or empty directory", param="out")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(identity, indent=2) + "\n")
    return out


def prepare_tokenizer(config: PretrainConfig, out: Path, show_progress: bool
                      ) -> tuple[PreTrainedTokenizerBase, int]:
    """The run's tokenizer, saved into ``out`` (where the final model needs it), and the id that
    ends each document (its eos token).

    Trained on ``config.train`` (``vocab_size``) unless ``config.tokenizer`` names one; a run
    that resumes reuses the one in ``out``.

    Raises:
        InvalidRequestError: the given tokenizer does not load or has no eos token.
    """
    if all((out / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(str(out))
    elif config.tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
        except (OSError, ValueError) as e:
            raise InvalidRequestError(f"cannot load the tokenizer {config.tokenizer}: {e}",
                                      param="tokenizer") from e
        _save_tokenizer(tokenizer, out)
    else:
        staging = out / ".tokenizer-tmp"
        tokenizer = train_bpe_tokenizer(config.train, staging, vocab_size=config.vocab_size,
                                        show_progress=show_progress)
        for name in TOKENIZER_FILES:  # tokenizer.json last: its presence means complete
            if (staging / name).exists():
                os.replace(staging / name, out / name)
        shutil.rmtree(staging, ignore_errors=True)
    eot = tokenizer.eos_token_id
    if eot is None:
        eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT) if ENDOFTEXT in tokenizer.get_vocab() \
            else None
    if eot is None:
        raise InvalidRequestError("the tokenizer has no eos token to separate documents with; "
                                  f"add one (e.g. {ENDOFTEXT})", param="tokenizer")
    return tokenizer, eot


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    staging = out / ".tokenizer-tmp"
    tokenizer.save_pretrained(str(staging))
    for path in sorted(staging.iterdir(), key=lambda p: p.name == "tokenizer.json"):
        os.replace(path, out / path.name)
    shutil.rmtree(staging, ignore_errors=True)


@dataclass
class RunData:
    """The run's token streams and the context-free baseline their loss must beat."""

    train: TokenStream
    valid: TokenStream
    unigram_entropy: float  # nats/token of valid under train's unigram distribution


def prepare_data(config: PretrainConfig, out: Path, tokenizer: PreTrainedTokenizerBase,
                 eot: int, show_progress: bool) -> RunData:
    """Tokenize the corpus once into ``out/data`` and split off validation tokens.

    Raises:
        InvalidRequestError: too little text for one ``context``-long window in either split.
    """
    data = out / "data"
    train = tokenize_corpus(config.train, tokenizer, eot, data / "train.bin",
                            show_progress=show_progress)
    if config.valid:
        valid = tokenize_corpus(config.valid, tokenizer, eot, data / "valid.bin",
                                show_progress=show_progress)
    else:  # the tail of the corpus: held-out text the model never trains on
        n_valid = max(int(len(train) * config.valid_fraction), config.context + 1)
        train, valid = train[:-n_valid], train[-n_valid:]
    try:
        streams = TokenStream(train, config.context), TokenStream(valid, config.context)
    except ValueError as e:
        raise InvalidRequestError(f"too little text: {e}", param="train") from e
    baseline = unigram_cross_entropy(np.asarray(train), np.asarray(valid), len(tokenizer))
    return RunData(*streams, baseline)


def build_model(config: PretrainConfig, vocab_size: int, device: torch.device
                ) -> GPTLMHeadModel:
    """A freshly initialized GPT (``GPTLMHeadModel.init_weights_``, seeded by ``config.seed``)."""
    gpt = GPTConfig(vocab_size=vocab_size, n_positions=config.context, n_embd=config.n_embd,
                    n_layer=config.n_layer, n_head=config.n_head,
                    activation_function=config.activation or "gelu_new",
                    architecture=ARCHITECTURES[config.arch], dropout=config.dropout)
    torch.manual_seed(config.seed)
    model = GPTLMHeadModel(gpt)
    model.init_weights_()
    return model.to(device)


def build_optimizer(config: PretrainConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (nanoGPT's groups: every
    parameter of 2 or more dimensions decays, biases and LayerNorm gains do not)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied: once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate,
                             betas=(config.beta1, config.beta2))


def learning_rate(config: PretrainConfig, step: int, horizon: int | None) -> float:
    """The rate of optimizer step ``step`` (1-based): linear warmup over ``warmup_steps`` (at most
    a tenth of the horizon), then cosine decay to ``min_lr_ratio`` of the peak at ``horizon``
    (Loshchilov & Hutter 2017, without restarts; nanoGPT's ``get_lr``). Before the horizon is
    known (a run bounded by time only), warmup alone."""
    peak = config.learning_rate
    warmup = max(1, config.warmup_steps)
    if horizon is None:
        return peak * min(1.0, step / warmup)
    warmup = max(1, min(warmup, horizon // 10))
    if step <= warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
    low = peak * config.min_lr_ratio
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
