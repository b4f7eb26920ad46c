"""The fused decode step (``models/fused_decode.py``, ``csrc/decode_layer.cpp``): every decoder
layer in one compiled call must generate what the layer-by-layer PyTorch path generates."""

import platform

import pytest
import torch

from lmforge.config import CacheConfig, EngineConfig, ModelConfig
from lmforge.engine.llm import LLM
from lmforge.engine.request import SamplingParams
from lmforge.models.attention import AttentionMetadata, PrefillChunk
from lmforge.models.cpu_ext import quant_ext
from lmforge.models.fused_decode import FusedDecoder
from lmforge.models.loader import load_model, resolve_dtype, serving_dtype

ext, why = quant_ext()
pytestmark = pytest.mark.skipif(ext is None, reason=f"no compiled kernel: {why}")

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a village at the edge of a very old forest, there lived",
           "Water boils at", "1, 2, 3, 5, 8,", "Translate to German: good morning"]


def generate_both(llm: LLM, fused: FusedDecoder, monkeypatch, max_tokens: int = 24):
    """Greedy outputs of PROMPTS (one batch) with the fused decoder and without, and how many
    steps the fused decoder ran."""
    calls = []
    call = FusedDecoder.__call__
    monkeypatch.setattr(FusedDecoder, "__call__",
                        lambda self, *a: calls.append(a[0].shape[0]) or call(self, *a))
    model = llm.engine.model_runner.model
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=1)
    outputs = []
    for decoder in (fused, None):
        model.fused_decoder = decoder
        outputs.append(llm.generate(PROMPTS, params, use_tqdm=False))
    model.fused_decoder = fused
    return outputs, calls


def assert_same_generations(fused_out, plain_out, atol: float):
    for a, b in zip(fused_out, plain_out):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x.logprob - y.logprob) <= atol


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    return LLM(str(smollm2_gguf_path), dtype="float32")


def test_smollm2_fused_steps_generate_what_the_layers_generate(smollm2, monkeypatch):
    model = smollm2.engine.model_runner.model
    assert isinstance(model.fused_decoder, FusedDecoder)
    assert model.fused_decoder.decoder.num_layers() == 30
    (fused, plain), calls = generate_both(smollm2, model.fused_decoder, monkeypatch)
    assert_same_generations(fused, plain, atol=2e-3)
    # every decode step ran fused: batches of 6 rows, then fewer as the shortest ones finish
    assert calls and max(calls) == len(PROMPTS) and len(calls) >= 23


# A K or V that differs in its last float32 bits (summation order) can round to the neighbouring
# float16 or bfloat16 value, and that difference then compounds over layers and tokens.
# Measured, max |logprob difference| fused vs layer path: 0.003 (float16), 0.004-0.014
# (bfloat16); the bfloat16 cache itself moves the layer path's logprobs by 0.04 from float32's.
@pytest.mark.parametrize("kv_dtype, atol", [("float16", 0.01), ("bfloat16", 0.03)])
def test_half_precision_kv_caches(smollm2_gguf_path, monkeypatch, kv_dtype, atol):
    """K/V stored as float16 (llama.cpp's default) or bfloat16: the decoder rounds what it writes
    as PyTorch's cast does and reads it back in float32, as the layer path does."""
    config = EngineConfig(model=ModelConfig(model=str(smollm2_gguf_path), dtype="float32"),
                          cache=CacheConfig(kv_cache_dtype=kv_dtype))
    llm = LLM(str(smollm2_gguf_path), config=config)
    assert llm.engine.model_runner.kv_caches[0][0].dtype == getattr(torch, kv_dtype)
    (fused, plain), calls = generate_both(llm, llm.engine.model_runner.model.fused_decoder,
                                          monkeypatch, max_tokens=12)
    assert calls
    assert_same_generations(fused, plain, atol=atol)


def test_qwen2_biases_and_grouped_query_heads_under_int8(tiny_qwen2_dir, monkeypatch):
    llm = LLM(str(tiny_qwen2_dir), quantization="int8")
    model = llm.engine.model_runner.model
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None
    (fused, plain), calls = generate_both(llm, model.fused_decoder, monkeypatch)
    assert calls
    assert_same_generations(fused, plain, atol=1e-4)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 targets")
@pytest.mark.parametrize("march", ["haswell", "x86-64"])
def test_the_other_vector_paths_generate_the_same(smollm2, monkeypatch, march):
    """The AVX2 and portable C++ builds of the decoder, on this CPU."""
    other, why_not = quant_ext(march)
    assert other is not None, why_not
    model = smollm2.engine.model_runner.model
    (fused, plain), calls = generate_both(smollm2, FusedDecoder(model, other), monkeypatch,
                                          max_tokens=8)
    assert calls
    assert_same_generations(fused, plain, atol=2e-3)


@pytest.fixture(scope="module")
def smollm2_int8(smollm2_gguf_path):
    return LLM(str(smollm2_gguf_path), dtype="float32", int8_activations=True)


