"""LoRA adapters over HTTP: ``--lora`` at start (ServerConfig.loras), vLLM's
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, adapters in ``/v1/models`` with
``parent``, requests naming them, the adapter download, and ``DELETE /v1/models``; and what a
client cannot reach through them: paths outside ``--lora-root``, files beside the PEFT ones,
anything behind a symbolic link."""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from pathlib import Path

import httpx
import openai
import pytest
from support.batching import batch_server


@pytest.fixture(scope="module")
def served(tiny_llama_dir, tmp_path_factory, make_peft_adapter):
    """Adapter ``a`` (outside the root, served with ``--lora``; peft's README.md, a stray file
    and a symlink to /etc/passwd beside its PEFT files), ``b`` inside the ``--lora-root``, and
    ``c`` (``--lora``), whose weights file is a symlink to ``a``'s."""
    top = tmp_path_factory.mktemp("lora_api")
    root = top / "adapters"
    targets = ["q_proj", "down_proj"]
    paths = {"a": make_peft_adapter(tiny_llama_dir, top / "a", 1, targets),
             "b": make_peft_adapter(tiny_llama_dir, root / "b", 2, targets),
             "c": str(top / "c"), "root": str(root)}
    (top / "a" / "notes.txt").write_text("private notes")
    os.symlink("/etc/passwd", top / "a" / "passwd")
    (top / "c").mkdir()
    shutil.copy(top / "a" / "adapter_config.json", top / "c")
    os.symlink(top / "a" / "adapter_model.safetensors", top / "c" / "adapter_model.safetensors")
    with batch_server(tiny_llama_dir, top / "home", loras={"a": paths["a"], "c": paths["c"]},
                      lora_roots=[str(root)]) as client:
        yield client, paths


def load(client, name: str, path: str) -> httpx.Response:
    url = str(client.base_url).removesuffix("/v1/")
    return httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})


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
    assert models["a"].parent == base and models["a"].root == base  # --lora: any directory
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
    client, paths = served
    url = str(client.base_url).removesuffix("/v1/")
    resp = httpx.get(f"{url}/v1/models/a/adapter")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(resp.content))
    # not peft's README.md, notes.txt, nor the passwd symlink beside them
    assert set(archive.namelist()) == {"adapter_config.json", "adapter_model.safetensors"}
    for name in archive.namelist():
        assert archive.read(name) == (Path(paths["a"]) / name).read_bytes()
    assert httpx.get(f"{url}/v1/models/{client.model_name}/adapter").status_code == 404
    with pytest.raises(openai.BadRequestError, match="base model"):
        client.models.delete(client.model_name)
    assert client.models.delete("a").deleted
    assert {m.id for m in client.models.list().data} == {client.model_name, "c"}
    with pytest.raises(openai.NotFoundError):
        client.models.delete("a")


def test_a_symlinked_peft_file_is_not_sent(served):
    client, _ = served
    url = str(client.base_url).removesuffix("/v1/")
    assert client.models.retrieve("c").parent == client.model_name  # it serves: --lora follows
    resp = httpx.get(f"{url}/v1/models/c/adapter")
    assert resp.status_code == 409, resp.text
    error = resp.json()["error"]
    assert error["code"] == "adapter_not_downloadable" and error["param"] == "model"
    assert "adapter_model.safetensors" in error["message"]


def test_runtime_paths_outside_the_roots_are_refused_alike(served, tmp_path):
    client, paths = served
    root = Path(paths["root"])
    os.symlink(paths["a"], root / "link-to-a")  # inside the root, pointing out of it
    outside = [paths["a"],  # a real adapter
               str(tmp_path / "no" / "such" / "dir"), "/etc", "/etc/passwd", "relative/dir",
               f"{root}/../a", f"{root}/b/../../a", f"{root}/nothing/../../a",
               str(root / "link-to-a"), f"{root}\x00/b"]
    answers = [load(client, "x", path) for path in outside]
    assert {r.status_code for r in answers} == {400}
    bodies = [r.json() for r in answers]
    assert [b for b in bodies if b != bodies[0]] == [], outside  # nothing tells them apart
    error = bodies[0]["error"]
    assert error["param"] == "lora_path" and error["code"] == "lora_path_not_allowed"
    assert "--lora-root" in error["message"] and paths["root"] not in error["message"]
    assert "x" not in {m.id for m in client.models.list().data}


def test_runtime_paths_inside_the_root(served):
    client, paths = served
    root = Path(paths["root"])
    (root / "empty").mkdir()
    os.symlink(root / "b", root / "alias-of-b")
    for name, path in [("b-dotdot", f"{root}/empty/../b"), ("b-alias", str(root / "alias-of-b"))]:
        resp = load(client, name, path)
        assert resp.status_code == 200 and "added successfully" in resp.text
    base = greedy(client, client.model_name)
    assert greedy(client, "b-dotdot") == greedy(client, "b-alias") != base
    unusable = load(client, "e", str(root / "empty"))  # inside: the problem may be told
    assert unusable.status_code == 400
    error = unusable.json()["error"]
    assert error["param"] == "lora_path" and "adapter_config.json" in error["message"]
    for name in ("b-dotdot", "b-alias"):
        httpx.post(f"{str(client.base_url).removesuffix('/v1/')}/v1/unload_lora_adapter",
                   json={"lora_name": name}).raise_for_status()
