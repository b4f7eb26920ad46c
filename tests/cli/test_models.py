"""``lmforge models ...`` (click's CliRunner) against a server of its own on the tiny Llama
(adapters are loaded and deleted here, so the session server's model list stays as it is):
list and get as tables and ``--json``, download of an adapter loaded at run time (vLLM's
``/v1/load_lora_adapter``) gives the source adapter's files, delete asks unless ``--yes``, and
errors name what to run next."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from support.batching import batch_server
from click.testing import CliRunner

from lmforge.cli import main


@pytest.fixture(scope="module")
def served(tiny_llama_dir, tmp_path_factory, make_peft_adapter):
    """(base URL, base model name, the PEFT adapter directory loaded as ``pirate``)."""
    root = tmp_path_factory.mktemp("models_cli")
    adapter = Path(make_peft_adapter(tiny_llama_dir, root / "pirate", 1, ["q_proj"]))
    with batch_server(tiny_llama_dir, root / "home", lora_roots=[str(root)]) as client:
        url = str(client.base_url).removesuffix("/v1/")
        loaded = httpx.post(f"{url}/v1/load_lora_adapter",
                            json={"lora_name": "pirate", "lora_path": str(adapter)})
        assert loaded.status_code == 200, loaded.text
        yield url, client.model_name, adapter


@pytest.fixture
def lmforge(served, monkeypatch):
    monkeypatch.setenv("LMFORGE_BASE_URL", served[0])
    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)
    return lambda *args, input=None: CliRunner().invoke(
        main, ["models", *map(str, args)], input=input, catch_exceptions=False)


def test_list_and_get(lmforge, served):
    _, base, _ = served
    table = [line.split() for line in lmforge("list").stdout.splitlines()]
    assert table == [["name", "base", "model", "fine-tuned"], [base, base, "no"],
                     ["pirate", base, "yes"]]
    listed = json.loads(lmforge("list", "--json").stdout)
    assert [(m["name"], m["model_name"], m["fine_tuned"]) for m in listed] == [
        (base, base, False), ("pirate", base, True)]
    assert json.loads(lmforge("get", "pirate", "--json").stdout) == listed[1]
    shown = [line.split() for line in lmforge("get", "pirate").stdout.splitlines()]
    assert ["name", "pirate"] in shown and ["fine_tuned", "yes"] in shown


def test_download_gives_the_source_adapter_files(lmforge, served, tmp_path):
    url, base, adapter = served
    result = lmforge("download", "pirate", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    peft_files = ("adapter_config.json", "adapter_model.safetensors")  # peft's README stays
    source = {name: (adapter / name).read_bytes() for name in peft_files}
    got = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert got == source
    assert sorted(result.stdout.split()) == sorted(str(tmp_path / "out" / n) for n in got)
    assert lmforge("download", "pirate").stdout == f"{url}/v1/models/pirate/adapter\n"
    refused = lmforge("download", base)
    assert refused.exit_code == 1 and "is a base model, with no adapter files" in refused.stderr
    assert "See `lmforge models list`" in refused.stderr


def test_delete_asks_first_then_get_says_where_to_look(lmforge, served):
    kept = lmforge("delete", "pirate", input="n\n")
    assert kept.exit_code == 1 and "Delete the model pirate?" in kept.output
    assert json.loads(lmforge("get", "pirate", "--json").stdout)["name"] == "pirate"
    deleted = lmforge("delete", "pirate", "--yes")
    assert deleted.exit_code == 0 and deleted.stdout == "Deleted pirate.\n"
    gone = lmforge("get", "pirate")
    assert gone.exit_code == 1
    assert gone.stderr == ("Error: The model `pirate` does not exist. (HTTP 404). "
                           "See `lmforge models list`.\n")
    base = lmforge("delete", served[1], "--yes")
    assert base.exit_code == 1 and "is the base model and cannot be deleted" in base.stderr


def test_a_dead_server_names_lmforge_serve(lmforge):
    result = lmforge("list", "--base-url", "http://127.0.0.1:9")
    assert result.exit_code == 1 and result.stdout == ""
    assert "cannot reach the lmforge server at http://127.0.0.1:9" in result.stderr
    assert "Start one with `lmforge serve`, or point --base-url" in result.stderr