@pytest.mark.parametrize("march", ["native", "haswell", "x86-64"])
def test_int8_activations_fused_and_layer_by_layer(smollm2_int8, monkeypatch, march):
    """--int8-activations: the decoder quantizes each projection's input as QuantLinear does
    (csrc/q8_kernels.h), on the native, AVX2 and portable builds.

    Tokens cannot be compared as above: a last-bit difference (summation order in a norm or in
    attention) can flip one activation's int8 rounding, and in a group holding one of SmolLM2's
    outliers (hundreds) a step is worth several units; through 30 layers that grows to the drift
    of int8 activations themselves (llama.cpp's). So: one decode step of both paths from the
    same prefill, bounded as that drift (measured: KL at most 0.0103 nats, all 6 argmaxes; a
    wrong head, position or cache slot gives whole nats)."""
    if march != "native" and platform.machine() != "x86_64":
        pytest.skip("x86 targets")
    build, why_not = quant_ext(march)
    assert build is not None, why_not
    model = smollm2_int8.engine.model_runner.model
    fused = FusedDecoder(model, build)
    hidden = []
    handle = model.model.register_forward_hook(lambda mod, args, out: hidden.append(out))
    logits = []
    try:
        for decoder in (fused, None):
            model.fused_decoder = decoder
            hidden.clear()
            smollm2_int8.generate(PROMPTS, SamplingParams(max_tokens=2, temperature=0),
                                  use_tqdm=False)
            assert hidden[-1].shape == (len(PROMPTS), 576)  # the decode step, after the prefill
            logits.append(model.compute_logits(hidden[-1]))
    finally:
        handle.remove()
        model.fused_decoder = fused
    out, ref = logits
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    assert kl.mean() < 0.01 and kl.max() < 0.03, kl
    assert (out.argmax(-1) == ref.argmax(-1)).sum() >= len(PROMPTS) - 1


def test_only_steps_of_single_token_decodes_apply(smollm2):
    fused = smollm2.engine.model_runner.model.fused_decoder
    caches = [(torch.zeros(3, 8, 64), torch.zeros(3, 8, 64))]
    x = torch.zeros(2, 576)
    decode = AttentionMetadata(torch.arange(2), 4, num_decodes=2, decode_rows=None,
                               decode_bias=None, prefills=[], decode_tables=torch.zeros(2, 1),
                               decode_lens=torch.ones(2))
    assert fused.applies(x, caches, decode)
    mixed = AttentionMetadata(torch.arange(2), 4, num_decodes=1, decode_rows=None,
                              decode_bias=None, prefills=[PrefillChunk(1, 2, None, None)],
                              decode_tables=torch.zeros(1, 1), decode_lens=torch.ones(1))
    assert not fused.applies(x, caches, mixed)
    too_many = torch.zeros(fused.max_rows + 1, 576)  # dequantize + GEMM is faster there
    assert fused.max_rows >= 32 and not fused.applies(too_many, caches, decode)
    int8 = [(c.to(torch.int8), c.to(torch.int8)) for c, _ in caches]
    assert not fused.applies(x, int8, decode)


def test_layer_path_models_build_no_fused_decoder(smollm2_gguf_path, tiny_gpt2_dir):
    dense = LLM(str(smollm2_gguf_path), dtype="float32", gguf_int4=False)
    assert dense.engine.model_runner.model.fused_decoder is None  # no QuantLinear layers
    deterministic = LLM(str(smollm2_gguf_path), dtype="float32", deterministic=True)
    assert deterministic.engine.model_runner.model.fused_decoder is None
    gpt2 = LLM(str(tiny_gpt2_dir), quantization="int8")  # not a Llama-family stack
    assert getattr(gpt2.engine.model_runner.model, "fused_decoder", None) is None


def test_the_decoder_refuses_inputs_that_do_not_fit(smollm2):
    decoder = smollm2.engine.model_runner.model.fused_decoder.decoder
    rotary = smollm2.engine.model_runner.model.model.rotary
    caches = [torch.zeros(3, 16, 64)] * 30
    one = torch.zeros(1, dtype=torch.int64)
    args = dict(x=torch.zeros(1, 576), cos=rotary.cos, sin=rotary.sin, positions=one,
                k_caches=caches, v_caches=caches, slots=one, tables=torch.zeros(1, 4, dtype=torch.int64),
                lens=torch.ones(1, dtype=torch.int64), block_size=4)
    decoder.forward(*args.values())  # fits
    for change, message in [({"k_caches": [c.bfloat16() for c in caches]}, "like the first"),
                            ({"k_caches": [c.int() for c in caches],
                              "v_caches": [c.int() for c in caches]}, "float32, float16 or bf"),
                            ({"k_caches": caches[:2]}, "one K and one V cache per layer"),
                            ({"positions": one + 10**7}, "out of range"),
                            ({"slots": one + 16}, "slot out of range"),
                            ({"lens": one * 17}, "out of range"),
                            ({"x": torch.zeros(1, 64)}, "must be \\(M, hidden\\)")]:
        with pytest.raises(RuntimeError, match=message):
            decoder.forward(*{**args, **change}.values())


def test_auto_dtype_serves_a_quantized_gguf_in_float32(smollm2_gguf_path, tiny_llama_dir):
    """``--dtype auto``: float32 (codes + the fused decoder) for a quantized GGUF where the
    kernel builds; bf16-or-float32 by the CPU as before for the rest."""
    cpu = torch.device("cpu")
    gguf = ModelConfig(model=str(smollm2_gguf_path))
    assert serving_dtype(gguf, smollm2_gguf_path, cpu) == torch.float32
    assert "one compiled call" in load_model(gguf).kernels
    for cfg, path in [(ModelConfig(model=str(smollm2_gguf_path), deterministic=True), smollm2_gguf_path),
                      (ModelConfig(model=str(smollm2_gguf_path), gguf_int4=False), smollm2_gguf_path),
                      (ModelConfig(model=str(tiny_llama_dir)), tiny_llama_dir)]:
        assert serving_dtype(cfg, path, cpu) == resolve_dtype("auto", cpu)
    assert serving_dtype(gguf, smollm2_gguf_path, cpu, for_training=True) == resolve_dtype("auto", cpu)
