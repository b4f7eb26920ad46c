"""LoRA layers and the PEFT format: inject_lora, save/load round trips with `peft` both ways,
and served adapters whose logits equal transformers + peft on the same weights."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lmforge.config import CacheConfig, EngineConfig, ModelConfig
from lmforge.engine.llm_engine import LLMEngine
from lmforge.errors import InvalidRequestError, ModelLoadError
from lmforge.models.attention import AttentionMetadata, PrefillChunk
from lmforge.models.loader import build_model, hf_config_to_llama
from lmforge.models.lora import (
    LoRAConfig,
    LoRALinear,
    inject_lora,
    load_peft_adapter,
    lora_state_dict,
    save_peft_adapter,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Our model's (T, vocab) logits for one sequence, as one prefill over a scratch KV cache."""
    t = len(ids)
    kv = [(torch.zeros(model.kv_cache_shape(t)), torch.zeros(model.kv_cache_shape(t)))
          for _ in model.model.layers]
    meta = AttentionMetadata(slot_mapping=torch.arange(t), block_size=t, num_decodes=0,
                             decode_rows=None, decode_bias=None,
                             prefills=[PrefillChunk(0, t, None, None)])
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(t), kv, meta))


def unfused_model(model_dir):
    """Our LlamaForCausalLM in float32 with HF-named (unfused) projections, as for training."""
    from safetensors.torch import load_file

    config = hf_config_to_llama(json.loads((model_dir / "config.json").read_text()))
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    return build_model(config, state, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def peft_adapter_dir(tiny_llama_dir, tmp_path_factory):
    """A random adapter made and saved by peft on the tiny HF Llama (r 4, alpha 8, all 7
    projections, non-zero B)."""
    torch.manual_seed(1)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                               task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    directory = tmp_path_factory.mktemp("peft_adapter")
    peft_model.save_pretrained(directory)
    return directory


def peft_logits(model_dir, adapter_dir, ids) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_inject_lora_trains_only_adapters_and_starts_at_base(tiny_llama_dir):
    model = unfused_model(tiny_llama_dir)
    ids = list(range(100, 120))
    before = full_logits(model, ids)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    names = inject_lora(model, LoRAConfig(r=4, target_modules=("q_proj", "v_proj")))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj",
                                                                                    "v_proj")]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(names)
    torch.testing.assert_close(full_logits(model, ids), before)  # B is zero-initialized
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.lora_A.weight.abs().sum() > 0
    # gradients reach the adapters only
    t = len(ids)
    kv = [(torch.zeros(model.kv_cache_shape(t)), torch.zeros(model.kv_cache_shape(t)))
          for _ in model.model.layers]
    meta = AttentionMetadata(torch.arange(t), t, 0, None, None, [PrefillChunk(0, t, None, None)])
    model.compute_logits(model(torch.tensor(ids), torch.arange(t), kv, meta)).sum().backward()
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0
    assert layer.base.weight.grad is None
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items()
             if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in base.items())


def test_inject_lora_errors_name_the_fix(tiny_llama_dir):
    model = unfused_model(tiny_llama_dir)
    with pytest.raises(ValueError, match="target_modules"):
        inject_lora(model, LoRAConfig(target_modules=("lm_head",)))
    with pytest.raises(ValueError, match="rank"):
        inject_lora(model, LoRAConfig(r=0))
    model.fuse_projections_()
    with pytest.raises(ValueError, match="fuse_projections_"):
        inject_lora(model, LoRAConfig(target_modules=("q_proj",)))


def test_peft_adapter_loads_and_serves_with_peft_logits(tiny_llama_dir, peft_adapter_dir):
    config, weights = load_peft_adapter(peft_adapter_dir)
    assert (config.r, config.lora_alpha, config.scaling) == (4, 8, 2.0)
    assert set(config.target_modules) == set(TARGETS)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in weights
    ids = list(range(200, 230))
    ref = peft_logits(tiny_llama_dir, peft_adapter_dir, ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(base(torch.tensor([ids])).logits[0], ref, atol=1e-3)
    # the served (fused) model with the adapter, through the multi-LoRA path
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(tiny_llama_dir),
                                                      dtype="float32"),
                                    cache=CacheConfig(block_size=4, num_blocks=160)))
    engine.add_lora("peft", str(peft_adapter_dir))
    engine.loras.activate({"peft"})
    with engine.loras.applying(["peft"], [len(ids)]):
        ours = full_logits(engine.model_runner.model, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # outside ``applying`` the same wrapped model is the base model again
    with torch.no_grad():
        torch.testing.assert_close(full_logits(engine.model_runner.model, ids),
                                   base(torch.tensor([ids])).logits[0], rtol=1e-4, atol=1e-4)


def test_our_adapter_loads_in_peft_with_matching_logits(tiny_llama_dir, tmp_path):
    model = unfused_model(tiny_llama_dir)
    config = LoRAConfig(r=4, lora_alpha=16, target_modules=("q_proj", "v_proj", "down_proj"))
    inject_lora(model, config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    out = tmp_path / "ours"
    save_peft_adapter(model, config, out, base_model_name_or_path=str(tiny_llama_dir))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM"
    assert sorted(saved["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert not list(tmp_path.glob(".ours-*"))  # the temp dir was renamed away
    ids = list(range(300, 325))
    torch.testing.assert_close(full_logits(model, ids),
                               peft_logits(tiny_llama_dir, out, ids), rtol=1e-4, atol=1e-4)
    # and back: load_peft_adapter returns the same tensors
    loaded_config, weights = load_peft_adapter(out)
    assert loaded_config.target_modules == ("q_proj", "v_proj", "down_proj")
    ours = lora_state_dict(model)
    assert weights.keys() == ours.keys()
    assert all(torch.equal(weights[k], ours[k]) for k in ours)


def test_rslora_scaling():
    assert LoRAConfig(r=16, lora_alpha=8).scaling == 0.5
    assert LoRAConfig(r=16, lora_alpha=8, use_rslora=True).scaling == 2.0


@pytest.mark.parametrize("change, match", [
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "only LoRA"),
])
def test_unsupported_adapter_options_are_refused(peft_adapter_dir, tmp_path, change, match):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(peft_adapter_dir, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ModelLoadError, match=match):
        load_peft_adapter(bad)


def test_missing_adapter_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        load_peft_adapter(tmp_path / "nowhere")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="JSON"):
        load_peft_adapter(tmp_path)


def test_adapter_for_another_model_is_refused(tiny_qwen2_dir, tiny_llama_dir, tmp_path):
    # same layer names, other shapes: a tiny model with another hidden size
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    peft_model = get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "other")
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(tiny_llama_dir),
                                                      dtype="float32"),
                                    cache=CacheConfig(block_size=4, num_blocks=160)))
    engine.add_lora("other", str(tmp_path / "other"))
    with pytest.raises(ModelLoadError, match="does not fit this model"):
        engine.add_request("r", [1, 2, 3], _params(), lora="other")
    with pytest.raises(InvalidRequestError, match="'nope'"):
        engine.add_request("r", [1, 2, 3], _params(), lora="nope")
    assert not engine.has_unfinished_requests()


def _params():
    from lmforge.engine.request import SamplingParams

    return SamplingParams(max_tokens=2, temperature=0.0)
