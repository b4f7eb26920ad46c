"""LoRA adapters over HTTP: ``--lora`` at start (ServerConfig.loras), vLLM's
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, adapters in ``/v1/models`` with
``parent``, requests naming them, the adapter download, and ``DELETE /v1/models``."""

from __future__ import annotations

import io
import zipfile

import httpx
import openai
import pytest
from batching import batch_server


@pytest.fixture(scope="module")
def served(tiny_llama_dir, tmp_path_factory, make_peft_adapter):
    root = tmp_path_factory.mktemp("lora_api")
    targets = ["q_proj", "down_proj"]
    paths = {"a": make_peft_adapter(tiny_llama_dir, root / "a", 1, targets),
             "b": make_peft_adapter(tiny_llama_dir, root / "b", 2, targets)}
    with batch_server(tiny_llama_dir, root / "home", loras={"a": paths["a"]}) as client:
        yield client, paths


def greedy(client, model: str) -> list[float]:
    """The prompt's token logprobs under ``model`` (echo + max_tokens 0): they differ between
    adapters even where the tiny model's greedy text does not."""
    choice = client.completions.create(model=model, prompt="The quick brown fox jumps",
                                       max_tokens=0, echo=True, logprobs=0).choices[0]
    return [round(x, 4) for x in choice.logprobs.token_logprobs[1:]]


def test_a_start_adapter_is_listed_and_changes_outputs(served):
    client, _ = served
    base = client.model_name
    models = {m.id: m for m in client.models.list().data}
    assert models["a"].parent == base and models["a"].root == base
    assert client.models.retrieve("a").parent == base
    assert greedy(client, "a") == greedy(client, "a") != greedy(client, base)


def test_load_and_unload_at_run_time(served):
    client, paths = served
    url = str(client.base_url).removesuffix("/v1/")
    resp = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "b",
                                                            "lora_path": paths["b"]})
    assert resp.status_code == 200 and "added successfully" in resp.text
    assert "b" in {m.id for m in client.models.list().data}
    assert greedy(client, "b") != greedy(client, "a")
    again = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "b",
                                                             "lora_path": paths["b"]})
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    missing = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c",
                                                               "lora_path": "/no/such/dir"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "lora_path"
    resp = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "b"})
    assert resp.status_code == 200 and "removed successfully" in resp.text
    assert httpx.post(f"{url}/v1/unload_lora_adapter",
                      json={"lora_name": "b"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        greedy(client, "b")


def test_download_and_delete(served):
    client, _ = served
    url = str(client.base_url).removesuffix("/v1/")
    resp = httpx.get(f"{url}/v1/models/a/adapter")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/zip"
    names = set(zipfile.ZipFile(io.BytesIO(resp.content)).namelist())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert httpx.get(f"{url}/v1/models/{client.model_name}/adapter").status_code == 404
    with pytest.raises(openai.BadRequestError, match="base model"):
        client.models.delete(client.model_name)
    assert client.models.delete("a").deleted
    assert {m.id for m in client.models.list().data} == {client.model_name}
    with pytest.raises(openai.NotFoundError):
        client.models.delete("a")
