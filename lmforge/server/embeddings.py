"""``POST /v1/embeddings`` (OpenAI API reference, "Create embeddings") on top of ``AsyncEngine``.

Flow: check the body -> check the model -> inputs to token ids (``server/prompts.py``: bounded,
then tokenized in a worker thread) -> ``engine.embed`` (mean-pooled,
L2-normalized final hidden states, computed on the engine thread between generation steps) ->
floats or base64. A client that disconnects while it waits cancels the embedding work.
"""

from __future__ import annotations

import base64
import struct
import uuid
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response

from lmforge.errors import ModelNotFoundError
from lmforge.protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from lmforge.server.generation import request_priority, until_disconnected
from lmforge.server.models import requested_model
from lmforge.server.prompts import encode_prompts
from lmforge.server.routing import StrictJSONRoute

if TYPE_CHECKING:
    from lmforge.engine.async_engine import AsyncEngine

router = APIRouter(route_class=StrictJSONRoute)


@router.post("/v1/embeddings", response_model=None)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """One embedding per input, in input order (an ``EmbeddingResponse``); ``usage`` counts the
    input tokens.

    Raises:
        ModelNotFoundError: 404, a model this server does not serve.
        InvalidRequestError / ContextLengthExceededError: 400, naming the parameter.
    """
    engine: AsyncEngine = request.app.state.engine
    body.model = requested_model(engine, body.model)
    if body.model != engine.model_name:
        raise ModelNotFoundError(f"The model `{body.model}` does not exist.", param="model")
    body.check(engine.embedding_size)
    prompts = await encode_prompts(engine, body.inputs(), param="input")
    vectors = await until_disconnected(request, engine.embed(
        f"embd-{uuid.uuid4().hex}", prompts, priority=request_priority(request)))
    if vectors is None:
        return Response(status_code=499)  # nobody is listening
    encode = to_base64 if body.encoding_format == "base64" else list
    num_tokens = sum(len(p) for p in prompts)
    response = EmbeddingResponse(
        data=[Embedding(index=i, embedding=encode(v)) for i, v in enumerate(vectors)],
        model=body.model, usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))
    # serialized by pydantic's Rust core: FastAPI's jsonable_encoder walks every float in Python,
    # 1.5 s (blocking the event loop) for 2048 x 576 floats against 0.1 s
    return Response(response.model_dump_json(), media_type="application/json")


def to_base64(vector: list[float]) -> str:
    """The OpenAI ``encoding_format: "base64"`` form: little-endian float32 bytes, base64.

    ``numpy.frombuffer(base64.b64decode(s), dtype="<f4")`` gives the floats back (what the
    ``openai`` SDK does); the values are float32 already, so nothing is rounded.
    """
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
