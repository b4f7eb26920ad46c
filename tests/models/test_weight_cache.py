"""The GGUF weight cache: a second load memory-maps the weights the first one computed, equal to
the last bit; a corrupt cache is rebuilt; training loads never use it."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.models import weight_cache
from lmforge.models.loader import load_model
from lmforge.startup import StartupProfile


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def load(gguf_path):
    """The dense variant of the cache (the quantized one: ``test_quant_linear.py``)."""
    profile = StartupProfile()
    loaded = load_model(ModelConfig(model=str(gguf_path), dtype="float32", gguf_int4=False),
                        profile=profile)
    return loaded.model, [name for name, _ in profile.phases]


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_the_second_load_maps_the_cached_weights(smollm2_gguf_path, cache_dir):
    first, phases = load(smollm2_gguf_path)
    assert "fuse" in phases and "weight cache write" in phases
    cached = weight_cache.cache_path(smollm2_gguf_path, torch.float32)
    assert cached.parent == cache_dir / "weights" and cached.is_file()
    second, phases = load(smollm2_gguf_path)
    assert "fuse" not in phases and "weight cache write" not in phases
    assert_same_weights(first, second)
    assert second.fused_parts == first.fused_parts
    assert second.lm_head.weight is second.get_input_embeddings().weight  # still tied
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(second.get_input_embeddings()(ids), first.get_input_embeddings()(ids))


def test_a_corrupt_cache_is_rebuilt(smollm2_gguf_path, cache_dir):
    first, _ = load(smollm2_gguf_path)
    cached = weight_cache.cache_path(smollm2_gguf_path, torch.float32)
    cached.write_bytes(cached.read_bytes()[:1000])
    rebuilt, phases = load(smollm2_gguf_path)
    assert "weight cache write" in phases
    assert_same_weights(first, rebuilt)
    assert cached.stat().st_size > 100_000_000


def test_a_changed_file_or_dtype_has_another_key(smollm2_gguf_path, tmp_path, cache_dir):
    copy = tmp_path / "model.gguf"
    shutil.copy(smollm2_gguf_path, copy)
    key = weight_cache.cache_path(copy, torch.float32)
    assert weight_cache.cache_path(copy, torch.bfloat16) != key
    with open(copy, "r+b") as f:  # same size, new mtime: a re-downloaded file
        f.write(f.read(4))
    assert weight_cache.cache_path(copy, torch.float32) != key


def test_training_loads_neither_read_nor_write_it(smollm2_gguf_path, cache_dir):
    loaded = load_model(ModelConfig(model=str(smollm2_gguf_path), dtype="float32"),
                        for_training=True)
    assert hasattr(loaded.model.model.layers[0].self_attn, "q_proj")  # unfused
    assert not (cache_dir / "weights").exists()
