"""Multi-LoRA serving: one batch mixes the base model and several adapters, and each request gets
what it gets alone; adapters never share prefix-cache blocks; the resident limit evicts."""

import asyncio

import pytest
import torch

from lmforge.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmforge.engine.async_engine import AsyncEngine
from lmforge.engine.llm_engine import LLMEngine
from lmforge.engine.request import SamplingParams
from lmforge.errors import InvalidRequestError
from lmforge.models.multi_lora import (
    LoRABatch,
    LoRAContext,
    MultiLoRALinear,
    lora_targets,
)
from lmforge.models.packing import PackedLinear, can_pack
from lmforge.models.quant_linear import QuantLinear

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory, make_peft_adapter):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": make_peft_adapter(tiny_llama_dir, root / "a", 1,
                                   ["q_proj", "v_proj", "down_proj"]),
            "b": make_peft_adapter(tiny_llama_dir, root / "b", 2,
                                   ["k_proj", "o_proj", "gate_proj", "up_proj"])}


def make_engine(model_dir, adapters, max_loras=8, budget=512, quantization=None) -> LLMEngine:
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=str(model_dir), dtype="float32", quantization=quantization),
        cache=CacheConfig(block_size=4, num_blocks=256, max_loras=max_loras),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget)))
    for name, directory in adapters.items():
        engine.add_lora(name, directory)
    return engine


def run(engine: LLMEngine, jobs: list[tuple[list[int], str | None]]) -> list[list[int]]:
    """Add every (prompt, adapter) at once, step to the end; generated ids per job."""
    out = {f"r{i}": [] for i in range(len(jobs))}
    for i, (prompt, lora) in enumerate(jobs):
        engine.add_request(f"r{i}", prompt, GREEDY, lora=lora)
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id].extend(o.token_ids)
    return list(out.values())


PROMPTS = [list(range(100, 117)), list(range(500, 509)), list(range(900, 931)),
           list(range(1500, 1512)), list(range(2000, 2005))]
JOBS = [(PROMPTS[0], None), (PROMPTS[1], "a"), (PROMPTS[2], "b"), (PROMPTS[3], "a"),
        (PROMPTS[4], None), (PROMPTS[0], "a"), (PROMPTS[0], "b")]  # + the same prompt twice


@pytest.fixture(scope="module")
def alone(tiny_llama_dir, adapters):
    """Each job's output when it runs alone."""
    engine = make_engine(tiny_llama_dir, adapters)
    return [run(engine, [job])[0] for job in JOBS]


@pytest.mark.parametrize("budget", [512, 16], ids=["one-step-prefill", "chunked-mixed"])
def test_mixed_batch_equals_each_alone(tiny_llama_dir, adapters, alone, budget):
    engine = make_engine(tiny_llama_dir, adapters, budget=budget)
    assert run(engine, JOBS) == alone
    # the adapters matter: the same prompt gives three different outputs
    assert len({tuple(alone[i]) for i in (0, 5, 6)}) == 3


def test_adapters_do_not_share_prefix_cache_blocks(tiny_llama_dir, adapters):
    engine = make_engine(tiny_llama_dir, adapters)
    prompt = list(range(3000, 3020))  # 5 full blocks of 4
    ids = iter(range(100))

    def cached(lora):
        engine.add_request(f"p{next(ids)}", prompt, GREEDY, lora=lora)
        hits = None
        while engine.has_unfinished_requests():
            for o in engine.step():
                hits = o.num_cached_tokens
        return hits

    assert cached(None) == 0
    assert cached("a") == 0  # the base model's blocks hold other K/V
    assert cached("b") == 0
    assert cached("a") == 16  # the same adapter reuses its own (all but the last block)
    assert cached(None) == 16
    # re-registering a name is a new adapter: its old blocks are not reused
    engine.remove_lora("a")
    engine.add_lora("a", adapters["a"])
    assert cached("a") == 0


def test_resident_limit_evicts_and_reloads(tiny_llama_dir, adapters, alone):
    engine = make_engine(tiny_llama_dir, adapters, max_loras=1)
    for _ in range(2):  # alternately: each use evicts the other adapter
        assert run(engine, [JOBS[1]]) == [alone[1]]
        assert len(engine.loras.resident) == 1
        assert run(engine, [JOBS[2]]) == [alone[2]]
        assert list(engine.loras.resident) == ["b"]
    assert engine.loras.num_loads == 4
    # a step that needs both holds both for as long as it runs them
    assert run(engine, JOBS) == alone


