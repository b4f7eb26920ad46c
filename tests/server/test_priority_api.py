"""The engine priority an in-process caller (the batch worker) puts in the ASGI scope reaches the
engine from every inference route; an ordinary HTTP request runs at priority 0."""

import asyncio

import httpx
import pytest

from lmforge.config import ServerConfig
from lmforge.engine.request import BATCH_PRIORITY
from lmforge.server import build_app
from lmforge.server.generation import PRIORITY_SCOPE_KEY


@pytest.fixture
def seen(engine, monkeypatch) -> list[int]:
    """The ``priority`` of every ``generate`` / ``embed`` call the engine gets."""
    priorities: list[int] = []
    generate, embed = engine.generate, engine.embed

    def recording_generate(*args, priority=0, **kwargs):
        priorities.append(priority)
        return generate(*args, priority=priority, **kwargs)

    async def recording_embed(*args, priority=0, **kwargs):
        priorities.append(priority)
        return await embed(*args, priority=priority, **kwargs)

    monkeypatch.setattr(engine, "generate", recording_generate)
    monkeypatch.setattr(engine, "embed", recording_embed)
    return priorities


BODIES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "/v1/completions": {"prompt": ["One", "Two"], "n": 2, "max_tokens": 2},
    "/v1/embeddings": {"input": ["Hello there"]},
}


@pytest.fixture(scope="module")
def app(engine, base_url):
    """A second app on the session's engine, called in-process; ``base_url``'s server has
    started the engine (an app's lifespan does, and httpx.ASGITransport runs none)."""
    return build_app(engine, ServerConfig())


def post_in_process(app, path: str, body: dict, priority: int | None) -> httpx.Response:
    """POST through ``httpx.ASGITransport``, as the batch worker does, with the scope key set
    when ``priority`` is given."""
    async def scoped(scope, receive, send):
        extra = {} if priority is None else {PRIORITY_SCOPE_KEY: priority}
        await app({**scope, **extra}, receive, send)

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=scoped)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, json={"model": app.state.engine.model_name, **body})

    return asyncio.run(main())


@pytest.mark.parametrize("path", list(BODIES))
def test_the_scope_priority_reaches_the_engine(app, seen, path):
    assert post_in_process(app, path, BODIES[path], BATCH_PRIORITY).status_code == 200
    assert seen and set(seen) == {BATCH_PRIORITY}
    seen.clear()
    assert post_in_process(app, path, BODIES[path], None).status_code == 200
    assert seen and set(seen) == {0}


def test_beam_search_runs_every_step_at_the_scope_priority(app, seen):
    body = {"prompt": "Once", "max_tokens": 3, "num_beams": 2, "temperature": 0}
    assert post_in_process(app, "/v1/completions", body, BATCH_PRIORITY).status_code == 200
    assert len(seen) > 2 and set(seen) == {BATCH_PRIORITY}


def test_an_http_client_cannot_set_the_priority(http, model, seen):
    response = http.post("/v1/completions", json={"model": model, "prompt": "Hi",
                                                  "max_tokens": 2},
                         headers={PRIORITY_SCOPE_KEY: "1"})
    assert response.status_code == 200 and seen == [0]
