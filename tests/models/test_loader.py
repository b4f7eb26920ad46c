"""Model loading: aliases, and a clear ModelLoadError for every way a model can be unusable."""

import json
import shutil

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import ModelLoadError
from lmforge.models.loader import _unpermute_qk, load_model, resolve_dtype, resolve_model_path


def test_alias_resolves_to_the_packaged_gguf(smollm2_gguf_path):
    path, name = resolve_model_path("smollm2-135m-instruct")
    assert path == smollm2_gguf_path and name == "smollm2-135m-instruct"


def test_missing_path_names_the_accepted_forms(tmp_path):
    with pytest.raises(ModelLoadError, match="not found.*GGUF file.*smollm2-135m-instruct"):
        load_model(ModelConfig(model=str(tmp_path / "nope")))


def test_unsupported_architecture(tmp_path, tiny_llama_dir):
    model_dir = tmp_path / "bertish"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*BertForMaskedLM.*"
                                             "GPT2LMHeadModel"):
        load_model(ModelConfig(model=str(model_dir)))


def test_directory_without_weights(tmp_path, tiny_llama_dir):
    model_dir = tmp_path / "noweights"
    shutil.copytree(tiny_llama_dir, model_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(ModelConfig(model=str(model_dir)))


def test_corrupt_safetensors(tmp_path, tiny_llama_dir):
    model_dir = tmp_path / "corrupt"
    shutil.copytree(tiny_llama_dir, model_dir)
    weights = next(model_dir.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="could not read model"):
        load_model(ModelConfig(model=str(model_dir)))


def test_corrupt_gguf(tmp_path, smollm2_gguf_path):
    bad = tmp_path / "broken.gguf"
    with open(smollm2_gguf_path, "rb") as f:
        bad.write_bytes(f.read(4096))  # a valid header, then nothing
    with pytest.raises(ModelLoadError, match="could not read model"):
        load_model(ModelConfig(model=str(bad)))


def test_not_a_gguf_at_all(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello")
    with pytest.raises(ModelLoadError, match="could not read model"):
        load_model(ModelConfig(model=str(bad)))


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp's convert_hf_to_gguf.permute: (H, 2, D/2, ...) -> (H, D/2, 2, ...)
    n_heads, head_dim, hidden = 3, 8, 5
    w = torch.randn(n_heads * head_dim, hidden)
    permuted = (w.reshape(n_heads, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(w.shape))
    assert torch.equal(_unpermute_qk(permuted, n_heads), w)


def test_dtype_auto_and_explicit():
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("auto", cpu) in (torch.bfloat16, torch.float32)
