"""The GPT family (models/gpt.py) against Hugging Face's GPT2LMHeadModel / OpenAIGPTLMHeadModel on
the same weights: greedy generations token for token through the batching engine, embeddings,
beam search, PEFT LoRA adapters both ways, and the loader's GPT checkpoints. The logits through
prefill, chunked prefill and decode are the shared golden test (test_golden.py's FAMILIES)."""

import asyncio
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

from lmforge.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmforge.engine.beam_search import BeamSearchParams, beam_search
from lmforge.engine.llm import LLM
from lmforge.engine.llm_engine import LLMEngine
from lmforge.engine.request import SamplingParams
from lmforge.errors import ModelLoadError
from lmforge.models.gpt import GPTConfig, GPTLMHeadModel
from lmforge.models.gpt_hf import gpt_state_dict_from_hf
from lmforge.models.loader import build_model, hf_config, load_model
from lmforge.models.lora import LoRAConfig, inject_lora, load_peft_adapter, save_peft_adapter
from lmforge.models.multi_lora import lora_targets
from lmforge.training.forward import causal_lm_logits

FAMILIES = ["tiny_gpt2_dir", "tiny_gpt1_dir"]
GPT_TARGETS = ["c_attn", "c_proj", "c_fc"]
PROMPTS = [list(range(100, 117)), list(range(500, 509)), list(range(900, 931)), [42]]
MAX_TOKENS = 12


def engine_config(model_dir, budget: int = 512, max_loras: int = 4) -> EngineConfig:
    return EngineConfig(model=ModelConfig(model=str(model_dir), dtype="float32"),
                        cache=CacheConfig(block_size=4, num_blocks=160, max_loras=max_loras),
                        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget))


