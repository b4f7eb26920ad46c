"""lmforge's Python client: Scale's LLM Engine client interface (``llmengine``) on an lmforge
server, so that code written for ``llmengine`` ports by changing the import. It needs only
httpx and pydantic (never torch)::

    from lmforge.client import Completion, configure

    configure(base_url="http://127.0.0.1:8000")  # or LMFORGE_BASE_URL / LMFORGE_API_KEY
    response = Completion.create(model="smollm2-135m-instruct",
                                 prompt="The capital of France is", max_new_tokens=16)
    print(response.output.text)

Classes: ``Completion`` and ``ChatCompletion`` (``create``, ``acreate``; streaming),
``FineTune``, ``Model``, ``File``, ``Batch``. Errors: ``lmforge.client.errors``.
"""

from lmforge.client.batch import Batch
from lmforge.client.completion import ChatCompletion, Completion
from lmforge.client.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    RateLimitError,
    RateLimitExceededError,
    ServerError,
    TimeoutError,
    UnauthorizedError,
)
from lmforge.client.file import File
from lmforge.client.fine_tune import FineTune
from lmforge.client.model import Model
from lmforge.client.transport import configure, settings
from lmforge.client.types import *  # noqa: F403  (the response types, as llmengine exports them)
from lmforge.client.types import __all__ as _types

__all__ = ["APIConnectionError", "APIError", "AuthenticationError", "BadRequestError", "Batch",
           "ChatCompletion", "Completion", "ConflictError", "File", "FineTune", "Model",
           "NotFoundError", "RateLimitError", "RateLimitExceededError", "ServerError",
           "TimeoutError", "UnauthorizedError", "configure", "settings", *_types]
