"""OpenAI wire schemas (pydantic only). Requests reject unknown fields; responses serialize to the
exact OpenAI JSON."""

from lmforge.protocol.chat import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
)
from lmforge.protocol.common import PromptTokensDetails, StreamOptions, Usage
from lmforge.protocol.completions import (
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
)
from lmforge.protocol.embeddings import (
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)
from lmforge.protocol.models import ModelCard, ModelList

__all__ = [
    "ChatCompletion", "ChatCompletionChoice", "ChatCompletionChunk", "ChatCompletionChunkChoice",
    "ChatCompletionMessage", "ChatCompletionRequest", "ChatDelta", "ChatMessage", "Completion",
    "CompletionChoice", "CompletionChunk", "CompletionRequest", "ModelCard", "ModelList",
    "PromptTokensDetails", "StreamOptions", "Usage",
    "Embedding", "EmbeddingRequest", "EmbeddingResponse", "EmbeddingUsage",
]
