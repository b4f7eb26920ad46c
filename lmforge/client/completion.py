"""``Completion`` and ``ChatCompletion``: LLM Engine's completion interface over lmforge's
``/v1/completions`` and ``/v1/chat/completions``.

LLM Engine's arguments become the OpenAI body (``max_new_tokens`` -> ``max_tokens``,
``stop_sequences`` -> ``stop``, ``return_token_log_probs`` -> ``logprobs``); every other keyword
goes into the body as it is, so all of lmforge's sampling parameters are there (``top_p``,
``top_k``, ``min_p``, ``presence_penalty``, ``frequency_penalty``, ``repetition_penalty``,
``seed``, ``guided_json``, ``guided_regex``, ``guided_choice``, ``response_format``, ``tools``,
...), and an unknown one is the server's 400. A stream asks for vLLM's
``stream_options.continuous_usage_stats``, so each piece knows how many tokens came so far.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from lmforge.client import transport
from lmforge.client.types import (
    CompletionOutput,
    CompletionStreamOutput,
    CompletionStreamResponse,
    CompletionSyncResponse,
    TokenOutput,
)

DEFAULT_TIMEOUT_S = 10  # LLM Engine's default; seconds per read when streaming


class _Generation:
    """What ``Completion`` and ``ChatCompletion`` share: the body, the call, the parsing.
    Subclasses say where the prompt goes (``_prompt_body``) and how a choice reads."""

    path: str

    @classmethod
    def _body(cls, model: str, prompt: Any, max_new_tokens: int, temperature: float,
              stop_sequences: list[str] | None, return_token_log_probs: bool, stream: bool,
              extra: dict[str, Any]) -> dict[str, Any]:
        if extra.get("n", 1) != 1:
            raise ValueError("n must be 1 here (one output per call); use the openai SDK "
                             "against the same server for several choices")
        body = {"model": model, **cls._prompt_body(prompt), "max_tokens": max_new_tokens,
                "temperature": temperature, "stream": stream}
        if stop_sequences:
            body["stop"] = list(stop_sequences)
        if return_token_log_probs:
            body.update(cls._logprobs_body())
        if stream:
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        return body | extra

    @classmethod
    def _prompt_body(cls, prompt: Any) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _logprobs_body(cls) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _text(cls, choice: dict[str, Any], streamed: bool) -> tuple[str, list | None]:
        """The choice's text and tool calls."""
        raise NotImplementedError

    @classmethod
    def _tokens(cls, choice: dict[str, Any]) -> list[TokenOutput] | None:
        raise NotImplementedError

    @classmethod
    def _sync_response(cls, body: dict[str, Any]) -> CompletionSyncResponse:
        choice, usage = body["choices"][0], body.get("usage") or {}
        text, calls = cls._text(choice, streamed=False)
        return CompletionSyncResponse(request_id=body["id"], output=CompletionOutput(
            text=text, num_prompt_tokens=usage.get("prompt_tokens"),
            num_completion_tokens=usage.get("completion_tokens", 0), tokens=cls._tokens(choice),
            finish_reason=choice.get("finish_reason"), tool_calls=calls))

    @classmethod
    def _stream_response(cls, chunk: dict[str, Any]) -> CompletionStreamResponse | None:
        """One piece, or None for chunks that add nothing (the role opener, the usage-only
        last chunk)."""
        if not chunk.get("choices"):
            return None
        choice, usage = chunk["choices"][0], chunk.get("usage") or {}
        text, calls = cls._text(choice, streamed=True)
        finish = choice.get("finish_reason")
        if not text and not calls and finish is None:
            return None
        tokens = cls._tokens(choice)
        return CompletionStreamResponse(request_id=chunk["id"], output=CompletionStreamOutput(
            text=text, finished=finish is not None, finish_reason=finish, tool_calls=calls,
            num_prompt_tokens=usage.get("prompt_tokens"),
            num_completion_tokens=usage.get("completion_tokens"), tokens=tokens,
            token=tokens[0] if tokens and len(tokens) == 1 else None))

    @classmethod
    def _create(cls, body: dict[str, Any], timeout: float
                ) -> CompletionSyncResponse | Iterator[CompletionStreamResponse]:
        if body["stream"]:
            return cls._iterate(body, timeout)
        return cls._sync_response(transport.request("POST", cls.path, json=body,
                                                     timeout=timeout).json())

    @classmethod
    def _iterate(cls, body: dict[str, Any], timeout: float) -> Iterator[CompletionStreamResponse]:
        for chunk in transport.sse_events("POST", cls.path, json=body, timeout=timeout):
            piece = cls._stream_response(chunk)
            if piece is not None:
                yield piece

    @classmethod
    async def _acreate(cls, body: dict[str, Any], timeout: float
                       ) -> CompletionSyncResponse | AsyncIterator[CompletionStreamResponse]:
        if body["stream"]:
            return cls._aiterate(body, timeout)
        response = await transport.arequest("POST", cls.path, json=body, timeout=timeout)
        return cls._sync_response(response.json())

    @classmethod
    async def _aiterate(cls, body: dict[str, Any], timeout: float
                        ) -> AsyncIterator[CompletionStreamResponse]:
        async for chunk in transport.asse_events("POST", cls.path, json=body, timeout=timeout):
            piece = cls._stream_response(chunk)
            if piece is not None:
                yield piece


