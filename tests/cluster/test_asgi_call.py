"""Requests as data through an ASGI app (``lmforge.cluster.asgi_call``) and /metrics pages
merged with a replica label (``lmforge.cluster.metrics_merge``), without Ray."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from lmforge.cluster.asgi_call import ProxiedRequest, ResponseHead, call_app, iterate_app
from lmforge.cluster.metrics_merge import merge_pages


def _app(events: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"body": (await request.body()).decode(), "q": request.url.query,
                "h": request.headers.get("x-test")}

    @app.get("/stream")
    async def stream(request: Request) -> StreamingResponse:
        async def chunks():
            try:
                for i in range(100):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                events.append("closed")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


def test_a_whole_response_with_its_body_query_and_headers():
    request = ProxiedRequest("POST", "/echo", b"a=1", [(b"x-test", b"yes"),
                                                       (b"content-type", b"text/plain")],
                             b"hello")
    head, body = asyncio.run(call_app(_app([]), request))
    assert head.status == 200
    assert (b"content-type", b"application/json") in head.headers
    assert body == b'{"body":"hello","q":"a=1","h":"yes"}'


def test_a_stream_arrives_chunk_by_chunk_and_stops_when_the_consumer_leaves():
    events: list[str] = []

    async def first_three() -> list:
        items = []
        stream = iterate_app(_app(events), ProxiedRequest("GET", "/stream"))
        async for item in stream:
            items.append(item)
            if len(items) == 4:
                break
        await stream.aclose()
        return items

    items = asyncio.run(first_three())
    assert isinstance(items[0], ResponseHead) and items[0].status == 200
    assert items[1:] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    assert events == ["closed"]  # the app's generator was stopped, not left running


def test_merged_metrics_label_every_sample_and_state_each_family_once():
    page = ("# HELP lmforge_requests_total Requests.\n# TYPE lmforge_requests_total counter\n"
            'lmforge_requests_total{route="/v1/chat/completions"} %d\n'
            "# HELP lmforge_ttft_seconds TTFT.\n# TYPE lmforge_ttft_seconds histogram\n"
            'lmforge_ttft_seconds_bucket{le="0.5"} %d\nlmforge_ttft_seconds_bucket{le="+Inf"} %d\n'
            "lmforge_ttft_seconds_count %d\nlmforge_ttft_seconds_sum 1.5\n")
    merged = merge_pages({"engine-0": page % (3, 1, 2, 2), "engine-1": page % (5, 4, 4, 4)})
    assert merged.count("# TYPE lmforge_requests_total counter") == 1
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    requests = {s.labels["replica"]: s.value for s in families["lmforge_requests"].samples}
    assert requests == {"engine-0": 3.0, "engine-1": 5.0}
    buckets = [s for s in families["lmforge_ttft_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["replica"] == "engine-1"]
    assert [(s.labels["le"], s.value) for s in buckets] == [("0.5", 4.0), ("+Inf", 4.0)]
