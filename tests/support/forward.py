"""One plain causal prefill through a loaded model, without the engine: the model tests' probe."""

import torch

from lmforge.models.attention import AttentionMetadata, PrefillChunk
from lmforge.models.quant import Int4DecodeLinear


def prefill_logits(loaded, ids: list[int], force_int4: bool) -> torch.Tensor:
    """(T, vocab) logits of one plain causal prefill; ``force_int4`` sends every row of the
    ``Int4DecodeLinear`` layers to the int4 kernel (else to their dense layer)."""
    for module in loaded.model.modules():
        if isinstance(module, Int4DecodeLinear):
            module.max_rows = 10**9 if force_int4 else 0
    cfg, dtype = loaded.config, next(loaded.model.parameters()).dtype
    t = len(ids)
    caches = [tuple(torch.zeros(cfg.num_key_value_heads, t, cfg.head_dim, dtype=dtype)
                    for _ in range(2)) for _ in range(cfg.num_hidden_layers)]
    meta = AttentionMetadata(slot_mapping=torch.arange(t), block_size=1, num_decodes=0,
                             decode_rows=None, decode_bias=None,
                             prefills=[PrefillChunk(0, t, None, None)])
    with torch.inference_mode():
        hidden = loaded.model(torch.tensor(ids), torch.arange(t), caches, meta)
        return loaded.model.compute_logits(hidden)