class Completion(_Generation):
    """Text completion of a prompt (``/v1/completions``)::

        from lmforge.client import Completion

        response = Completion.create(model="smollm2-135m-instruct",
                                     prompt="The capital of France is", max_new_tokens=16)
        print(response.output.text)

        for piece in Completion.create(model="smollm2-135m-instruct", prompt="Once upon a",
                                       max_new_tokens=32, stream=True):
            print(piece.output.text, end="", flush=True)
    """

    path = "/v1/completions"

    @classmethod
    def create(cls, model: str, prompt: str, max_new_tokens: int = 20, temperature: float = 0.2,
               stop_sequences: list[str] | None = None, return_token_log_probs: bool = False,
               timeout: float = DEFAULT_TIMEOUT_S, stream: bool = False, **extra: Any
               ) -> CompletionSyncResponse | Iterator[CompletionStreamResponse]:
        """Complete ``prompt`` with ``model``.

        Args:
            model: a model the server serves (``Model.list()``), a fine-tuned one included.
            prompt: the text to continue (or a list of token ids).
            max_new_tokens: at most this many tokens are generated.
            temperature: 0 is greedy; higher samples more freely.
            stop_sequences: generation stops before any of these strings.
            return_token_log_probs: also return each generated token with its log probability
                (``output.tokens``; ``output.token`` per streamed piece).
            timeout: seconds to wait for the answer (per piece, when streaming).
            stream: yield the output piece by piece as it is generated.
            **extra: more body fields, as the server takes them (``top_p``, ``top_k``,
                ``seed``, ``presence_penalty``, ``guided_json``, ``guided_regex``, ...).

        Returns:
            ``CompletionSyncResponse``, or with ``stream=True`` an iterator of
            ``CompletionStreamResponse`` (the last one has ``output.finished``).

        Raises:
            BadRequestError: a parameter the server refuses (``param`` names it).
            NotFoundError: no such model. AuthenticationError: a missing or wrong API key.
            RateLimitError, ServerError: still so after the retries.
            APIConnectionError: no server answered. TimeoutError: ``timeout`` ran out.
            ValueError: ``n`` other than 1 in ``extra``.
        """
        body = cls._body(model, prompt, max_new_tokens, temperature, stop_sequences,
                         return_token_log_probs, stream, extra)
        return cls._create(body, timeout)

    @classmethod
    async def acreate(cls, model: str, prompt: str, max_new_tokens: int = 20,
                      temperature: float = 0.2, stop_sequences: list[str] | None = None,
                      return_token_log_probs: bool = False, timeout: float = DEFAULT_TIMEOUT_S,
                      stream: bool = False, **extra: Any
                      ) -> CompletionSyncResponse | AsyncIterator[CompletionStreamResponse]:
        """``create`` for asyncio: ``await`` it for the response, or, with ``stream=True``,
        for an async iterator of pieces (``async for piece in await Completion.acreate(...)``).
        Same arguments and errors as ``create``."""
        body = cls._body(model, prompt, max_new_tokens, temperature, stop_sequences,
                         return_token_log_probs, stream, extra)
        return await cls._acreate(body, timeout)

    @classmethod
    def _prompt_body(cls, prompt: Any) -> dict[str, Any]:
        return {"prompt": prompt}

    @classmethod
    def _logprobs_body(cls) -> dict[str, Any]:
        return {"logprobs": 0}  # the sampled tokens' own logprobs, no alternatives

    @classmethod
    def _text(cls, choice: dict[str, Any], streamed: bool) -> tuple[str, list | None]:
        return choice.get("text") or "", None

    @classmethod
    def _tokens(cls, choice: dict[str, Any]) -> list[TokenOutput] | None:
        logprobs = choice.get("logprobs")
        if not logprobs or logprobs.get("tokens") is None:
            return None
        return [TokenOutput(token=t, log_prob=lp)
                for t, lp in zip(logprobs["tokens"], logprobs["token_logprobs"])]


