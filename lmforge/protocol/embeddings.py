"""``/v1/embeddings`` wire schemas (OpenAI API reference, "Create embeddings")."""

from __future__ import annotations

from typing import Literal

from lmforge.errors import InvalidRequestError
from lmforge.protocol.base import RequestModel, ResponseModel

# A string, several strings, one token-id input, or several token-id inputs.
EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(RequestModel):
    """The request body.

    ``encoding_format``: ``float`` (a JSON list) or ``base64`` (the little-endian float32 bytes,
    base64-encoded; the ``openai`` SDK asks for it by default and decodes it). ``dimensions``
    cannot shorten an embedding here: it must be absent or the model's hidden size. ``user`` is
    accepted and ignored.
    """

    model: str | None = None  # None: the base model, when it is the only one served
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None
    user: str | None = None

    def check(self, embedding_size: int) -> None:
        """Reject an empty input and a ``dimensions`` other than ``embedding_size``.

        Raises:
            InvalidRequestError: naming the parameter.
        """
        if self.input == [] or any(i == "" or i == [] for i in self.inputs()):
            raise InvalidRequestError("input must not be empty (nor any of its items)",
                                      param="input")
        if self.dimensions is not None and self.dimensions != embedding_size:
            raise InvalidRequestError(
                f"dimensions must be {embedding_size} (this model's hidden size) or omitted; "
                f"got {self.dimensions}: lmforge does not shorten embeddings", param="dimensions")

    def inputs(self) -> list[str | list[int]]:
        """The inputs as a list: each a string or a list of token ids.

        ``"a"`` -> ``["a"]``; ``[1, 2]`` -> ``[[1, 2]]``; lists of either stay as they are.
        """
        if isinstance(self.input, str):
            return [self.input]
        if self.input and all(isinstance(t, int) for t in self.input):
            return [list(self.input)]  # type: ignore[arg-type]
        return list(self.input)  # type: ignore[arg-type]


class Embedding(ResponseModel):
    """One input's embedding: floats, or a base64 string of little-endian float32 bytes."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(ResponseModel):
    prompt_tokens: int  # tokens of all inputs
    total_tokens: int  # the same: an embedding generates nothing


class EmbeddingResponse(ResponseModel):
    """The response body: one ``Embedding`` per input, in input order."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
