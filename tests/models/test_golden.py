"""Golden tests: our logits equal Hugging Face's on the same weights (minGPT's
test_huggingface_import.py), through the paged KV cache, chunked prefill and decode paths."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmforge.engine.llm_engine import LLMEngine
from lmforge.engine.request import SamplingParams

FAMILIES = ["tiny_llama_dir", "tiny_llama3_dir", "tiny_qwen2_dir", "tiny_gpt2_dir",
            "tiny_gpt1_dir"]


def teacher_forced_logits(engine: LLMEngine, prompt: list[int], continuation: list[int]):
    """Run the engine's scheduler + model runner, feeding ``continuation`` as the sampled tokens.

    Returns (len(continuation), vocab) logits: the engine's prediction after the prompt and
    after each forced token.
    """
    engine.add_request("golden", prompt, SamplingParams(max_tokens=len(continuation),
                                                        ignore_eos=True))
    forced, rows = iter(continuation), []
    while engine.has_unfinished_requests():
        out = engine.scheduler.schedule()
        logits = engine.model_runner.execute(out).logits
        rows.extend(logits)
        engine.scheduler.update(out, [next(forced) for _ in out.sampling_requests()])
    return torch.stack(rows)


def make_engine(model_dir, budget: int) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=ModelConfig(model=str(model_dir), dtype="float32"),
        cache=CacheConfig(block_size=4, num_blocks=160),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget)))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [512, 7], ids=["one-prefill", "chunked-prefill"])
def test_logits_match_hugging_face(family, budget, request):
    model_dir = request.getfixturevalue(family)
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (40,)).tolist()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]  # (40, vocab)
    ours = teacher_forced_logits(make_engine(model_dir, budget), ids[:23], ids[23:])
    torch.testing.assert_close(ours, ref[22:39], rtol=1e-4, atol=1e-4)


def test_llama3_rope_scaling_is_exercised(tiny_llama3_dir):
    from lmforge.models.loader import load_model

    loaded = load_model(ModelConfig(model=str(tiny_llama3_dir)))
    assert loaded.config.rope_scaling["rope_type"] == "llama3"
    assert not loaded.config.tie_word_embeddings


def test_qwen2_has_qkv_bias(tiny_qwen2_dir):
    from lmforge.models.loader import load_model

    loaded = load_model(ModelConfig(model=str(tiny_qwen2_dir)))
    # fused at load: q|k|v biases side by side (the golden logits above prove they are applied)
    qkv = loaded.model.model.layers[0].self_attn.qkv_proj
    assert qkv.bias is not None and qkv.bias.abs().sum() > 0


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_bf16_runs_close_to_fp32(tiny_llama_dir, dtype):
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (20,)).tolist()
    cfg = dict(cache=CacheConfig(block_size=4, num_blocks=160))
    ref = teacher_forced_logits(LLMEngine(EngineConfig(
        model=ModelConfig(model=str(tiny_llama_dir), dtype="float32"), **cfg)), ids[:10], ids[10:])
    low = teacher_forced_logits(LLMEngine(EngineConfig(
        model=ModelConfig(model=str(tiny_llama_dir), dtype=dtype), **cfg)), ids[:10], ids[10:])
    assert low.dtype == torch.float32  # logits are always returned in float32
    torch.testing.assert_close(low, ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("family", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_fused_projections_compute_what_the_hf_named_layers_do(family, request):
    """The loader fuses q|k|v and gate|up; the unfused model (what training uses) must agree."""
    from safetensors.torch import load_file

    from lmforge.models.attention import AttentionMetadata, PrefillChunk
    from lmforge.models.loader import build_model, hf_config_to_llama

    model_dir = request.getfixturevalue(family)
    config = hf_config_to_llama(json.loads((model_dir / "config.json").read_text()))
    state = load_file(next(model_dir.glob("*.safetensors")))
    unfused = build_model(config, dict(state), torch.float32, torch.device("cpu"))
    fused = build_model(config, dict(state), torch.float32, torch.device("cpu"))
    fused.fuse_projections_()
    assert not hasattr(fused.model.layers[0].self_attn, "q_proj")
    t = 9
    ids = torch.randint(0, config.vocab_size, (t,), generator=torch.Generator().manual_seed(0))

    def logits(model):
        caches = [tuple(torch.zeros(*model.kv_cache_shape(t)) for _ in range(2))
                  for _ in range(config.num_hidden_layers)]
        meta = AttentionMetadata(torch.arange(t), 1, 0, None, None, [PrefillChunk(0, t, None, None)])
        with torch.no_grad():
            return model.compute_logits(model(ids, torch.arange(t), caches, meta))

    torch.testing.assert_close(logits(fused), logits(unfused), rtol=1e-5, atol=1e-5)
