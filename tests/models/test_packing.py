"""Prepacked oneDNN bf16 linears compute exactly what ``F.linear`` computes."""

import pytest
import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.loader import load_model
from lmforge.models.packing import PackedLinear, can_pack, pack_linears_

pytestmark = pytest.mark.skipif(not can_pack(torch.bfloat16, torch.device("cpu")),
                                reason="this PyTorch build has no oneDNN")


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_is_bit_identical(rows, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    assert torch.equal(PackedLinear(linear)(x), linear(x))


def test_pack_replaces_every_linear_and_keeps_names():
    block = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4)))
    packed = pack_linears_(block.to(torch.bfloat16))
    assert isinstance(packed[0], PackedLinear) and isinstance(packed[1][0], PackedLinear)


def test_bf16_model_is_packed_and_fp32_is_not(tiny_llama_dir):
    bf16 = load_model(ModelConfig(model=str(tiny_llama_dir), dtype="bfloat16")).model
    fp32 = load_model(ModelConfig(model=str(tiny_llama_dir), dtype="float32")).model
    assert isinstance(bf16.model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert isinstance(bf16.model.layers[0].mlp.gate_up_proj, PackedLinear)
    assert isinstance(bf16.lm_head, PackedLinear)
    assert isinstance(fp32.model.layers[0].self_attn.qkv_proj, nn.Linear)
