"""Block manager bookkeeping with hand-made requests; no model, no torch."""

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.request import Request, SamplingParams


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8))


def compute(bm: BlockManager, req: Request, n: int, hits=()) -> bool:
    """Allocate and mark n tokens computed, as the scheduler + update would."""
    num_hit = len(hits) * bm.block_size
    if not bm.allocate_slots(req, n, list(hits)):
        return False
    req.num_computed_tokens = (num_hit if hits else req.num_computed_tokens) + n
    bm.cache_full_blocks(req)
    return True


def test_allocate_grows_block_table_and_free_returns_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    req = make_request("a", list(range(10)))
    assert compute(bm, req, 10)
    assert len(bm.block_table("a")) == 3  # ceil(10 / 4)
    assert bm.num_free_blocks == 5
    req.append_output_token(99)
    req.append_output_token(98)  # 12 tokens: still 3 blocks
    assert compute(bm, req, 2) and len(bm.block_table("a")) == 3
    req.append_output_token(97)  # 13th token needs a 4th block
    assert bm.allocate_slots(req, 1) and len(bm.block_table("a")) == 4
    bm.free(req)
    assert bm.num_free_blocks == 8 and bm.block_table("a") == []


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    req = make_request("a", list(range(12)))
    assert not bm.allocate_slots(req, 12)
    assert bm.num_free_blocks == 2 and bm.block_table("a") == []


def test_prefix_hit_shares_blocks_and_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    system = list(range(100, 112))  # 3 full blocks
    a = make_request("a", system + [1, 2])
    assert compute(bm, a, a.num_tokens)
    b = make_request("b", system + [7, 8, 9])
    hits, num_hit = bm.get_computed_blocks(b)
    assert num_hit == 12 and [h.block_id for h in hits] == bm.block_table("a")[:3]
    assert compute(bm, b, b.num_tokens - num_hit, hits)
    assert bm.block_table("b")[:3] == bm.block_table("a")[:3]
    assert all(bm.blocks[i].ref_count == 2 for i in bm.block_table("a")[:3])
    # an exact repeat of a block-aligned prompt still recomputes its last block
    c = make_request("c", system)
    _, num_hit = bm.get_computed_blocks(c)
    assert num_hit == 8


def test_freed_cached_blocks_are_reused_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=4)
    prompt = list(range(9))  # 2 full blocks + 1
    a = make_request("a", prompt)
    assert compute(bm, a, 9)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = make_request("b", prompt)
    hits, num_hit = bm.get_computed_blocks(b)
    assert num_hit == 8
    assert compute(bm, b, 1, hits)
    bm.free(b)
    # a request with other tokens that needs every block evicts the cached prefix
    c = make_request("c", list(range(50, 66)))
    assert compute(bm, c, 16)
    assert bm.cached.keys() == {h for h in c.block_hashes}
    d = make_request("d", prompt)
    assert bm.get_computed_blocks(d)[1] == 0


def test_eviction_takes_the_tail_of_a_prefix_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7])  # 3 full blocks + 1
    assert compute(bm, a, 7)
    bm.free(a)
    b = make_request("b", [9, 9, 9, 9])  # takes the partial block and ONE cached block
    assert compute(bm, b, 4)
    c = make_request("c", [1, 2, 3, 4, 5, 6, 7])
    assert bm.get_computed_blocks(c)[1] == 4  # the tail block went, the first two survived


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    assert compute(bm, a, 9)
    assert bm.get_computed_blocks(make_request("b", list(range(9))))[1] == 0
