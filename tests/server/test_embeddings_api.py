"""``POST /v1/embeddings`` over real HTTP: the openai SDK (its default base64 and explicit float),
every input form, the errors, and a long input split into pieces next to a running generation."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

PATH = "/v1/embeddings"
TEXTS = ["Hello there", "A second sentence, somewhat longer than the first one, to embed."]


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    return AutoModel.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def reference(hf_model, prompts: list[list[int]]) -> np.ndarray:
    """Hugging Face's last_hidden_state, mean over tokens, L2-normalized."""
    with torch.no_grad():
        rows = [hf_model(torch.tensor([p])).last_hidden_state[0].mean(0) for p in prompts]
    return F.normalize(torch.stack(rows), dim=-1).numpy()


def assert_close_to(ours: np.ndarray, ref: np.ndarray) -> None:
    """The served model may compute in bfloat16: compare as directions, to bf16 precision."""
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
    cosine = (ours * ref).sum(-1)
    assert cosine.min() > 0.9999, cosine
    np.testing.assert_allclose(ours, ref, atol=0.01)


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def test_sdk_default_base64_and_float_agree_and_match_hugging_face(client, model, engine,
                                                                   hf_model):
    default = client.embeddings.create(model=model, input=TEXTS)  # the SDK sends base64
    floats = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
    assert floats.object == "list" and floats.model == model
    assert [(d.object, d.index) for d in floats.data] == [("embedding", 0), ("embedding", 1)]
    assert all(len(d.embedding) == engine.embedding_size == 64 for d in floats.data)
    np.testing.assert_array_equal(vectors(default), vectors(floats))  # float32 either way
    prompts = [engine.tokenizer.encode(t) for t in TEXTS]
    n = sum(len(p) for p in prompts)
    assert (floats.usage.prompt_tokens, floats.usage.total_tokens) == (n, n)
    assert_close_to(vectors(floats), reference(hf_model, prompts))


def test_base64_is_little_endian_float32(http, model):
    body = {"model": model, "input": TEXTS[0]}
    floats = http.post(PATH, json={**body, "encoding_format": "float"}).json()
    encoded = http.post(PATH, json={**body, "encoding_format": "base64"}).json()
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    assert len(raw) == 64 * 4
    np.testing.assert_array_equal(np.frombuffer(raw, dtype="<f4"),
                                  np.array(floats["data"][0]["embedding"], dtype=np.float32))
    assert encoded["object"] == "list" and set(encoded["usage"]) == {"prompt_tokens",
                                                                      "total_tokens"}


def test_every_input_form_gives_the_same_vectors(client, model, engine):
    ids = [engine.tokenizer.encode(t) for t in TEXTS]
    one = vectors(client.embeddings.create(model=model, input=TEXTS[0],
                                           encoding_format="float"))
    forms = [TEXTS, ids, [ids[1], ids[0]]]
    results = [vectors(client.embeddings.create(model=model, input=f, encoding_format="float"))
               for f in forms]
    single_ids = vectors(client.embeddings.create(model=model, input=ids[0], user="u-1",
                                                  dimensions=64, encoding_format="float"))
    # same tokens, other batch neighbours: equal up to bf16 rounding in the batched linears
    for got in (results[0][:1], results[1][:1], results[2][1:], single_ids):
        np.testing.assert_allclose(got, one, atol=1e-2)
    np.testing.assert_allclose(results[2][0], results[0][1], atol=1e-2)


def error_of(http, status: int, **body) -> dict:
    resp = http.post(PATH, json=body)
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


@pytest.mark.parametrize("bad_input", ["", [], [""], [[]], ["a", ""]],
                         ids=["empty-string", "empty-list", "empty-item", "empty-ids", "one-empty"])
def test_empty_input_is_a_400(http, model, bad_input):
    err = error_of(http, 400, model=model, input=bad_input)
    assert err["param"] == "input" and "empty" in err["message"]
    assert err["type"] == "invalid_request_error"


def test_errors(http, client, model, engine):
    err = error_of(http, 404, model="text-embedding-3-small", input="a")
    assert err["param"] == "model" and err["code"] == "model_not_found"
    err = error_of(http, 400, model=model, input=[5, 49152])
    assert err["param"] == "input" and "outside the vocabulary [0, 49152)" in err["message"]
    err = error_of(http, 400, model=model, input=[[5, 6], [5] * 513])
    assert err["code"] == "context_length_exceeded" and err["param"] == "input"
    assert "512" in err["message"] and "input[1] has 513 tokens" in err["message"]
    err = error_of(http, 400, model=model, input="a", dimensions=32)
    assert err["param"] == "dimensions" and "64" in err["message"]
    err = error_of(http, 400, model=model, input="a", encoding_format="int8")
    assert err["param"] == "encoding_format"
    err = error_of(http, 400, model=model, input="a", normalize=False)
    assert err["param"] == "normalize" and "Unrecognized" in err["message"]
    err = error_of(http, 400, model=model, input=["a", 5])
    assert err["param"].startswith("input")
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.embeddings.create(model=model, input="")
    # the whole context is allowed
    ok = http.post(PATH, json={"model": model, "input": [5] * engine.max_model_len})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 512


def test_long_input_in_pieces_next_to_a_generation(long_base_url, long_engine, long_wait_idle,
                                                   hf_model):
    """Inputs longer than the token budget (512) are split across loop iterations; a greedy
    completion running meanwhile is exactly what it is alone (the scratch KV is separate)."""
    long_wait_idle(5.0)
    model = long_engine.model_name
    sdk = openai.OpenAI(base_url=f"{long_base_url}/v1", api_key="x", max_retries=0, timeout=60)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 49152, n).tolist() for n in (1300, 7, 600)]
    completion = {"model": model, "prompt": "Once upon a time", "max_tokens": 24,
                  "temperature": 0, "extra_body": {"ignore_eos": True}}
    alone = sdk.completions.create(**completion).choices[0].text
    with ThreadPoolExecutor(2) as pool:
        embedded = pool.submit(sdk.embeddings.create, model=model, input=prompts)
        generated = pool.submit(sdk.completions.create, **completion)
        result, text = embedded.result(), generated.result().choices[0].text
    assert text == alone
    assert result.usage.prompt_tokens == 1300 + 7 + 600
    assert_close_to(vectors(result), reference(hf_model, prompts))
    long_wait_idle(5.0)
