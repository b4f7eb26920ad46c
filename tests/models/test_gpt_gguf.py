"""GPT-2 from a GGUF file (``general.architecture = gpt2``) against Hugging Face's GGUF loader on
the same file: the tiny GPT-2 checkpoint is converted as llama.cpp's ``convert_hf_to_gguf.py``
does (Conv1D weights transposed, ``gpt2.*`` keys, the SmolLM2 GGUF's tokenizer fields), once in
F32 with the older converters' copy of the head as ``output.weight`` and once with Q4_0 matrices
and a tied head, as newer converters write it."""

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmforge.config import ModelConfig
from lmforge.engine.llm import LLM
from lmforge.engine.request import SamplingParams
from lmforge.models.loader import load_model
from lmforge.training.forward import causal_lm_logits

# HF name -> GGUF name (llama.cpp's tensor map for GPT-2), "{i}" the block
HF_TO_GGUF = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd",
              "transformer.ln_f": "output_norm", "ln_1": "attn_norm", "attn.c_attn": "attn_qkv",
              "attn.c_proj": "attn_output", "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up",
              "mlp.c_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    module, _, suffix = hf_name.rpartition(".")
    if module.startswith("transformer.h."):
        i, _, rest = module.removeprefix("transformer.h.").partition(".")
        return f"blk.{i}.{HF_TO_GGUF[rest]}.{suffix}"
    return f"{HF_TO_GGUF[module]}.{suffix}"


def write_gpt2_gguf(model_dir, tokenizer_gguf, path, matrix_type, head_copy: bool):
    """Convert the tiny HF GPT-2 at ``model_dir`` into a GGUF at ``path``."""
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(256)
    writer.add_head_count(4)
    writer.add_layer_norm_eps(1e-5)
    for key, field in gguf.GGUFReader(tokenizer_gguf).fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    tensors = {gguf_name(k): v for k, v in load_file(model_dir / "model.safetensors").items()}
    if head_copy:
        tensors["output.weight"] = tensors["token_embd.weight"]
    for name, w in tensors.items():
        if name.endswith(("attn_qkv.weight", "attn_output.weight", "ffn_up.weight",
                          "ffn_down.weight")):
            w = w.t()  # HF Conv1D (in, out) -> (out, in), as llama.cpp's converter
        data = np.ascontiguousarray(w.float().numpy())
        quantized = matrix_type != gguf.GGMLQuantizationType.F32
        if quantized and name.startswith("blk.") and data.ndim == 2:
            # (rows, bytes per row) uint8, as the converter hands it over
            writer.add_tensor(name, gguf.quants.quantize(data, matrix_type),
                              raw_dtype=matrix_type)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", params=["f32-head-copy", "q4_0-tied"])
def gpt2_gguf(request, tiny_gpt2_dir, smollm2_gguf_path, tmp_path_factory):
    matrix_type, head_copy = {
        "f32-head-copy": (gguf.GGMLQuantizationType.F32, True),
        "q4_0-tied": (gguf.GGMLQuantizationType.Q4_0, False)}[request.param]
    directory = tmp_path_factory.mktemp("gpt2_gguf")
    path = write_gpt2_gguf(tiny_gpt2_dir, smollm2_gguf_path, directory / "tiny-gpt2.gguf",
                           matrix_type, head_copy)
    return path, head_copy


@pytest.fixture(scope="module")
def hf_gguf(gpt2_gguf):
    """Hugging Face's GPT2LMHeadModel from the same GGUF file (its own dequantization)."""
    path, _ = gpt2_gguf
    # transformers reads gpt2.context_length into ``n_ctx``, which GPT2Config no longer uses
    # (its positions are ``n_positions``), so the size of the position table is passed here
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32, n_positions=128).eval()


def test_gguf_gpt2_logits_equal_hugging_faces_gguf_loader(gpt2_gguf, hf_gguf):
    gpt2_gguf, head_copy = gpt2_gguf
    loaded = load_model(ModelConfig(model=str(gpt2_gguf), dtype="float32"))
    cfg = loaded.config
    assert (cfg.architecture, cfg.n_layer, cfg.n_embd, cfg.n_positions) == ("gpt2", 2, 64, 128)
    assert cfg.tie_word_embeddings is not head_copy
    assert loaded.tokenizer.vocab_size == 49152
    ids = torch.tensor([list(range(700, 740))])
    with torch.no_grad():
        want = hf_gguf(ids).logits
    torch.testing.assert_close(causal_lm_logits(loaded.model, ids), want, rtol=1e-4, atol=1e-4)


def test_gguf_gpt2_generates_what_hugging_face_generates(gpt2_gguf, hf_gguf):
    gpt2_gguf, _ = gpt2_gguf
    prompts = [list(range(100, 117)), list(range(900, 931))]
    ref = []
    with torch.no_grad():
        for p in prompts:
            out = hf_gguf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p),
                                                                           dtype=torch.long),
                              do_sample=False, max_new_tokens=10, pad_token_id=0)
            ref.append(out[0, len(p):].tolist())
    llm = LLM(str(gpt2_gguf), dtype="float32")
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0), use_tqdm=False)
    assert [o.token_ids for o in outs] == ref