def hf_greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                               dtype=torch.long),
                             do_sample=False, max_new_tokens=MAX_TOKENS, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def our_greedy(engine: LLMEngine, jobs: list[tuple[list[int], str | None]]) -> list[list[int]]:
    """All (prompt, adapter) jobs added at once, stepped to the end: generated ids per job."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    out = {f"r{i}": [] for i in range(len(jobs))}
    for i, (prompt, lora) in enumerate(jobs):
        engine.add_request(f"r{i}", prompt, params, lora=lora)
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id].extend(o.token_ids)
    return list(out.values())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [512, 7], ids=["one-prefill", "chunked-prefill"])
def test_batched_greedy_generation_equals_hugging_face(family, budget, request):
    """Four prompts at once (decodes next to chunked prefills at budget 7) equal HF's
    ``generate`` run on each prompt alone, token for token; so does our engine one at a time."""
    model_dir = request.getfixturevalue(family)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ref = [hf_greedy(hf, p) for p in PROMPTS]
    llm = LLM(str(model_dir), config=engine_config(model_dir, budget))
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
                        use_tqdm=False)
    assert [o.token_ids for o in outs] == ref
    alone = [llm.generate([p], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
                          use_tqdm=False)[0].token_ids for p in PROMPTS]
    assert alone == ref
    assert any(len(set(r)) > 2 for r in ref)  # the random model does not just repeat a token


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [512, 7], ids=["one-piece", "pieces"])
def test_embeddings_match_hugging_face_hidden_states(family, budget, request):
    model_dir = request.getfixturevalue(family)
    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        rows = [hf(torch.tensor([p])).last_hidden_state[0].mean(0) for p in PROMPTS]
    engine = LLMEngine(engine_config(model_dir, budget))
    task = engine.start_embedding(PROMPTS)
    while not task.step():
        pass
    torch.testing.assert_close(task.result(), F.normalize(torch.stack(rows), dim=-1),
                               rtol=0, atol=1e-5)


def test_beam_search_equals_hugging_face(tiny_gpt2_dir):
    from lmforge.engine.async_engine import AsyncEngine

    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, dtype=torch.float32).eval()
    prompt = PROMPTS[1]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), num_beams=4, num_return_sequences=2,
                          do_sample=False, max_new_tokens=8, pad_token_id=0,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    engine = AsyncEngine.from_config(engine_config(tiny_gpt2_dir))
    engine.start()
    try:
        out = asyncio.run(beam_search(engine, "beam", prompt,
                                      BeamSearchParams(beam_width=4, max_tokens=8), 2))
    finally:
        engine.shutdown()
    assert [s.token_ids for s in out.sequences] == [r[len(prompt):].tolist() for r in ref]


# --- LoRA: PEFT adapters both ways -----------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_adapters(tiny_gpt2_dir, tmp_path_factory, make_peft_adapter):
    """Two random adapters saved by peft on the tiny GPT-2 (Conv1D layers: fan_in_fan_out)."""
    root = tmp_path_factory.mktemp("gpt2_adapters")
    return {"all": make_peft_adapter(tiny_gpt2_dir, root / "all", 1, GPT_TARGETS),
            "attn": make_peft_adapter(tiny_gpt2_dir, root / "attn", 2, ["c_attn"])}


def peft_merged(model_dir, adapter_dir):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(hf, adapter_dir).merge_and_unload().eval()


def test_lora_targets_are_gpt2s_projections(tiny_gpt2_dir):
    model = load_model(ModelConfig(model=str(tiny_gpt2_dir), dtype="float32")).model
    targets = lora_targets(model)
    assert sorted(targets) == sorted(f"transformer.h.{i}.{name}" for i in range(2)
                                     for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                  "mlp.c_proj"))
    assert targets["transformer.h.0.attn.c_attn"] == [("transformer.h.0.attn.c_attn", 192)]


def test_peft_gpt2_adapters_serve_with_the_merged_models_outputs(tiny_gpt2_dir, gpt2_adapters):
    """PEFT's GPT-2 adapters (``fan_in_fan_out``: true) load, and one batch mixing them with the
    base model greedily generates what peft's merged model generates for each alone."""
    raw = json.loads((Path(gpt2_adapters["all"]) / "adapter_config.json").read_text())
    assert raw["fan_in_fan_out"] is True
    config, weights = load_peft_adapter(gpt2_adapters["all"])
    assert config.fan_in_fan_out and set(config.target_modules) == set(GPT_TARGETS)
    a = weights["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = weights["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert (a.shape, b.shape) == ((4, 64), (192, 4))  # Linear-shaped A (r, in), B (out, r)

    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, dtype=torch.float32).eval()
    merged = {name: peft_merged(tiny_gpt2_dir, d) for name, d in gpt2_adapters.items()}
    jobs = [(PROMPTS[0], "all"), (PROMPTS[1], None), (PROMPTS[2], "attn"), (PROMPTS[0], None)]
    ref = [hf_greedy(merged[lora] if lora else base, p) for p, lora in jobs]
    assert ref[0] != ref[3]  # the adapter changes the generation
    engine = LLMEngine(engine_config(tiny_gpt2_dir, budget=7))
    for name, directory in gpt2_adapters.items():
        engine.add_lora(name, str(directory))
    assert our_greedy(engine, jobs) == ref

    # and the logits of a whole prompt equal the merged model's
    ids = list(range(200, 230))
    with torch.no_grad():
        want = merged["all"](torch.tensor([ids])).logits[0]
    engine.loras.activate({"all"})
    with engine.loras.applying(["all"], [len(ids)]):
        ours = causal_lm_logits(engine.model_runner.model, torch.tensor([ids]))[0]
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


def unfused_gpt(model_dir) -> GPTLMHeadModel:
    config = hf_config(json.loads((model_dir / "config.json").read_text()))
    state = gpt_state_dict_from_hf(load_file(model_dir / "model.safetensors"), config)
    return build_model(config, state, torch.float32, torch.device("cpu"))


