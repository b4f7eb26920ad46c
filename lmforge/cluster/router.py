"""Which engine replica serves a request: prefix affinity, else the least loaded (no Ray here).

The policy is SGLang's cache-aware router (``sgl-router``'s ``cache_aware`` policy), on text:

1. The routing key (``routing_key``: the model and the conversation's messages, or the prompt,
   in order) is cut into blocks of ``block_chars`` characters; block k is named by a hash of
   blocks 0..k, so a name stands for the whole prefix up to it.
2. Each replica remembers the block names it was sent (an LRU of ``capacity`` names): what its
   prefix cache most likely holds.
3. If the load is unbalanced (the busiest replica has more than ``balance_abs`` requests in
   flight beyond the idlest AND more than ``balance_rel`` times as many), the idlest wins.
4. Else the replica holding the longest run of the key's leading blocks wins if that run covers
   at least ``match_threshold`` of the key's blocks (a conversation's next turn extends its
   previous prompt, so it returns to the replica that cached it); else the least loaded wins.

A replica is either up or down (``mark_down`` after its actor died; ``mark_up`` when it answers
again); down replicas get nothing. Between replicas equally loaded, the one sent fewer
requests so far wins, then the one listed first.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class RouterConfig:
    """The prefix-affinity policy's knobs (SGLang's router names in brackets)."""

    block_chars: int = 32  # characters per prefix block
    match_threshold: float = 0.5  # share of a key's blocks a replica must hold [cache_threshold]
    balance_abs: int = 8  # in-flight difference that counts as unbalanced [balance_abs_threshold]
    balance_rel: float = 1.5  # ... together with this ratio [balance_rel_threshold]
    capacity: int = 1 << 16  # block names remembered per replica [max_tree_size]


class NoReplicaError(RuntimeError):
    """Every replica is down (or excluded): nothing can serve the request now."""


class PrefixAffinityRouter:
    """Routes requests over named replicas; single-threaded (the ingress's event loop).

    Args:
        replicas: the replica names, in tie-breaking order.
        config: the policy's knobs.

    Example::

        router = PrefixAffinityRouter(["engine-0", "engine-1"])
        name = router.choose(routing_key(body))   # counted in flight from here
        ...                                      # send the request to ``name``
        router.release(name)                     # its response ended
    """

    def __init__(self, replicas: list[str], config: RouterConfig | None = None):
        if not replicas:
            raise ValueError("a router needs at least one replica")
        self.config = config or RouterConfig()
        self.replicas = list(replicas)
        self.in_flight = {name: 0 for name in replicas}
        self.routed = {name: 0 for name in replicas}  # requests sent, for /metrics
        self.down: set[str] = set()
        self._blocks: dict[str, OrderedDict[int, None]] = {n: OrderedDict() for n in replicas}

    def choose(self, key: str | None, exclude: tuple[str, ...] = ()) -> str:
        """The replica for a request with routing ``key`` (None: least loaded), counted in
        flight until ``release``. Raises NoReplicaError when every candidate is down."""
        candidates = [n for n in self.replicas if n not in self.down and n not in exclude]
        if not candidates:
            raise NoReplicaError("no engine replica is up")
        names = self.block_names(key) if key else []
        name = self._pick(candidates, names)
        self._remember(name, names)
        self.in_flight[name] += 1
        self.routed[name] += 1
        return name

    def release(self, name: str) -> None:
        """A request sent to ``name`` ended (answered, failed or cancelled)."""
        self.in_flight[name] = max(0, self.in_flight[name] - 1)

    def mark_down(self, name: str) -> None:
        """``name`` died: route around it, and forget what its cache held."""
        self.down.add(name)
        self._blocks[name].clear()

    def mark_up(self, name: str) -> None:
        self.down.discard(name)

    def block_names(self, key: str) -> list[int]:
        """The names of ``key``'s blocks: name k hashes blocks 0..k (a partial last block
        counts, so a short key still has one)."""
        size = self.config.block_chars
        names, prefix = [], 0
        for start in range(0, len(key), size):
            prefix = hash((prefix, key[start:start + size]))
            names.append(prefix)
        return names

    def matched(self, name: str, names: list[int]) -> int:
        """How many of the leading ``names`` replica ``name`` holds."""
        held = self._blocks[name]
        count = 0
        for block in names:
            if block not in held:
                break
            count += 1
        return count

    def _pick(self, candidates: list[str], names: list[int]) -> str:
        # the fewest in flight; among equals the one sent the fewest so far (so that one
        # client's sequential requests without a common prefix still spread)
        idlest = min(candidates, key=lambda n: (self.in_flight[n], self.routed[n]))
        busiest = max(self.in_flight[n] for n in candidates)
        least = self.in_flight[idlest]
        if (busiest - least > self.config.balance_abs
                and busiest > self.config.balance_rel * least):
            return idlest
        if names:
            best = max(candidates, key=lambda n: (self.matched(n, names), -self.in_flight[n]))
            if self.matched(best, names) >= self.config.match_threshold * len(names):
                return best
        return idlest

    def _remember(self, name: str, names: list[int]) -> None:
        held = self._blocks[name]
        for block in names:
            held[block] = None
            held.move_to_end(block)
        while len(held) > self.config.capacity:
            held.popitem(last=False)


def routing_key(body: Any) -> str | None:
    """The text a request's prefix-cache reuse depends on, in prompt order: the model, then
    each chat message's role and content (or the completion prompt). None when the body has
    neither (files, batches, a malformed body: routed to the least loaded).

    A conversation's next turn appends messages, so its key extends the previous turn's key.
    """
    if not isinstance(body, dict):
        return None
    model = str(body.get("model", ""))
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = [_text(m.get("role")) + "\x1f" + _text(m.get("content"))
                 for m in messages if isinstance(m, dict)]
        return model + "\x1e" + "\x1e".join(parts)
    for field in ("prompt", "input"):  # completions, embeddings
        if field in body:
            return model + "\x1e" + _text(body[field])
    return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
