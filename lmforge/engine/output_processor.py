"""From sampled tokens to ``RequestOutput`` deltas: detokenization, stop strings, grammars, logprobs.

vLLM's ``OutputProcessor``: after ``Scheduler.update`` has appended each sampled token (and
finished requests on token-level stops: a stop token id, ``max_tokens``, the context length),
this turns the step into one output per sampled request. It owns the per-request state that only
output needs (the incremental detokenizer, the prompt logprobs until they are delivered) and
finds the stops that only the text or the grammar reveals: a stop string, a grammar that is
complete or has failed. Those it hands to ``Scheduler.finish_request``, which stays the only
writer of ``RequestStatus``. No torch here.
"""

from __future__ import annotations

import logging

from lmforge.engine.request import Request, RequestOutput, RequestStatus, TokenLogprob
from lmforge.engine.scheduler import Scheduler
from lmforge.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)


class OutputProcessor:
    """Builds each step's outputs; holds the output-only state of every unfinished request.

    Args:
        tokenizer: decodes the output tokens (``IncrementalDetokenizer``).
        scheduler: finishes the requests whose stop this finds.
    """

    def __init__(self, tokenizer: Tokenizer, scheduler: Scheduler):
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.prompt_logprobs: dict[str, list[TokenLogprob | None]] = {}  # until delivered

    def add_request(self, request: Request) -> None:
        """Start the request's detokenizer (its stop strings and special-token rules)."""
        params = request.params
        self.detokenizers[request.request_id] = IncrementalDetokenizer(
            self.tokenizer, request.prompt_token_ids, stop=params.stop,
            skip_special_tokens=params.skip_special_tokens,
            include_stop_str_in_output=params.include_stop_str_in_output)

    def abort_request(self, request_id: str) -> None:
        """Drop the request's state. Unknown ids are ignored."""
        self.detokenizers.pop(request_id, None)
        self.prompt_logprobs.pop(request_id, None)

    def record_prompt_logprobs(self, request: Request, first: int,
                               entries: list[TokenLogprob | None]) -> None:
        """Keep the logprobs of prompt positions ``first ..`` computed this step, by position (a
        recomputation after preemption overwrites instead of appending)."""
        stored = self.prompt_logprobs.setdefault(request.request_id,
                                                 [None] * request.num_prompt_tokens)
        stored[first:first + len(entries)] = entries

    def process(self, requests: list[Request],
                logprobs: list[TokenLogprob | None]) -> list[RequestOutput]:
        """One output per request sampled this step (each has just got its token), aligned
        with ``logprobs``; requests that end here are finished through the scheduler."""
        return [self._output(request, logprob) for request, logprob in zip(requests, logprobs)]

    def _output(self, request: Request, logprob: TokenLogprob | None) -> RequestOutput:
        token = request.output_token_ids[-1]
        self._advance_grammar(request, token)
        text = self._new_text(request, token)
        prompt_logprobs = None
        if request.params.prompt_logprobs is not None and request.num_output_tokens == 1:
            prompt_logprobs = self.prompt_logprobs.pop(request.request_id, None) or [None]
        return RequestOutput(
            request_id=request.request_id, text=text, token_ids=[token],
            finished=request.status.is_finished(),
            finish_reason=request.status.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            num_output_tokens=request.num_output_tokens,
            logprobs=None if logprob is None else [logprob],
            prompt_logprobs=prompt_logprobs, error=request.error,
            error_param=request.params.structured.param if request.error else None)

    def _new_text(self, request: Request, token: int) -> str:
        """The text ``token`` adds; a stop string in it finishes the request ("stop" even if
        the token also reached ``max_tokens``: a stop string wins over length, as in vLLM)."""
        detok = self.detokenizers[request.request_id]
        # A stop token id (eos included) ends the text without being part of it, as in vLLM.
        stop_token = (request.status == RequestStatus.FINISHED_STOPPED
                      and token in request.stop_token_ids
                      and not request.params.include_stop_str_in_output)
        text = "" if stop_token else detok.update([token])
        if detok.stopped:
            self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED, force=True)
        elif request.status.is_finished():
            text += detok.flush()
        if request.status.is_finished():
            del self.detokenizers[request.request_id]
        return text

    def _advance_grammar(self, request: Request, token: int) -> None:
        """Feed the sampled token to the request's grammar; finish the request ("stop") once
        the grammar is complete, so that it never waits for an EOS the model may not pick.

        A grammar can also fail here, in the grammar library (a resource limit such as a
        regex the lexer cannot expand, ``a{1000000}``): the request then finishes with
        ``FINISHED_ERROR`` and its ``error``, never as a normal-looking stop."""
        if request.grammar is None or request.status.is_finished():
            return
        if not request.grammar.accept(token) or request.grammar.failed:
            request.error = request.grammar.failure_message()
            logger.warning("request %s: its grammar failed after %d tokens: %s",
                           request.request_id, request.num_output_tokens, request.error)
            self.scheduler.finish_request(request, RequestStatus.FINISHED_ERROR)
        elif request.grammar.is_terminated:
            self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED)
