"""Batched per-request sampling: penalties, temperature, top-k, top-p, min-p and seeds.

Data flow of one ``Sampler.sample`` call on logits ``(B, V)``. Bias, penalties, then greedy, then
temperature follow vLLM's v1 sampler (``vllm/v1/sample/sampler.py``); the filters run in Hugging
Face's warper order (temperature, top-k, top-p, min-p), whereas vLLM applies min-p before top-k/p:

0. rows with a grammar (structured output) get -inf on every token the grammar forbids
   (``engine.structured.apply_token_bitmask``, as vLLM v1 applies its bitmask first), then
   ``logit_bias`` is added (``apply_logit_bias``);
1. penalties on the raw logits (``apply_penalties``): CTRL repetition penalty over prompt + output,
   then OpenAI frequency/presence penalties over output tokens only;
2. greedy rows (temperature 0) take the argmax of the penalized logits and stop there;
3. the other rows: divide by temperature, softmax, top-k and top-p (``apply_top_k_top_p``), min-p
   (``apply_min_p``), then one draw by the exponential race (``exponential_race``). The filters
   zero probabilities instead of setting logits to -inf: the same kept sets, one softmax.

Every step works on the whole batch with per-row parameter tensors ``(B,)`` and is skipped when no
row needs it, so an all-greedy batch without penalties costs one argmax.
"""

from __future__ import annotations

import torch

from lmforge.engine.penalties import apply_logit_bias, apply_penalties
from lmforge.engine.request import Request, SamplingParams, TokenLogprob
from lmforge.engine.structured import allocate_token_bitmask, apply_token_bitmask

# Temperatures below this are greedy: dividing by them overflows float32 (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
# Top-p looks for the nucleus among this many likeliest tokens before sorting a whole row.
TOP_P_CANDIDATES = 256


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log probabilities of chosen tokens and of each row's likeliest ones.

    Args:
        logits: (B, V) float, raw model output.
        token_ids: (B,) int64 chosen tokens.
        num_top: how many of the likeliest tokens to return per row (0..V).

    Returns:
        ``(chosen (B,), top_ids (B, num_top), top_logprobs (B, num_top))``, float32 natural logs
        of ``softmax(logits)``, likeliest first (``torch.topk`` order for ties).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top = logprobs.topk(num_top, dim=-1)
    return chosen, top.indices, top.values


