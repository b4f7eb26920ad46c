"""``lmforge serve --ray``: two engine replicas on Ray Serve behind one OpenAI endpoint, on the
session's local Ray cluster, exercised with the ``openai`` SDK and raw HTTP.

One ``lmforge serve --ray`` subprocess (the CLI as a user runs it, joining the test cluster by
``--ray-address``) serves the tiny Llama checkpoint for the whole module; the replica that
answered is named in the ``x-lmforge-replica`` response header.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from support.serve_process import LmforgeServe, free_port

ray = pytest.importorskip("ray")

REPLICAS = ("engine-0", "engine-1")


def _wait_all_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{url}/health", timeout=10)
            if answer.status_code == 200 and set(answer.json()["replicas"].values()) == {"ok"}:
                return
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the replicas were not all healthy within {timeout_s} s")


@pytest.fixture(scope="module")
def ray_server(ray_cluster, tiny_llama_dir, tmp_path_factory):
    port = free_port()
    server = LmforgeServe(["--model", str(tiny_llama_dir), "--served-model-name", "tiny",
                           "--ray", "--ray-address", ray_cluster, "--replicas", "2",
                           "--replica-cpus", "1", "--port", str(port),
                           "--kv-cache-memory", "64MiB"], tmp_path_factory.mktemp("home"))
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait(url, timeout_s=300)
        _wait_all_healthy(url, 120)
        yield url
    finally:
        server.terminate()
        from ray import serve

        serve.shutdown()  # its controller and HTTP proxy would idle on in the cluster


@pytest.fixture
def client(ray_server):
    return openai.OpenAI(base_url=f"{ray_server}/v1", api_key="unused", max_retries=0)


def _chat(client, messages: list[dict], **kwargs):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, **kwargs)
    return raw.headers["x-lmforge-replica"], raw.parse()


def test_both_replicas_serve_and_a_conversation_stays_on_its_replica(client):
    conversations = [[{"role": "user", "content": f"Question number {i}: tell me about {t}."}]
                     for i, t in enumerate(["rivers", "mountains", "deserts", "forests"])]
    first = []
    for messages in conversations:
        replica, completion = _chat(client, messages)
        first.append(replica)
        messages += [{"role": "assistant", "content": completion.choices[0].message.content},
                     {"role": "user", "content": "And what else?"}]
    assert set(first) == set(REPLICAS)  # sequential requests with no common prefix spread
    for messages, replica in zip(conversations, first):
        assert _chat(client, messages)[0] == replica  # the next turn finds its cached prefix


def test_a_stream_through_the_router_equals_the_whole_answer(client):
    messages = [{"role": "user", "content": "Count from one to five."}]
    _, whole = _chat(client, messages)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages,
                                                 max_tokens=8, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_metrics_label_each_replica_and_errors_keep_the_openai_envelope(ray_server, client):
    client.completions.create(model="tiny", prompt="Hello", max_tokens=2)
    page = httpx.get(f"{ray_server}/metrics", timeout=30).text
    for name in REPLICAS:
        assert f'replica="{name}"' in page
        assert f'lmforge_router_requests_total{{replica="{name}"}}' in page
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="no-such-model", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    assert error.value.body["code"] == "model_not_found"


async def _load(url: str, n: int) -> list:
    """``n`` completions and 4 streamed ones; engine-1 is killed while it serves some. Each
    returns its status (a stream: "done", or "error" for an error event at its end)."""
    body = {"model": "tiny", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=120) as http:
        async def one(i: int) -> int:
            answer = await http.post(f"{url}/v1/completions",
                                     json={**body, "prompt": f"Request {i} about a topic"})
            return answer.status_code

        async def streamed(i: int) -> str:
            async with http.stream("POST", f"{url}/v1/completions", json={
                    **body, "prompt": f"Streamed {i} on a subject", "stream": True}) as answer:
                events = [line async for line in answer.aiter_lines() if line]
            assert events[-1] == "data: [DONE]"
            return "error" if '"error"' in events[-2] else "done"

        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        tasks += [asyncio.ensure_future(streamed(i)) for i in range(4)]
        while 'lmforge_router_in_flight{replica="engine-1"} 0' in (
                await http.get(f"{url}/metrics")).text:
            await asyncio.sleep(0.1)  # until engine-1 serves some of them
        victim = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["name"].startswith("SERVE_REPLICA::lmforge#engine-1#"))
        ray.kill(ray.get_actor(victim, namespace="serve"))
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=180)


def test_a_replica_killed_under_load_loses_no_request_and_is_replaced(ray_server, client):
    statuses = asyncio.run(_load(ray_server, 12))  # returns: no request hung
    assert statuses[:12] == [200] * 12  # the killed replica's requests were retried
    assert set(statuses[12:]) <= {"done", "error"}  # a stream it was serving ends in an error
    metrics = httpx.get(f"{ray_server}/metrics", timeout=30).text
    assert "lmforge_router_replica_losses_total 0" not in metrics
    _wait_all_healthy(ray_server, 180)  # Serve started a new engine-1
    for _ in range(4):  # and the router sends it requests again
        replica, _ = _chat(client, [{"role": "user", "content": f"after {time.time()}"}])
        if replica == "engine-1":
            break
    assert replica == "engine-1"
