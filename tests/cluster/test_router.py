"""The prefix-affinity router's policy (``lmforge.cluster.router``), without Ray."""

from __future__ import annotations

import pytest

from lmforge.cluster.router import NoReplicaError, PrefixAffinityRouter, RouterConfig, routing_key

SYSTEM = "You are a helpful assistant who answers in one short sentence."


def chat(*turns: str) -> dict:
    roles = ["user", "assistant"]
    return {"model": "m", "messages": [{"role": "system", "content": SYSTEM}]
            + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


def test_a_conversation_stays_on_its_replica_while_others_spread():
    router = PrefixAffinityRouter(["a", "b"])
    first = router.choose(routing_key(chat("Tell me about the history of the Roman empire.")))
    other = router.choose(routing_key({"model": "m", "prompt": "Write a haiku about the sea"}))
    assert {first, other} == {"a", "b"}  # nothing in common: the idle replica takes it
    for name in (first, other):
        router.release(name)
    turns = ["Tell me about the history of the Roman empire.", "It lasted centuries.",
             "And its fall?", "Invasions and decay.", "Thanks; and Byzantium?"]
    for k in range(2, len(turns) + 1, 2):
        assert router.choose(routing_key(chat(*turns[:k + 1]))) == first
    assert router.routed[first] == 3 and router.routed[other] == 1


def test_the_least_loaded_wins_without_a_prefix_match():
    router = PrefixAffinityRouter(["a", "b", "c"])
    names = [router.choose(None) for _ in range(6)]
    assert sorted(names) == ["a", "a", "b", "b", "c", "c"]
    router.release("b")
    router.release("b")
    assert router.choose(routing_key({"model": "m", "prompt": "unseen text"})) == "b"


def test_sequential_requests_without_a_shared_prefix_take_turns():
    router = PrefixAffinityRouter(["a", "b", "c"])
    names = []
    for i in range(6):
        names.append(router.choose(routing_key({"model": "m", "prompt": f"{i} " * 40})))
        router.release(names[-1])
    assert names == ["a", "b", "c", "a", "b", "c"]


def test_an_unbalanced_load_overrides_affinity():
    router = PrefixAffinityRouter(["a", "b"], RouterConfig(balance_abs=2, balance_rel=1.5))
    key = routing_key(chat("the same long question, asked again and again by many users"))
    assert [router.choose(key) for _ in range(3)] == ["a", "a", "a"]
    assert router.choose(key) == "b"  # a has 3 in flight, b none: 3 - 0 > 2 and 3 > 1.5 * 0


def test_down_replicas_get_nothing_and_come_back():
    router = PrefixAffinityRouter(["a", "b"])
    key = routing_key(chat("hello there, a question that is long enough for blocks"))
    assert router.choose(key) == "a"
    router.mark_down("a")
    assert router.choose(key) == "b"
    with pytest.raises(NoReplicaError):
        router.choose(key, exclude=("b",))
    router.mark_up("a")
    assert router.choose(None, exclude=("b",)) == "a"


def test_lru_capacity_forgets_the_oldest_prefixes():
    router = PrefixAffinityRouter(["a", "b"], RouterConfig(block_chars=4, capacity=8))
    old = "x" * 32  # 8 blocks: the whole capacity
    router.choose(old)
    router.release("a")
    router.choose("y" * 32, exclude=("b",))  # pushes out every block of ``old``
    router.release("a")
    assert router.matched("a", router.block_names(old)) == 0


def test_routing_keys_extend_with_the_conversation():
    one = routing_key(chat("first question"))
    two = routing_key(chat("first question", "an answer", "a follow-up"))
    assert two.startswith(one)
    assert routing_key({"model": "m", "prompt": ["a", "b"]}).endswith('["a", "b"]')
    assert routing_key({"model": "m", "input": "embed me"}).endswith("embed me")
    assert routing_key({"purpose": "batch"}) is None and routing_key([1, 2]) is None
