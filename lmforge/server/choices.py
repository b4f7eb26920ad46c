"""From engine outputs to OpenAI choices: the streamed chunks and the final response of one chat or
completion request (``ChatChoices``, ``CompletionChoices``), built for the routes in
``server/inference.py``.

Each holds what its request's chunks share (the response id, ``created``, the model name, the
per-choice tool-call parsers or the characters sent so far), so a route only runs the
``Generation`` and hands ``chunk`` to ``generation.stream`` or the collected results to
``response``.
"""

from __future__ import annotations

import time

from lmforge.engine.request import (
    CompletionOutput,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from lmforge.protocol import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
)
from lmforge.protocol.logprobs import CompletionLogprobs
from lmforge.server.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from lmforge.server.tools import ToolCallStream, ToolPlan


class ChatChoices:
    """The chunks and the response of one chat completion with ``num_choices`` choices.

    Args:
        response_id: the ``chatcmpl-...`` id of every chunk and of the response.
        body: the request (its ``model`` is the served name by now).
        tools: the request's tool plan: each choice's text is parsed for tool calls.
        texts: the tokenizer's token texts (for logprobs).
        params: the request's sampling parameters (``logprobs``).
    """

    def __init__(self, response_id: str, num_choices: int, body: ChatCompletionRequest,
                 tools: ToolPlan, texts: TokenTexts, params: SamplingParams):
        self.id, self.model, self.tools = response_id, body.model, tools
        self.texts, self.params = texts, params
        self.created = int(time.time())
        self.num_choices = num_choices
        self.streams = [ToolCallStream(tools) for _ in range(num_choices)]

    def chunk(self, index: int, out: RequestOutput | None, finish_reason: str | None
              ) -> ChatCompletionChunk | None:
        """The chunk for one engine delta (``out``), or the closing one (``out`` None); None
        when the delta has nothing to send yet (a tool call still being parsed)."""
        if out is None:
            content, calls, finish_reason = self.streams[index].finish(finish_reason)
        else:
            content, calls = self.streams[index].feed(out.text)
            if not content and not calls and not out.logprobs:
                return None
        delta = ChatDelta(content=content or None, tool_calls=calls or None)
        logprobs = None if out is None or out.logprobs is None else chat_logprobs(self.texts,
                                                                                 out.logprobs)
        choice = ChatCompletionChunkChoice(index=index, delta=delta, logprobs=logprobs,
                                           finish_reason=finish_reason)
        return self._chunk([choice])

    def opening(self) -> list[ChatCompletionChunk]:
        """One chunk per choice announcing the assistant role, as OpenAI streams begin."""
        return [self._chunk([ChatCompletionChunkChoice(
            index=i, delta=ChatDelta(role="assistant", content=""))])
            for i in range(self.num_choices)]

    def usage_chunk(self) -> ChatCompletionChunk:
        """The last chunk of ``stream_options.include_usage``: no choices (usage added later)."""
        return self._chunk([])

    def response(self, results: list[CompletionOutput], usage: Usage) -> ChatCompletion:
        """The non-streamed response from every choice's collected output."""
        choices = []
        for i, r in enumerate(results):
            content, calls, finish_reason = self.tools.parse(r.text, r.finish_reason)
            choices.append(ChatCompletionChoice(
                index=i, message=ChatCompletionMessage(content=content, tool_calls=calls or None),
                logprobs=None if self.params.logprobs is None
                else chat_logprobs(self.texts, r.logprobs),
                finish_reason=finish_reason))
        return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage,
                              choices=choices)

    def _chunk(self, choices: list[ChatCompletionChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=choices)


class CompletionChoices:
    """The chunks and the response of one completion: ``n`` choices per prompt, choice ``i``
    answering prompt ``i // n``; ``echo`` puts the prompt (and, with ``logprobs``, its tokens'
    logprobs) before the first delta and before the final text.

    Args:
        prompts: each prompt's token ids.
        echoes: the text echoed before each prompt's choices ("" without ``echo``).
        n: choices per prompt.
    """

    def __init__(self, response_id: str, body: CompletionRequest, prompts: list[list[int]],
                 echoes: list[str], n: int, texts: TokenTexts, params: SamplingParams):
        self.id, self.model, self.echo = response_id, body.model, body.echo
        self.prompts, self.echoes, self.n = prompts, echoes, n
        self.texts, self.params = texts, params
        self.created = int(time.time())
        self.offsets: dict[int, int] = {}  # characters of each choice's text sent so far

    def chunk(self, index: int, out: RequestOutput | None, finish_reason: str | None
              ) -> Completion | None:
        """The chunk for one engine delta (``out``), or the closing one (``out`` None); None
        when the delta has no text and no logprobs."""
        text, logprobs = "", None
        if out is not None:
            offset = self.offsets.get(index, 0)
            text = (self.echoes[index // self.n] if _first(out) else "") + out.text
            logprobs = self._logprobs(index, out.token_ids, out.logprobs or [],
                                      out.prompt_logprobs, offset)  # echo: the first delta
            self.offsets[index] = offset + len(text)
            if not text and logprobs is None:
                return None
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                  finish_reason=finish_reason)
        return Completion(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self) -> Completion:
        """The last chunk of ``stream_options.include_usage``: no choices (usage added later)."""
        return Completion(id=self.id, created=self.created, model=self.model, choices=[])

    def response(self, results: list[CompletionOutput], usage: Usage) -> Completion:
        """The non-streamed response from the chosen outputs, in choice order."""
        choices = [CompletionChoice(
            index=i, text=self.echoes[i // self.n] + r.text, finish_reason=r.finish_reason,
            logprobs=self._logprobs(i, r.token_ids, r.logprobs,
                                    r.prompt_logprobs if self.echo else None))
            for i, r in enumerate(results)]
        return Completion(id=self.id, created=self.created, model=self.model, usage=usage,
                          choices=choices)

    def _logprobs(self, index: int, token_ids: list[int], entries: list[TokenLogprob],
                  prompt_entries: list[TokenLogprob | None] | None, offset: int = 0
                  ) -> CompletionLogprobs | None:
        """Logprobs of these tokens, preceded by the prompt's when ``prompt_entries`` is set."""
        if self.params.logprobs is None:
            return None
        if prompt_entries is not None:
            token_ids = self.prompts[index // self.n] + token_ids
            entries = list(prompt_entries) + entries
        return completion_logprobs(self.texts, token_ids, entries, offset)


def _first(out: RequestOutput) -> bool:
    """Whether this delta is the request's first (it carries its first generated token)."""
    return out.num_output_tokens == len(out.token_ids)