def test_an_adapter_we_train_on_gpt2_loads_in_peft(tiny_gpt2_dir, tmp_path):
    model = unfused_gpt(tiny_gpt2_dir)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoRAConfig(r=4, lora_alpha=8, target_modules=tuple(GPT_TARGETS))
    assert len(inject_lora(model, lora)) == 8  # c_attn, c_proj (attn and mlp), c_fc per block
    torch.manual_seed(0)
    batch = torch.randint(0, 49152, (2, 12))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):  # a few steps of next-token training through the training forward
        logits = causal_lm_logits(model, batch)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items()
             if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # base weights untouched
    assert model.transformer.h[0].attn.c_attn.lora_B.weight.abs().sum() > 0  # B trained

    save_peft_adapter(model, lora, tmp_path / "ours", str(tiny_gpt2_dir))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"]
    ids = torch.tensor([list(range(300, 325))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_logits(model, ids), peft_model(ids).logits,
                                   rtol=1e-4, atol=1e-4)


# --- the loader ------------------------------------------------------------------------------

def test_gpt_configs_read_from_hugging_face(tiny_gpt2_dir, tiny_gpt1_dir):
    gpt2 = load_model(ModelConfig(model=str(tiny_gpt2_dir), dtype="float32"))
    gpt1 = load_model(ModelConfig(model=str(tiny_gpt1_dir), dtype="float32"))
    assert isinstance(gpt2.model, GPTLMHeadModel) and isinstance(gpt1.model, GPTLMHeadModel)
    assert (gpt2.config.architecture, gpt2.config.pre_norm) == ("gpt2", True)
    assert (gpt1.config.architecture, gpt1.config.pre_norm) == ("openai-gpt", False)
    assert gpt1.config.activation_function == "gelu_new"  # GPT-1's afn "gelu" is the tanh form
    cfg = gpt2.config  # the names the engine reads
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
            cfg.max_position_embeddings, cfg.intermediate_size) == (2, 4, 16, 64, 128, 256)
    assert gpt2.model.lm_head.weight is gpt2.model.transformer.wte.weight  # tied
    assert not hasattr(gpt1.model.transformer, "ln_f")
    assert LLMEngine(engine_config(tiny_gpt2_dir)).max_model_len == 128


def test_original_gpt2_files_load(tiny_gpt2_dir, tmp_path):
    """openai-community/gpt2's layout: the trunk's names without ``transformer.`` and the old
    causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` next to the weights."""
    old = tmp_path / "gpt2-old"
    shutil.copytree(tiny_gpt2_dir, old)
    state = load_file(old / "model.safetensors")
    renamed = {k.removeprefix("transformer."): v for k, v in state.items()}
    for i in range(2):
        renamed[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        renamed[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(renamed, old / "model.safetensors")
    config = json.loads((old / "config.json").read_text())
    del config["architectures"]  # found by model_type
    (old / "config.json").write_text(json.dumps(config))
    ours = load_model(ModelConfig(model=str(old), dtype="float32")).model
    want = load_model(ModelConfig(model=str(tiny_gpt2_dir), dtype="float32")).model
    ids = torch.tensor([PROMPTS[0]])
    torch.testing.assert_close(causal_lm_logits(ours, ids), causal_lm_logits(want, ids))


@pytest.mark.parametrize("change, match", [
    ({"activation_function": "mish"}, "activation 'mish'"),
    ({"add_cross_attention": True}, "cross-attention"),
    ({"architectures": ["BertForMaskedLM"]}, "GPT2LMHeadModel"),
])
def test_unsupported_gpt_configs_name_the_problem(tiny_gpt2_dir, change, match):
    config = json.loads((tiny_gpt2_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=match):
        hf_config({**config, **change})


def test_scale_by_inverse_layer_index():
    cfg = GPTConfig(vocab_size=10, n_positions=8, n_embd=8, n_layer=2, n_head=2,
                    scale_attn_by_inverse_layer_idx=True)
    model = GPTLMHeadModel(cfg)
    assert [b.attn.scale for b in model.transformer.h] == [0.5, 0.25]  # 1/sqrt(4) / (i + 1)
