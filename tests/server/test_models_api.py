"""``/v1/models`` and ``/health``."""

from __future__ import annotations


def test_models_list_through_sdk(client, model, engine):
    [card] = client.models.list().data
    assert card.id == model and card.object == "model" and card.owned_by == "lmforge"
    assert card.created == engine.created
    extra = card.model_dump()
    assert extra["root"] == model and extra["parent"] is None and extra["max_model_len"] == 512


def test_model_retrieve(client, model):
    assert client.models.retrieve(model).id == model


def test_models_wire_shape(http, model):
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    assert set(body["data"][0]) == {"id", "object", "created", "owned_by", "root", "parent",
                                    "max_model_len"}


def test_health(http):
    resp = http.get("/health")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}
