"""Quantized weights kept quantized: GGUF block conversion against gguf's numpy dequantization
(every supported type, random blocks), and the compiled kernel against the PyTorch reference."""

import itertools
import os
import platform

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.forward import prefill_logits

from lmforge.config import ModelConfig
from lmforge.models.cpu_ext import quant_ext
from lmforge.models.loader import load_model
from lmforge.models.gguf_quant import SUPPORTED, read_quant
from lmforge.engine.memory import tensor_bytes
from lmforge.models.quant_linear import (
    TILED_KERNEL_MAX_ROWS,
    QuantEmbedding,
    QuantLinear,
    QuantWeight,
    concat_rows,
    quantize_activations,
)

# bytes per block, and the byte offsets of each f16 scale in it (ggml-common.h)
LAYOUT = {"Q4_0": (18, [0]), "Q4_1": (20, [0, 2]), "Q5_0": (22, [0]), "Q5_1": (24, [0, 2]),
          "Q8_0": (34, [0]), "Q4_K": (144, [0, 2]), "Q5_K": (176, [0, 2]), "Q6_K": (210, [208])}


def random_blocks(type_name: str, rows: int = 12, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Raw rows of random blocks: random code and sub-scale bits, finite random f16 scales."""
    size, f16_at = LAYOUT[type_name]
    per_block = 256 if type_name.endswith("_K") else 32
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, cols // per_block, size), dtype=np.uint8)
    for at in f16_at:
        d = rng.uniform(-0.05, 0.05, blocks.shape[:2]).astype(np.float16)
        blocks[..., at:at + 2] = d[..., None].view(np.uint8).reshape(*d.shape, 2)
    return blocks.reshape(rows, -1)


def test_every_type_of_the_table_is_covered():
    assert set(SUPPORTED) == set(LAYOUT)


@pytest.mark.parametrize("type_name", SUPPORTED)
def test_blocks_convert_exactly_as_gguf_dequantizes(type_name):
    data = random_blocks(type_name)
    w = read_quant(data, type_name)
    ref = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, type_name))
    assert w.shape == ref.shape == (12, 512)
    assert w.bits == {"Q4": 4, "Q5": 5}.get(type_name[:2], 8)
    assert w.group_size == (16 if type_name == "Q6_K" else 32)
    torch.testing.assert_close(w.dequantize(), torch.from_numpy(ref), rtol=1e-6, atol=1e-7)


def test_unsupported_types_stay_dense():
    assert read_quant(np.zeros((2, 64), np.uint8), "F16") is None
    assert read_quant(np.zeros((2, 84), np.uint8), "Q2_K") is None


def test_fusing_parts_of_different_formats_is_exact():
    parts = [read_quant(random_blocks(t, seed=i), t) for i, t in enumerate(["Q4_K", "Q6_K", "Q8_0"])]
    fused = concat_rows(parts)
    assert (fused.bits, fused.group_size, fused.zero.numel() > 0) == (8, 16, True)
    five = concat_rows([read_quant(random_blocks(t, seed=i), t) for i, t in enumerate(["Q5_0", "Q5_K"])])
    assert five.bits == 5 and five.high.shape == (24, 16)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    same = concat_rows(parts[:1] * 2)
    assert same.bits == 4 and torch.equal(same.dequantize(), parts[0].dequantize().repeat(2, 1))


def test_int8_activations_round_as_llama_cpp_q8_0():
    """Groups of 32: d = amax / 127, codes round(x / d) half to even within [-127, 127]."""
    x = torch.randn(3, 96) * torch.tensor([0.01, 1.0, 300.0]).repeat_interleave(32)
    x[2, 64:] = 0
    x[1, 33], x[1, 32] = 127 / 8, 2.5 / 8  # d = 1/8 exactly, and a tie at 2.5: rounds to 2
    q = quantize_activations(x)
    d = x.view(3, 3, 32).abs().amax(-1, keepdim=True) / 127
    codes = (q.view(3, 3, 32) / torch.where(d > 0, d, 1))
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert codes.round().abs().max() == 127
    assert ((q - x).view(3, 3, 32).abs() <= d / 2 * (1 + 1e-6)).all()  # half a step at most
    assert torch.equal(q[2, 64:], x[2, 64:])  # zeros stay zeros (d = 0)
    assert q[1, 32] == 2 / 8
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_activations(torch.randn(2, 48))


ext, why = quant_ext()
needs_ext = pytest.mark.skipif(ext is None, reason=f"no compiled kernel: {why}")


@needs_ext
@pytest.mark.parametrize("type_name", ["Q4_1", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0"])
# 16, 21: tiles on AVX-512; TILED_KERNEL_MAX_ROWS + 5: dequantize + GEMM on every build
@pytest.mark.parametrize("rows", [1, 3, 8, 11, 16, 21, TILED_KERNEL_MAX_ROWS + 5])
@pytest.mark.parametrize("int8", [False, True], ids=["float32-x", "int8-x"])
def test_kernel_matches_the_pytorch_reference(type_name, rows, int8):
    w = read_quant(random_blocks(type_name, rows=40, cols=544 if int8 else 512), type_name)
    k = w.shape[1]  # int8: 544 = 8.5 vectors of 64 codes, so the half-vector tail runs too
    gen = torch.Generator().manual_seed(rows)
    bias, x = torch.randn(40, generator=gen), torch.randn(rows, k, generator=gen)
    x[0, :32] = 0  # a group of zeros: d = 0
    ref = F.linear(quantize_activations(x) if int8 else x, w.dequantize(), bias)
    compiled, reference = QuantLinear(w, bias, ext), QuantLinear(w, bias, None)
    compiled.int8_activations = reference.int8_activations = int8
    # float32 sums of 512 products in another order (int8: the same codes, summed as integers
    # then scaled): relative to the outputs' scale
    torch.testing.assert_close(compiled(x), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(reference(x), ref, rtol=0, atol=0)
    # one fused multiply-add per weight against PyTorch's multiply, then add: 1 ulp at most
    torch.testing.assert_close(ext.dequantize(w.codes, w.scale, w.zero, w.high, w.bits), w.dequantize(),
                               rtol=2e-7, atol=0)


@needs_ext
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 targets")
@pytest.mark.parametrize("march, isa", [("haswell", "AVX2"), ("x86-64", "portable C++")])
def test_the_other_vector_paths_match_the_reference_too(march, isa):
    """The served build is ``-march=native`` (AVX-512 on some machines, AVX2 on others); the
    AVX2 and the portable C++ paths are built here too, so every path is tested on any CPU."""
    if ext.isa() == isa:
        pytest.skip(f"the native build is already {isa}")
    other, why = quant_ext(march)
    assert other is not None, why
    assert other.isa() == isa
    gen = torch.Generator().manual_seed(0)
    for type_name in ("Q4_1", "Q5_K", "Q6_K", "Q8_0"):
        w = read_quant(random_blocks(type_name, rows=40), type_name)
        for rows, int8 in itertools.product((1, 5, 8, 13), (False, True)):
            x = torch.randn(rows, 512, generator=gen)
            ref = F.linear(quantize_activations(x) if int8 else x, w.dequantize())
            out = other.quant_linear(x, w.codes, w.scale, w.zero, w.high, w.bits, int8)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
        torch.testing.assert_close(other.dequantize(w.codes, w.scale, w.zero, w.high, w.bits),
                                   w.dequantize(), rtol=2e-7, atol=0)


@needs_ext
def test_kernel_refuses_bad_shapes_with_a_clear_error():
    w = read_quant(random_blocks("Q4_0"), "Q4_0")
    with pytest.raises(RuntimeError, match="codes do not hold K"):
        ext.quant_linear(torch.randn(1, 256), w.codes, w.scale, w.zero, w.high, 4)
    with pytest.raises(RuntimeError, match="bits must be 4, 5 or 8"):
        ext.quant_linear(torch.randn(1, 512), w.codes, w.scale, w.zero, w.high, 3)
    with pytest.raises(RuntimeError, match="high must be"):  # 5 bits without the fifth bits
        ext.quant_linear(torch.randn(1, 512), w.codes, w.scale, w.zero, w.high, 5)


def test_quant_linear_keeps_codes_not_a_dense_weight():
    layer = QuantLinear(read_quant(random_blocks("Q4_K"), "Q4_K"), None, None)
    assert set(layer.state_dict()) == {"codes", "scale", "zero", "high"}
    assert layer.codes.dtype == torch.uint8 and layer.codes.shape == (12, 256)
    assert isinstance(layer.weight_q, QuantWeight)


# --- the real SmolLM2 GGUF: Q4_1 projections, a Q8_0 embedding tied to the LM head -----------

def load(path, **kw):
    return load_model(ModelConfig(model=str(path), dtype="float32", **kw))


@needs_ext
def test_smollm2_keeps_its_codes_and_matches_the_dense_model(smollm2_gguf_path, monkeypatch):
    codes, dense = load(smollm2_gguf_path), load(smollm2_gguf_path, gguf_int4=False)
    layers = [m for m in codes.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 4 * codes.config.num_hidden_layers + 1  # qkv, o, gate_up, down; head
    assert isinstance(codes.model.lm_head, QuantLinear) and codes.model.lm_head.weight_q.bits == 8
    embedding = codes.model.model.embed_tokens  # Q8_0, tied: one copy of the codes for both
    assert isinstance(embedding, QuantEmbedding)
    assert embedding.codes.data_ptr() == codes.model.lm_head.codes.data_ptr()
    torch.testing.assert_close(embedding(torch.tensor([[5, 7000]])),
                               dense.model.model.embed_tokens(torch.tensor([[5, 7000]])), rtol=0, atol=0)
    assert tensor_bytes(codes.model) < 0.25 * tensor_bytes(dense.model)  # 105 vs 517 MiB
    assert not any(isinstance(m, QuantLinear) for m in dense.model.modules())
    assert "compiled kernel: 120 4-bit and 1 8-bit layers" in codes.kernels
    assert "quantized kernels off: --no-gguf-int4" in dense.kernels
    ids = codes.tokenizer.encode("The history of bread begins in the Neolithic era, when people "
                                 "first ground grains into flour and mixed it with water.")
    ref = prefill_logits(dense, ids, force_int4=False)
    for max_rows in (10**9, 0):  # every row through the kernel; every row dequantized + GEMM
        for layer in layers:
            layer.max_rows = max_rows
        out = prefill_logits(codes, ids, force_int4=False)
        # the same weights (the codes decode exactly as gguf dequantizes): summation order only
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-3)
        assert torch.equal(out.argmax(-1), ref.argmax(-1))


@needs_ext
def test_smollm2_int8_activations_drift_as_llama_cpp_does(smollm2_gguf_path):
    """--int8-activations: each layer equals the reference on int8 codes (tests above); through
    30 layers a rounding flip in an early one grows, so the whole model is bounded by its drift
    from float32 activations (llama.cpp's own), and every path stays within it."""
    codes = load(smollm2_gguf_path, int8_activations=True)
    dense = load(smollm2_gguf_path, gguf_int4=False)
    layers = [m for m in codes.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 121 and all(m.int8_activations for m in layers)
    assert codes.kernels.startswith("int8 activations (groups of 32, as llama.cpp) on the GGUF's")
    ids = codes.tokenizer.encode("The history of bread begins in the Neolithic era, when people "
                                 "first ground grains into flour and mixed it with water.")
    ref = prefill_logits(dense, ids, force_int4=False)
    for max_rows in (10**9, 0):
        for layer in layers:
            layer.max_rows = max_rows
        assert_int8_activation_drift(prefill_logits(codes, ids, force_int4=False), ref)


def assert_int8_activation_drift(out: torch.Tensor, ref: torch.Tensor, kl_mean: float = 0.01):
    """``out`` (T, vocab) logits with int8 activations against float32 activations' ``ref``.
    Measured 2026-12-05 on SmolLM2 Q4_1: KL 0.0023-0.0029 nats a token on average, 0.007-0.009
    at most, 22 or 23 of 23 argmaxes; on Qwen2.5-Coder-0.5B Q4_K_M: 0.0007 on average. A wrong
    scale or code moves it by orders of magnitude."""
    kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert kl.mean() < kl_mean and kl.max() < 3 * kl_mean, kl
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@needs_ext
def test_smollm2_codes_come_back_from_the_weight_cache(smollm2_gguf_path, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    first = load(smollm2_gguf_path)
    cached = list((tmp_path / "weights").glob("*.safetensors"))
    assert len(cached) == 1
    second = load(smollm2_gguf_path)
    assert (tmp_path / "weights").glob("*.safetensors").__next__() == cached[0]
    for a, b in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    assert isinstance(second.model.lm_head, QuantLinear)
    assert second.model.model.embed_tokens.codes.data_ptr() == second.model.lm_head.codes.data_ptr()


def test_without_a_compiler_the_dense_path_runs_and_says_why(smollm2_gguf_path, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))  # no kernel built in here
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CXX", raising=False)
    quant_ext.cache_clear()
    try:
        assert quant_ext() == (None, "no C++ compiler (c++) on the PATH")
        loaded = load(smollm2_gguf_path)
    finally:
        quant_ext.cache_clear()
    assert not any(isinstance(m, QuantLinear) for m in loaded.model.modules())
    assert loaded.kernels == ("float32 dense (quantized kernels off: no C++ compiler (c++) "
                              "on the PATH)")


# --- opt-in: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Q5_0, Q4_K, Q6_K, Q8_0 layers) ---------------

QWEN = os.environ.get("LMFORGE_TEST_QWEN_GGUF")


@needs_ext
@pytest.mark.skipif(not QWEN, reason="opt-in: LMFORGE_TEST_QWEN_GGUF=$(python benchmarks/qwen_gguf.py)")
def test_qwen_k_quants_keep_their_codes_and_match_the_dense_model():
    codes, dense = load(QWEN), load(QWEN, gguf_int4=False)
    kinds = {(m.weight_q.bits, m.weight_q.group_size)
             for m in codes.model.modules() if isinstance(m, QuantLinear)}
    assert (8, 16) in kinds and (5, 32) in kinds  # Q6_K (fused with Q4_K parts), Q5_0
    ids = codes.tokenizer.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.")
    ref = prefill_logits(dense, ids, force_int4=False)
    out = prefill_logits(codes, ids, force_int4=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=5e-3)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    int8 = prefill_logits(load(QWEN, int8_activations=True), ids, force_int4=False)
    assert_int8_activation_drift(int8, ref, kl_mean=0.003)


def test_a_build_killed_midway_does_not_block_the_next_one(tmp_path):
    """A stale ``cpp_extension`` lock file (its builder was killed) is cleared by the next
    builder, which holds the flock; a second builder waits for the flock, not forever."""
    import multiprocessing
    import time

    from lmforge.models.cpu_ext import build_lock

    (tmp_path / "lock").write_text("")  # what a killed build leaves behind
    with build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
        waiter = multiprocessing.get_context("fork").Process(target=_take_lock, args=(tmp_path,))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive()  # it waits while this build runs
    waiter.join(timeout=30)
    assert waiter.exitcode == 0


def _take_lock(build_dir):
    from lmforge.models.cpu_ext import build_lock

    with build_lock(build_dir):
        pass
