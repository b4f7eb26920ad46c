"""The training forward: a padded (B, T) batch through the model the engine serves, with autograd.

A ``CausalLM``'s forward (``models/interface.py``) takes a flat batch of tokens and attention
metadata; a training batch is the same thing as one engine step that prefills B new sequences
from scratch. So the batch's real tokens are packed into one flat batch (padding is never computed), each sequence is
a ``PrefillChunk`` without a cached prefix (its own causal SDPA call, the serving prefill path),
and the K/V writes go to a throwaway scratch cache that nothing reads. The serving code is
unchanged, and the module classes trained are exactly the ones served (LoRA layers included).
"""

from __future__ import annotations

import torch

from lmforge.models.attention import AttentionMetadata, PrefillChunk
from lmforge.models.interface import CausalLM
from lmforge.models.loader import LoadedModel
from lmforge.training.losses import IGNORE_INDEX, selective_log_softmax


def packed_metadata(lengths: list[int], device: torch.device) -> AttentionMetadata:
    """Metadata of a flat batch of sequences of ``lengths`` tokens, each a fresh prefill.

    Token i of the flat batch writes its K/V to scratch slot i.
    """
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    chunks = [PrefillChunk(start=s, end=e, context_rows=None, mask=None)
              for s, e in zip(starts, starts[1:]) if e > s]
    return AttentionMetadata(slot_mapping=torch.arange(starts[-1], device=device), block_size=1,
                             num_decodes=0, decode_rows=None, decode_bias=None, prefills=chunks)


def _hidden_states(model: CausalLM, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states of the real tokens, flat (N, hidden), row after row; the (B, T)
    bool mask of where they sit)."""
    mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
            else attention_mask.bool())
    lengths = mask.sum(-1).tolist()
    flat_ids = input_ids[mask]  # (N,) the real tokens, row after row
    positions = torch.cat([torch.arange(n, device=input_ids.device) for n in lengths])
    param = next(model.parameters())
    k_scratch = torch.empty(model.kv_cache_shape(len(flat_ids)), dtype=param.dtype,
                            device=param.device)
    scratch = (k_scratch, torch.empty_like(k_scratch))
    # every layer writes the same scratch: the attention reads this batch's own K/V, never it
    kv_caches = [scratch] * model.config.num_hidden_layers
    return model(flat_ids, positions, kv_caches, packed_metadata(lengths, input_ids.device)), mask


def causal_lm_logits(model: CausalLM, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of every position of a padded batch, differentiable.

    Args:
        model: an UNFUSED ``CausalLM``, any family (``fuse_projections_`` drops the layers LoRA
            wraps and fused weights carry no gradient).
        input_ids: (B, T) int64.
        attention_mask: (B, T), 1 on tokens and 0 on padding; each row's tokens must be
            contiguous (right or left padding). None = no padding.

    Returns:
        (B, T, V) float32 logits; rows of padding positions are ``lm_head(0)`` (zeros unless the
        head has a bias) and carry no information. Real positions equal Hugging Face's
        ``AutoModelForCausalLM(input_ids, attention_mask).logits`` for right padding (positions
        restart at 0 in every row, as HF's ``position_ids`` from the attention mask).
    """
    b, t = input_ids.shape
    hidden, mask = _hidden_states(model, input_ids, attention_mask)
    if attention_mask is None:  # no padding: the flat batch is the (B, T) batch row after row
        return model.compute_logits(hidden.view(b, t, -1))
    padded = hidden.new_zeros(b, t, hidden.shape[-1])
    padded[mask] = hidden  # (B, T, hidden), zeros on padding
    return model.compute_logits(padded)


def label_logps(model: CausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``losses.token_logps(causal_lm_logits(model, input_ids, attention_mask), labels)``, with
    the LM head and the softmax computed only where a label is predicted.

    In fine-tuning most positions are prompt or padding; the (B, T, V) logits of all of them
    (V = 49152 for SmolLM2: 200 MB of float32 for 8 x 128 tokens, and a fifth of the forward's
    FLOPs) would only be thrown away. Here the head runs on the (N, hidden) states that predict
    the N labelled tokens.

    Args:
        labels: (B, T) int64, ``IGNORE_INDEX`` where no loss is taken; position t's state
            predicts ``labels[:, t + 1]``.

    Returns:
        ``(logps (B, T-1) float32, mask (B, T-1) bool)``, as ``losses.token_logps``: 0 where
        the mask is False. Equal to the full-logits path up to float rounding (a test checks).
    """
    b, t = input_ids.shape
    hidden, real = _hidden_states(model, input_ids, attention_mask)
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): the labelled targets
    predicting = torch.zeros_like(real)
    predicting[:, :-1] = mask  # (B, T): the states that predict them
    row_of = torch.full((b, t), -1, dtype=torch.long, device=input_ids.device)
    row_of[real] = torch.arange(hidden.shape[0], device=input_ids.device)
    rows = row_of[predicting]  # (N,) rows of ``hidden``, in the targets' row-major order
    if (rows < 0).any():
        raise ValueError("a labelled token follows a padding position")
    logits = model.compute_logits(hidden[rows])  # (N, V)
    logps = hidden.new_zeros(b, t - 1, dtype=torch.float32)
    logps[mask] = selective_log_softmax(logits, labels[:, 1:][mask])
    return logps, mask


def load_base(model: str, device: str, base_adapter: str | None = None) -> LoadedModel:
    """The base model as every training process loads it: float32, unfused
    (``load_model(..., for_training=True)``), with ``base_adapter`` (an ``ft:`` model's PEFT
    directory) folded into its weights. Raises ``ModelLoadError`` as ``load_model``."""
    from lmforge.config import ModelConfig
    from lmforge.models.loader import load_model
    from lmforge.models.lora_merge import merge_adapter_

    loaded = load_model(ModelConfig(model=model, dtype="float32", device=device),
                        for_training=True)
    if base_adapter is not None:
        merge_adapter_(loaded.model, str(base_adapter))
    return loaded
