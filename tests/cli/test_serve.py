"""``lmforge serve``: startup errors exit 2 with one line; a real server process answers."""

from __future__ import annotations

import importlib
import queue
import re
import signal
import subprocess
import sys
import threading

import click
import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from lmforge.cli import main
from lmforge.cli.serve import engine_config, parse_size
from lmforge.config import ServerConfig, lmforge_home
from lmforge.server import build_app


def test_missing_model_exits_2_with_one_line():
    result = CliRunner().invoke(main, ["serve", "--model", "/no/such/model"])
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert line.startswith("Error: ") and "/no/such/model" in line


def test_bad_config_exits_2_naming_the_field(tiny_llama_dir):
    result = CliRunner().invoke(main, ["serve", "--model", str(tiny_llama_dir),
                                       "--block-size", "3"])
    assert result.exit_code == 2
    assert result.output.strip() == "Error: block_size (3) must be a power of two, e.g. 16"


def test_replica_options_without_ray_are_a_usage_error():
    result = CliRunner().invoke(main, ["serve", "--replicas", "2", "--replica-gpus", "1"])
    assert result.exit_code == 2
    assert "--replicas, --replica-gpus only apply with --ray" in result.output


def test_missing_chat_template_file_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--chat-template", str(tmp_path / "none.jinja")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_engine_config_keeps_dataclass_defaults_for_omitted_options():
    cfg = engine_config(model="m", served_model_name=None, dtype="float32", device="cpu",
                        max_model_len=None, chat_template=None, seed=0, max_num_seqs=None,
                        max_num_batched_tokens=None, block_size=None, num_kv_blocks=7,
                        kv_cache_memory_mb=None, no_prefix_caching=True, gguf_int4=False)
    assert cfg.cache.num_blocks == 7 and cfg.cache.block_size == 16
    assert cfg.model.gguf_int4 is False
    assert cfg.cache.enable_prefix_caching is False
    assert cfg.scheduler.max_num_seqs == 64


def test_kv_cache_size_in_tokens_or_memory_units():
    base = dict(model="m", served_model_name=None, dtype="float32", device="cpu",
                max_model_len=None, chat_template=None, seed=0, max_num_seqs=None,
                max_num_batched_tokens=None, block_size=None, num_kv_blocks=None,
                kv_cache_memory_mb=None, no_prefix_caching=False, gguf_int4=True)
    assert engine_config(**base, kv_cache_tokens=32768).cache.kv_cache_tokens == 32768
    assert engine_config(**base, kv_cache_memory="2GiB").cache.kv_cache_memory_mb == 2048
    assert engine_config(**base, kv_cache_memory="1.5 GB").cache.kv_cache_memory_mb == 1430
    assert engine_config(**base).cache.kv_cache_memory_mb == 1024
    assert parse_size("512MiB", "--x") == 512 * 2**20 and parse_size("100", "--x") == 100
    for bad in ("lots", "2 parsecs", "-1GiB", "0GB"):
        with pytest.raises(click.BadParameter, match="512MiB"):
            parse_size(bad, "--kv-cache-memory")


def test_kv_cache_options_reach_the_engine(tiny_llama_dir):
    from lmforge.engine.llm_engine import LLMEngine

    cfg = engine_config(model=str(tiny_llama_dir), served_model_name=None, dtype="float32",
                        device="cpu", max_model_len=None, chat_template=None, seed=0,
                        max_num_seqs=None, max_num_batched_tokens=None, block_size=None,
                        num_kv_blocks=None, kv_cache_memory_mb=None, no_prefix_caching=False,
                        gguf_int4=True, kv_cache_tokens=1000)
    engine = LLMEngine(cfg)
    assert engine.block_manager.num_blocks == 63  # 1000 tokens, rounded up to 16-token blocks
    report = engine.memory_report()
    assert report.kv_cache_tokens == 1008 and report.kv_cache_used == 0
    k, v = engine.model_runner.kv_caches[0]
    assert k.shape[1] == 1008 and not k.any() and not v.any()  # zero pages, not yet resident


def test_bad_kv_cache_memory_exits_2_naming_the_option(tiny_llama_dir):
    result = CliRunner().invoke(main, ["serve", "--model", str(tiny_llama_dir),
                                       "--kv-cache-memory", "lots"])
    assert result.exit_code == 2 and "--kv-cache-memory" in result.output
    result = CliRunner().invoke(main, ["serve", "--model", str(tiny_llama_dir),
                                       "--kv-cache-tokens", "8"])
    assert result.exit_code == 2
    assert "kv_cache_tokens (8) must be at least two blocks (32 tokens)" in result.output