def test_unknown_and_busy_adapters(tiny_llama_dir, adapters):
    engine = make_engine(tiny_llama_dir, adapters)
    with pytest.raises(InvalidRequestError, match="'c'.*loaded adapters: a, b"):
        engine.add_request("x", [1, 2, 3], GREEDY, lora="c")
    with pytest.raises(InvalidRequestError, match="already loaded"):
        engine.add_lora("a", adapters["a"])
    engine.add_request("x", [1, 2, 3], GREEDY, lora="a")
    with pytest.raises(InvalidRequestError, match="in use"):
        engine.remove_lora("a")
    engine.abort_request("x")
    engine.remove_lora("a")
    with pytest.raises(InvalidRequestError, match="'a'"):
        engine.remove_lora("a")


def test_async_engine_adds_adapters_between_steps(tiny_llama_dir, adapters, alone):
    engine = AsyncEngine(make_engine(tiny_llama_dir, {}))
    engine.start()

    async def main():
        await engine.add_lora("a", adapters["a"])
        tokens = []
        async for out in engine.generate("g", JOBS[1][0], GREEDY, lora="a"):
            tokens.extend(out.token_ids)
        with pytest.raises(InvalidRequestError, match="'b'"):
            async for _ in engine.generate("h", JOBS[2][0], GREEDY, lora="b"):
                pass
        await engine.remove_lora("a")
        return tokens

    try:
        assert asyncio.run(main()) == alone[1]
    finally:
        engine.shutdown()


def test_adapters_apply_on_quantized_base_layers(tiny_llama_dir, adapters):
    """--quantization int8: MultiLoRALinear wraps QuantLinear layers; a mixed batch still equals
    each request alone, and the adapters still change the output."""
    engine = make_engine(tiny_llama_dir, adapters, quantization="int8")
    wrapped = [m for m in engine.model_runner.model.modules() if isinstance(m, MultiLoRALinear)]
    assert wrapped and all(isinstance(m.base, QuantLinear) for m in wrapped)
    assert engine.model_runner.model.fused_decoder is None  # it would skip the wrappers
    alone_q = [run(engine, [job])[0] for job in JOBS]
    assert run(engine, JOBS) == alone_q
    assert alone_q[0] != alone_q[5] != alone_q[6]  # the same prompt: base, "a", "b"


@pytest.mark.skipif(not can_pack(torch.bfloat16, torch.device("cpu")),
                    reason="this CPU's PyTorch has no oneDNN bf16")
def test_wrapper_adds_updates_on_a_packed_fused_layer():
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    context = LoRAContext()
    layer = MultiLoRALinear(PackedLinear(dense), [("q", 32), ("k", 16)], context)
    a, b = torch.randn(4, 64), torch.randn(16, 4)
    layer.set_adapter(7, {"k": (a, b)}, scaling=0.5)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    rows = torch.tensor([1, 3])
    with context.applying(LoRABatch([(7, rows)])):
        y = layer(x)
    expected = dense(x).float()
    expected[1:4:2, 32:] += (x[rows].float() @ a.t() @ b.t()) * 0.5
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.02)
    assert torch.equal(layer(x), dense(x))  # no adapter in the step: the base output as is


def test_targets_are_found_by_name_in_any_model(tiny_llama_dir):
    """LoRA is applied from outside the model file: a module named as a PEFT target is wrapped,
    whatever model holds it; a fused layer is found through the model's ``fused_parts``."""
    from lmforge.models.loader import load_model

    class Toy(torch.nn.Module):  # another family: it only has to name its projections
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict(
                {"q_proj": torch.nn.Linear(8, 8), "norm": torch.nn.LayerNorm(8)}) for _ in range(2))

    assert lora_targets(Toy()) == {f"blocks.{i}.q_proj": [(f"blocks.{i}.q_proj", 8)]
                                   for i in range(2)}
    fused = load_model(ModelConfig(model=str(tiny_llama_dir), dtype="float32")).model
    targets = lora_targets(fused)
    prefix = "model.layers.1."
    assert targets[prefix + "self_attn.qkv_proj"] == [
        (prefix + "self_attn.q_proj", 64), (prefix + "self_attn.k_proj", 32),
        (prefix + "self_attn.v_proj", 32)]
    assert targets[prefix + "mlp.gate_up_proj"] == [(prefix + "mlp.gate_proj", 128),
                                                     (prefix + "mlp.up_proj", 128)]
    assert sorted(n.removeprefix(prefix) for n in targets if n.startswith(prefix)) == [
        "mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"]


def test_context_is_the_base_model_outside_applying():
    context = LoRAContext()
    batch = LoRABatch([(1, None)])
    with pytest.raises(RuntimeError), context.applying(batch):
        assert context.batch is batch
        raise RuntimeError("a forward pass that fails")
    assert context.batch is None