class ChatCompletion(_Generation):
    """Chat with a model (``/v1/chat/completions``, the model's chat template)::

        from lmforge.client import ChatCompletion

        response = ChatCompletion.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_new_tokens=32)
        print(response.output.text)
    """

    path = "/v1/chat/completions"

    @classmethod
    def create(cls, model: str, messages: list[dict[str, Any]], max_new_tokens: int = 20,
               temperature: float = 0.2, stop_sequences: list[str] | None = None,
               return_token_log_probs: bool = False, timeout: float = DEFAULT_TIMEOUT_S,
               stream: bool = False, **extra: Any
               ) -> CompletionSyncResponse | Iterator[CompletionStreamResponse]:
        """Answer the conversation ``messages`` (OpenAI's ``[{"role", "content"}, ...]``).

        The arguments, return types and errors are ``Completion.create``'s, with ``messages``
        for ``prompt``; ``output.text`` is the assistant's reply, and with ``tools`` in
        ``extra`` the parsed calls are in ``output.tool_calls``.
        """
        body = cls._body(model, messages, max_new_tokens, temperature, stop_sequences,
                         return_token_log_probs, stream, extra)
        return cls._create(body, timeout)

    @classmethod
    async def acreate(cls, model: str, messages: list[dict[str, Any]], max_new_tokens: int = 20,
                      temperature: float = 0.2, stop_sequences: list[str] | None = None,
                      return_token_log_probs: bool = False, timeout: float = DEFAULT_TIMEOUT_S,
                      stream: bool = False, **extra: Any
                      ) -> CompletionSyncResponse | AsyncIterator[CompletionStreamResponse]:
        """``create`` for asyncio, as ``Completion.acreate``."""
        body = cls._body(model, messages, max_new_tokens, temperature, stop_sequences,
                         return_token_log_probs, stream, extra)
        return await cls._acreate(body, timeout)

    @classmethod
    def _prompt_body(cls, prompt: Any) -> dict[str, Any]:
        return {"messages": prompt}

    @classmethod
    def _logprobs_body(cls) -> dict[str, Any]:
        return {"logprobs": True}

    @classmethod
    def _text(cls, choice: dict[str, Any], streamed: bool) -> tuple[str, list | None]:
        message = choice.get("delta" if streamed else "message") or {}
        return message.get("content") or "", message.get("tool_calls")

    @classmethod
    def _tokens(cls, choice: dict[str, Any]) -> list[TokenOutput] | None:
        logprobs = choice.get("logprobs")
        if not logprobs or logprobs.get("content") is None:
            return None
        return [TokenOutput(token=e["token"], log_prob=e["logprob"]) for e in logprobs["content"]]