def test_chat_template_override_is_used(engine, base_url):  # base_url: engine started
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    client = TestClient(build_app(engine, ServerConfig(), chat_template=template))
    resp = client.post("/v1/chat/completions", json={
        "model": engine.model_name, "messages": [{"role": "user", "content": "abc"}],
        "max_tokens": 1})
    assert resp.status_code == 200, resp.text
    expected = engine.tokenizer.encode("<<abc>>", add_special_tokens=False)
    assert resp.json()["usage"]["prompt_tokens"] == len(expected)


def _read_lines(stream, sink: queue.Queue) -> None:
    for line in stream:
        sink.put(line)


def test_serve_process_announces_and_answers(tiny_llama_dir):
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--model", str(tiny_llama_dir),
           "--served-model-name", "tiny", "--port", "0", "--num-kv-blocks", "64",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        url, seen = None, []
        while url is None:
            line = lines.get(timeout=60)
            seen.append(line.strip())
            if match := re.match(r"lmforge serving tiny on (http://127\.0\.0\.1:\d+/v1)$",
                                 line.strip()):
                url = match.group(1)
        # where start-up time and memory go, printed once ready
        [ready] = [line for line in seen if line.startswith("lmforge ready in ")]
        for phase in ("imports", "checkpoint", "tokenizer", "model", "KV cache"):
            assert re.search(rf"[:,] {phase} \d+\.\d\d s", ready), ready
        [memory] = [line for line in seen if line.startswith("lmforge memory: ")]
        assert re.search(r"weights \d+ MiB, KV cache \d+ MiB for 1,024 tokens", memory), memory
        [kernels] = [line for line in seen if line.startswith("lmforge kernels: ")]
        assert "float32" in kernels or "bfloat16" in kernels, kernels
        assert httpx.get(f"{url}/models").json()["data"][0]["id"] == "tiny"
        resp = httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": "Hi",
                                                      "max_tokens": 2}, timeout=30)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("lmforge serve did not stop on SIGINT")
    assert proc.returncode == 0


def test_request_and_lora_root_options_reach_the_server_config(tiny_llama_dir, tmp_path,
                                                               monkeypatch):
    seen: list[ServerConfig] = []

    def stop_at_precheck(config, server_config: ServerConfig) -> str:
        seen.append(server_config)
        raise ValueError("stopped before loading")

    # the module, not the click command that lmforge.cli re-exports under the same name
    monkeypatch.setattr(importlib.import_module("lmforge.cli.serve"), "precheck",
                        stop_at_precheck)
    model = ["serve", "--model", str(tiny_llama_dir)]
    roots = [str(tmp_path / "a"), str(tmp_path / "b")]
    result = CliRunner().invoke(main, model + ["--max-request-mb", "8", "--lora-root", roots[0],
                                               "--lora-root", roots[1]])
    assert result.exit_code == 2 and "stopped before loading" in result.output
    assert seen[0].max_request_mb == 8 and seen[0].lora_roots == roots
    CliRunner().invoke(main, model)
    assert seen[1].max_request_mb == 32
    assert seen[1].lora_roots == [str(lmforge_home() / "adapters")]


def test_a_request_limit_under_1_mb_exits_2(tiny_llama_dir):
    result = CliRunner().invoke(main, ["serve", "--model", str(tiny_llama_dir),
                                       "--max-request-mb", "0"])
    assert result.exit_code == 2 and "max_request_mb (0) must be at least 1" in result.output


def test_bad_lora_options_exit_2(tiny_llama_dir, tmp_path):
    malformed = CliRunner().invoke(main, ["serve", "--model", str(tiny_llama_dir),
                                          "--lora", "no-equals-sign"])
    assert malformed.exit_code == 2 and "NAME=PATH" in malformed.output
    missing = CliRunner().invoke(main, ["serve", "--model", str(tiny_llama_dir),
                                        "--lora", f"x={tmp_path / 'none'}"])
    assert missing.exit_code == 2 and str(tmp_path / "none") in missing.output


def test_int8_activations_flag_reaches_the_model_config(tiny_llama_dir, monkeypatch):
    seen = []

    def stop_at_precheck(config, server_config) -> str:
        seen.append(config.model)
        raise ValueError("stopped before loading")

    monkeypatch.setattr(importlib.import_module("lmforge.cli.serve"), "precheck",
                        stop_at_precheck)
    model = ["serve", "--model", str(tiny_llama_dir)]
    CliRunner().invoke(main, model + ["--int8-activations"])
    CliRunner().invoke(main, model)
    assert [m.int8_activations for m in seen] == [True, False]