def apply_top_k_top_p(probs: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Zero, in place, the tokens outside each row's top-k, then outside its top-p nucleus.

    Semantics of HF ``TopKLogitsWarper`` then ``TopPLogitsWarper`` and of vLLM
    ``vllm/v1/sample/ops/topk_topp_sampler.py::apply_top_k_top_p``, in probability space (softmax
    is monotone, so the kept sets are the same). Top-k keeps every token at least as likely as the
    k-th (ties kept). Top-p (Holtzman et al., arXiv:1904.09751) keeps the smallest set of most
    likely tokens whose probability, renormalized after top-k, sums to >= p, and always the top
    token. Naive equivalent per row: sort descending, keep token i while the mass before it is < p.

    Instead of a full sort over V (slow on CPU: ~0.5 s for 64 x 49152), the kept set is found
    among the ``TOP_P_CANDIDATES`` (or max k) most likely tokens; only rows whose nucleus reaches
    past the candidates are sorted in full. Each row's kept set becomes a probability threshold,
    so ties at the boundary are all kept.

    Args:
        probs: (B, V) softmax probabilities (rows sum to 1). Modified in place.
        top_k: (B,) int64 in [1, V] (V = off), or None when no row uses top-k.
        top_p: (B,) float in (0, 1] (1 = off), or None when no row uses top-p.

    Returns:
        ``probs`` with the dropped tokens at 0 (rows no longer sum to 1).
    """
    batch, vocab = probs.shape
    if top_k is None:
        top_k = torch.full((batch,), vocab, device=probs.device)
    max_k = int(torch.where(top_k < vocab, top_k, 1).max())  # rows with k off must not widen it
    width = max_k if top_p is None else min(vocab, max(max_k, TOP_P_CANDIDATES))
    threshold, short = _thresholds(probs, top_k, top_p, width)
    if short is not None and bool(short.any()):
        rows = short.nonzero().squeeze(1)
        threshold[rows] = _thresholds(probs[rows], top_k[rows], top_p[rows], vocab)[0]
    return probs.masked_fill_(probs < threshold.unsqueeze(1), 0.0)


def _thresholds(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor | None,
                width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B,) smallest kept probability per row (0: keep all), and (B,) bool "nucleus not in width".

    Looks only at the ``width`` most likely tokens of each row.
    """
    vocab = probs.shape[1]
    values = probs.topk(width, dim=-1).values if width < vocab \
        else probs.sort(dim=-1, descending=True).values  # (B, width), descending
    kept = torch.arange(width, device=probs.device) < top_k.unsqueeze(1)  # a prefix of each row
    k_on = top_k < vocab
    on, short = k_on, None
    if top_p is not None:
        p_on = top_p < 1.0
        mass = values.masked_fill(~kept, 0.0)
        # Renormalize over the top-k survivors; a row without top-k already sums to 1.
        mass /= torch.where(k_on, mass.sum(dim=-1), 1.0).unsqueeze(1)
        mass = mass.cumsum_(dim=-1)
        before = torch.nn.functional.pad(mass[:, :-1], (1, 0))  # mass of strictly likelier tokens
        kept &= (before < top_p.unsqueeze(1)) | ~p_on.unsqueeze(1)
        on = k_on | p_on
        if width < vocab:  # a nucleus not reached within the candidates needs the full row
            short = p_on & ~k_on & (mass[:, -1] < top_p)
    last = kept.sum(dim=-1, keepdim=True) - 1  # >= 0: the top token is always kept
    threshold = values.gather(1, last).squeeze(1)
    return torch.where(on, threshold, 0.0), short


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the probability of tokens below ``min_p * max_prob`` of their row, in place.

    Min-p sampling (Nguyen et al., arXiv:2407.01082); HF ``MinPLogitsWarper``. The top token is
    never dropped because ``min_p <= 1``. Rows are left unnormalized: the exponential race only
    compares ratios within a row.

    Args:
        probs: (B, V) probabilities (softmax of the filtered logits).
        min_p: (B,) float in [0, 1]; 0 = off.
    """
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return probs.masked_fill_(probs < threshold, 0.0)


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator],
                     default: torch.Generator) -> torch.Tensor:
    """Sample one token per row: ``argmax(probs / q)`` with ``q = -log(U) ~ Exp(1)`` per token.

    ``P(argmax = t) = probs[t] / sum(probs)`` (the exponential-race form of the Gumbel-max trick),
    as vLLM ``topk_topp_sampler.py::random_sample``. Row ``i`` in ``generators`` draws its V
    uniforms from its own generator and nothing else does, so a seeded request's tokens do not
    depend on its batch or row; the other rows draw from ``default`` in one batched call.
    ``-log1p(-uniform_())`` rather than ``exponential_()``: same law, 4-5x faster on CPU.

    Args:
        probs: (B, V) non-negative, each row with a positive entry; need not sum to 1.
        generators: row index -> that row's generator (on ``probs.device``).
        default: generator for every other row.

    Returns:
        (B,) int64 token ids.
    """
    u = torch.empty_like(probs)
    if len(generators) < u.shape[0]:
        u.uniform_(generator=default)
    for row, generator in generators.items():
        u[row].uniform_(generator=generator)
    # q = -log(1 - U) is finite for U in [0, 1); the floor keeps it > 0, so probs / q is never
    # NaN (0 / 0) and a zero-probability token can never win, not even on a zero draw.
    q = u.neg_().log1p_().neg_().clamp_(min=torch.finfo(u.dtype).tiny)
    return (probs / q).argmax(dim=-1)


class Sampler:
    """Batched, per-request sampling: penalties, temperature, top-k, top-p, min-p, seeds.

    Args:
        vocab_size: number of valid token ids. Logit columns at or above it (padding of the
            model's embedding matrix) are never sampled.
        device: where ``sample`` receives logits; seeded generators are created there.
        seed: seed of the sampler's own generator, used by unseeded requests.

    A request with ``params.seed`` draws only from its own ``torch.Generator`` (created on
    ``device`` and kept in ``request.generator``), so its tokens are the same in any batch and at
    any row; the same seed gives different streams on CPU and CUDA (different generators).
    Temperatures below ``SAMPLING_EPS`` (1e-5) are greedy.

    Example::

        sampler = Sampler(vocab_size=49152)
        token_ids = sampler.sample(logits, requests)  # logits (len(requests), >= 49152)
    """

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu", seed: int = 0):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """Pick the next token of each request.

        Args:
            logits: (B, V) with V >= vocab_size, on this sampler's device; row i belongs to
                ``requests[i]``. Not modified. Any float dtype; the math runs in float32.
            requests: B requests; reads ``params``, ``prompt_token_ids``,
                ``output_token_ids`` and ``grammar`` (whose mask it asks for; advancing it is
                the engine's job); creates ``request.generator`` for a seeded request.

        Returns:
            B token ids, each in [0, vocab_size).

        Raises:
            ValueError: logits are not (len(requests), >= vocab_size) or on another device type.
        """
        self._check(logits, requests)
        logits = logits[:, :self.vocab_size].float()
        params = [r.params for r in requests]
        if any(r.grammar is not None for r in requests):
            logits = self._constrain(logits, requests)
        if any(p.logit_bias for p in params):
            logits = apply_logit_bias(logits, [p.logit_bias for p in params])
        logits = self._penalize(logits, requests, params)
        random_rows = [i for i, p in enumerate(params) if p.temperature >= SAMPLING_EPS]
        if not random_rows:
            return logits.argmax(dim=-1).tolist()
        if len(random_rows) == len(requests):
            return self._sample_random(logits, requests).tolist()
        tokens = logits.argmax(dim=-1)  # greedy rows keep these; the others are overwritten
        index = torch.tensor(random_rows, device=logits.device)
        subset = [requests[i] for i in random_rows]
        tokens[index] = self._sample_random(logits[index], subset)
        return tokens.tolist()

    def logprobs(self, logits: torch.Tensor, requests: list[Request], token_ids: list[int]
                 ) -> list[TokenLogprob | None]:
        """The ``TokenLogprob`` of each request that asked for logprobs (None for the others).

        Computed from the raw logits (before bias, penalties and temperature), on the rows that
        need them only.

        Args:
            logits: (B, V) as given to ``sample``; not modified.
            requests: the B requests; ``params.logprobs`` says how many alternatives.
            token_ids: the B tokens ``sample`` chose.
        """
        rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        result: list[TokenLogprob | None] = [None] * len(requests)
        if rows:
            entries = self._token_logprobs(
                logits[torch.tensor(rows, device=logits.device)], [token_ids[i] for i in rows],
                [requests[i].params.logprobs for i in rows])
            for i, entry in zip(rows, entries):
                result[i] = entry
        return result

    def prompt_logprobs(self, logits: torch.Tensor, targets: list[int], num_top: int
                        ) -> list[TokenLogprob]:
        """``TokenLogprob`` of each prompt token given the logits that predict it.

        Args:
            logits: (m, V) raw logits; row i predicts ``targets[i]``.
            targets: m prompt token ids.
            num_top: alternatives per token (0..20).
        """
        return self._token_logprobs(logits, targets, [num_top] * len(targets))

    def _token_logprobs(self, logits: torch.Tensor, token_ids: list[int], num_tops: list[int]
                        ) -> list[TokenLogprob]:
        """Row i: ``token_ids[i]``'s logprob and the ``num_tops[i]`` likeliest tokens."""
        chosen, top_ids, top_lps = compute_logprobs(
            logits[:, :self.vocab_size], torch.tensor(token_ids, device=logits.device),
            max(num_tops))
        return [TokenLogprob(t, c, list(zip(i[:k], v[:k]))) for t, c, i, v, k in
                zip(token_ids, chosen.tolist(), top_ids.tolist(), top_lps.tolist(), num_tops)]

    def _check(self, logits: torch.Tensor, requests: list[Request]) -> None:
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits must be (num_requests={len(requests)}, vocab), "
                             f"got {tuple(logits.shape)}")
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns but vocab_size is "
                             f"{self.vocab_size}; build the Sampler with the tokenizer's vocab size")
        if logits.device.type != self.device.type:
            raise ValueError(f"logits are on {logits.device} but the sampler on {self.device}; "
                             "create the Sampler with the model runner's device")

    def _constrain(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Mask, on each row with a grammar, the tokens it forbids (a copy; others untouched)."""
        rows = [i for i, r in enumerate(requests) if r.grammar is not None]
        bitmask = allocate_token_bitmask(len(rows), self.vocab_size)
        for j, i in enumerate(rows):
            requests[i].grammar.fill_bitmask(bitmask, j)
        return apply_token_bitmask(logits, bitmask, rows)

    def _penalize(self, logits: torch.Tensor, requests: list[Request],
                  params: list[SamplingParams]) -> torch.Tensor:
        """Penalties on the rows that have any; other rows are left as they are."""
        rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0
                or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
        if not rows:
            return logits
        sub = [params[i] for i in rows]
        penalized = apply_penalties(
            logits if len(rows) == len(params) else logits[rows],
            [requests[i].prompt_token_ids for i in rows],
            [requests[i].output_token_ids for i in rows],
            _row_tensor([p.repetition_penalty for p in sub], logits.device)
            if any(p.repetition_penalty != 1.0 for p in sub) else None,
            _row_tensor([p.frequency_penalty for p in sub], logits.device),
            _row_tensor([p.presence_penalty for p in sub], logits.device))
        if len(rows) == len(params):
            return penalized
        logits = logits.clone()  # the caller's tensor stays untouched
        logits[rows] = penalized
        return logits

    def _sample_random(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """(R,) tokens for R rows that all sample at temperature > 0."""
        params = [r.params for r in requests]
        temperature = _row_tensor([p.temperature for p in params], logits.device)
        probs = (logits / temperature.unsqueeze(1)).softmax(dim=-1)
        vocab = probs.shape[1]
        top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
        use_k = any(k < vocab for k in top_k)
        use_p = any(p.top_p < 1.0 for p in params)
        if use_k or use_p:
            probs = apply_top_k_top_p(
                probs,
                torch.tensor(top_k, device=probs.device) if use_k else None,
                _row_tensor([p.top_p for p in params], probs.device) if use_p else None)
        if any(p.min_p > 0.0 for p in params):
            probs = apply_min_p(probs, _row_tensor([p.min_p for p in params], probs.device))
        generators = {i: self._generator_of(r) for i, r in enumerate(requests)
                      if r.params.seed is not None}
        return exponential_race(probs, generators, self.generator)

    def _generator_of(self, request: Request) -> torch.Generator:
        """The request's own generator, created from ``params.seed`` on first use."""
        if request.generator is None:
            request.generator = torch.Generator(self.device)
            # torch takes uint64 seeds; wrapping keeps an out-of-range seed from failing the step.
            request.generator.manual_seed(request.params.seed % 2**64)
        return request.generator


def _row_tensor(values: list[float], device: torch.device) -> torch.Tensor:
    """(B,) float32 per-row parameter tensor."""
    return torch.tensor(values, dtype=torch.float32, device=device)
