"""A decode step through every decoder layer in one compiled call (``csrc/decode_layer.cpp``).

At concurrency 1 the float32 decode step of SmolLM2-135M is ~1000 PyTorch ops, and their
dispatch costs about as much as their arithmetic (``benchmarks/decode_profile.py``: norms, RoPE,
attention and the other small ops were 9 of 17 ms). When every projection of a Llama-family
model is a compiled ``QuantLinear`` (a GGUF kept as codes, or ``--quantization``),
``FusedDecoder`` hands steps made only of single-token decodes to the C++ ``Decoder``, which
runs the same arithmetic in float32: equal to the PyTorch path up to summation order
(``tests/models/test_fused_decode.py``). Prefills, mixed steps, batches over
``kernel_max_rows`` rows and ``--deterministic`` take the PyTorch path,
as does a model whose projections a LoRA wrapper replaced (``MultiLoRALinear`` drops the fused
decoder when it wraps them).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.attention import AttentionMetadata
from lmforge.models.quant_linear import QuantLinear, kernel_max_rows

KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what csrc's Decoder reads
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


class FusedDecoder:
    """The decoder layers of a ``LlamaForCausalLM`` as one C++ ``Decoder`` (sharing the
    model's weight tensors, no copy); the arithmetic of Hugging Face's ``LlamaDecoderLayer``
    (and Qwen2's, with its q/k/v biases), in float32.

    ``applies(x, kv_caches, meta)`` says whether a step can run here; ``__call__(x (M, hidden),
    positions (M,) int64, kv_caches, meta) -> (M, hidden)`` float32 is the hidden state after
    the last layer, before the final norm, as ``LlamaModel``'s layer loop returns it, and writes
    this step's K/V into ``kv_caches`` (each (n_kv_heads, num_slots, head_dim)) at
    ``meta.slot_mapping``. The C++ side checks every shape, dtype, position and slot and raises
    RuntimeError on a mismatch rather than reading out of bounds.
    """

    def __init__(self, model: nn.Module, ext):
        cfg = model.config
        self.rotary = model.model.rotary
        self.max_rows = kernel_max_rows(ext)
        self.decoder = ext.Decoder(cfg.num_attention_heads, cfg.num_key_value_heads,
                                   cfg.head_dim, cfg.rms_norm_eps)

        def matrix(layer: QuantLinear):
            return ext.QuantMatrix(layer.codes, layer.scale, layer.zero, layer.high, layer.bits,
                                   layer.int8_activations)

        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            bias = attn.qkv_proj.bias
            self.decoder.add_layer(
                layer.input_layernorm.weight.detach(), matrix(attn.qkv_proj),
                torch.empty(0) if bias is None else bias.detach(), matrix(attn.o_proj),
                layer.post_attention_layernorm.weight.detach(), matrix(mlp.gate_up_proj),
                matrix(mlp.down_proj))

    @staticmethod
    def build(model: nn.Module) -> FusedDecoder | None:
        """The fused decoder of ``model``, or None unless it is a fused Llama-family model on
        the CPU whose four projections per layer are ``QuantLinear`` with the compiled kernel
        and whose norms are float32."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None or not hasattr(model.model, "rotary"):
            return None
        exts = set()
        for layer in layers:
            for name in PROJECTIONS:
                proj = layer.get_submodule(name)
                if type(proj) is not QuantLinear or proj.ext is None:
                    return None
                exts.add(proj.ext)
            if layer.input_layernorm.weight.dtype != torch.float32:
                return None
        return FusedDecoder(model, exts.pop()) if len(exts) == 1 else None

    def applies(self, x: torch.Tensor, kv_caches: list, meta: AttentionMetadata) -> bool:
        """A step of single-token decodes only, at most ``max_rows`` of them (where the
        kernel beats dequantize + GEMM), over float32, float16 or bfloat16 caches, outside
        batch-invariant mode."""
        t = x.shape[0]
        return (meta.invariant is None and meta.num_decodes == t and 0 < t <= self.max_rows
                and meta.decode_tables is not None and kv_caches[0][0].dtype in KV_DTYPES)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                 meta: AttentionMetadata) -> torch.Tensor:
        return self.decoder.forward(
            x.float().contiguous(), self.rotary.cos, self.rotary.sin, positions,
            [k for k, _ in kv_caches], [v for _, v in kv_caches], meta.slot_mapping,
            meta.decode_tables, meta.decode_lens, meta.block_size)


def attach_fused_decoder_(model: nn.Module) -> str:
    """Set ``model.fused_decoder`` (a model family that has the attribute) to
    ``FusedDecoder.build(model)``; the start-up line's note when it is one, else ""."""
    if not hasattr(model, "fused_decoder"):
        return ""
    model.fused_decoder = FusedDecoder.build(model)
    return "" if model.fused_decoder is None else "; decode steps: every layer in one compiled call"
