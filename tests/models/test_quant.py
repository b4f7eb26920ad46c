"""4-bit GGUF weights: exact block decoding, the int4 linear, and the real SmolLM2 file end to end."""

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.forward import prefill_logits

from lmforge.config import ModelConfig
from lmforge.models.loader import load_model
from lmforge.models.quant import (
    Int4DecodeLinear,
    attach_int4_,
    can_use_int4,
    read_q4_blocks,
)

needs_int4 = pytest.mark.skipif(not can_use_int4(torch.bfloat16, torch.device("cpu")),
                                reason="this PyTorch build has no CPU int4 kernel")


def quantized(type_name: str, rows: int = 48, cols: int = 128, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, type_name))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_blocks_decode_exactly_as_gguf_dequantizes(type_name):
    data = quantized(type_name)
    q4 = read_q4_blocks(data, type_name)
    ref = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, type_name))
    assert q4.codes.shape == (48, 128) and q4.scale.shape == (48, 4)
    assert int(q4.codes.min()) >= 0 and int(q4.codes.max()) <= 15
    assert torch.equal(q4.dequantize(), torch.from_numpy(ref))


def test_other_types_are_not_read_as_4_bit():
    assert read_q4_blocks(quantized("Q8_0"), "Q8_0") is None


def test_row_maps_apply_to_codes_scales_and_zeros():
    q4 = read_q4_blocks(quantized("Q4_1"), "Q4_1")
    flipped = q4.map_rows(lambda t: t.flip(0))
    assert torch.equal(flipped.dequantize(), q4.dequantize().flip(0))


@needs_int4
@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_matches_the_dense_weight(bias):
    q4 = read_q4_blocks(quantized("Q4_1"), "Q4_1")
    dense = torch.nn.Linear(128, 48, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(q4.dequantize())
    dense = dense.to(torch.bfloat16)
    layer = Int4DecodeLinear(dense, q4, max_rows=4)
    torch.manual_seed(0)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    ref = F.linear(x.float(), q4.dequantize(), None if dense.bias is None else dense.bias.float())
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 48)
    # scales and zeros are held in bf16, like the activations: errors of bf16 rounding
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.05)


@needs_int4
def test_rows_above_max_rows_take_the_dense_layer():
    q4 = read_q4_blocks(quantized("Q4_0"), "Q4_0")
    calls = []

    class Spy(torch.nn.Module):
        bias = None

        def forward(self, x):
            calls.append(x.shape[0])
            return torch.zeros(x.shape[0], 48, dtype=x.dtype)

    layer = Int4DecodeLinear(Spy(), q4, max_rows=4)
    layer(torch.randn(4, 128, dtype=torch.bfloat16))
    assert calls == []
    layer(torch.randn(5, 128, dtype=torch.bfloat16))
    assert calls == [5]


def test_attach_wraps_the_named_layers():
    model = torch.nn.Module()
    model.block = torch.nn.Module()
    model.block.proj = torch.nn.Linear(128, 48, bias=False).to(torch.bfloat16)
    if not can_use_int4(torch.bfloat16, torch.device("cpu")):
        pytest.skip("this PyTorch build has no CPU int4 kernel")
    assert attach_int4_(model, {"block.proj.weight": read_q4_blocks(quantized("Q4_1"),
                                                                    "Q4_1")}) == 1
    assert isinstance(model.block.proj, Int4DecodeLinear)


# --- the real SmolLM2 GGUF (all linear layers Q4_1) ----------------------------------------------

@needs_int4
def test_smollm2_int4_path_is_as_faithful_as_bf16(smollm2_gguf_path):
    text = ("The history of bread begins in the Neolithic era, when people first ground grains "
            "into flour and mixed it with water. ") * 2
    fp32 = load_model(ModelConfig(model=str(smollm2_gguf_path), dtype="float32",
                                  gguf_int4=False))
    ids = fp32.tokenizer.encode(text)
    ref = prefill_logits(fp32, ids, force_int4=False)
    del fp32
    bf16 = load_model(ModelConfig(model=str(smollm2_gguf_path), dtype="bfloat16"))
    wrapped = [m for m in bf16.model.modules() if isinstance(m, Int4DecodeLinear)]
    # every Q4_1 linear layer, after fusion: qkv, o, gate_up, down
    assert len(wrapped) == 4 * bf16.config.num_hidden_layers
    dense = prefill_logits(bf16, ids, force_int4=False)
    int4 = prefill_logits(bf16, ids, force_int4=True)
    assert not torch.equal(int4, dense)  # the int4 kernel really ran
    dense_err, int4_err = (dense - ref).abs().mean(), (int4 - ref).abs().mean()
    assert int4_err < 1.5 * dense_err
    # q/k rows un-permuted like the dense weights, or attention would be scrambled
    assert (int4.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97


def test_smollm2_without_int4_keeps_plain_layers(smollm2_gguf_path):
    loaded = load_model(ModelConfig(model=str(smollm2_gguf_path), dtype="bfloat16",
                                    gguf_int4=False))
    assert not any(isinstance(m, Int4DecodeLinear) for m in loaded.model.modules())
