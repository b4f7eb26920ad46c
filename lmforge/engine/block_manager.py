"""Paged KV-cache bookkeeping: fixed-size blocks, ref counts, block tables, prefix hashes. No torch.

A request's KV lives in ``block_size``-token blocks listed in its block table (append-only).
A block that is full and computed gets a hash of its token prefix (parent hash + its tokens); a
later request whose prompt starts with the same tokens reuses it (prefix caching, as vLLM's
``vllm/v1/core/block_pool.py``). Freed blocks keep their hash and stay reusable until the block is
handed out again: the free queue is LRU, and blocks of a finished request are queued tail-first so
that the end of a prefix is evicted before its beginning. The K/V of a request served with a
LoRA adapter depend on the adapter, so its first block's parent is the adapter's id: requests of
different adapters (or of an adapter and the base model) never share blocks.
"""

from __future__ import annotations

from collections import OrderedDict

from lmforge.engine.request import Request


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None  # set once the block is full and computed

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.block_hash})"


def hash_block_tokens(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block given its parent's hash, so equal hashes mean equal prefixes.

    Python's tuple hash of ints is deterministic across processes (no hash randomization).
    """
    return hash((parent_hash, token_ids))


def _root_hash(request: Request) -> int | None:
    """The parent of a request's first block: None for the base model, else its adapter's id."""
    return None if request.lora_id is None else hash(("lora", request.lora_id))


class BlockManager:
    """Hands out KV blocks to requests and tracks which ones hold cached prefixes.

    Args:
        num_blocks: blocks in the cache (block ids 0..num_blocks-1).
        block_size: tokens per block.
        enable_prefix_caching: reuse full blocks across requests by prefix hash.
        batch_invariant: the model's kernels are batch-invariant (``--deterministic``), so a
            cached prefix gives a seeded request the very numbers it would compute: seeded
            requests read the prefix cache too.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 batch_invariant: bool = False):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.batch_invariant = batch_invariant
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, Block] = {}  # prefix hash -> block holding that prefix
        self.req_blocks: dict[str, list[Block]] = {}  # request id -> its block table
        self.num_hashed: dict[str, int] = {}  # request id -> leading blocks already hashed
        self.num_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_hits = 0  # of which found
        # blocks handed out at least once: the never-used ones leave the free queue's front in
        # id order, so this is one past the highest id handed out (what a lazily zeroed cache
        # holds resident, ``engine/memory.py``)
        self.num_touched_blocks = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def block_table(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[Block], int]:
        """The longest cached prefix of a request that holds no blocks yet.

        At least one token is always left to compute, because the last prompt position's logits
        are needed to sample (vLLM does the same). A request that wants prompt logprobs, or a
        seeded one (unless ``batch_invariant``), gets no hits (``Request.reads_prefix_cache``).

        Returns:
            (blocks, num_computed_tokens) with num_computed_tokens = len(blocks) * block_size.
        """
        if (not self.enable_prefix_caching
                or not request.reads_prefix_cache(self.batch_invariant)):
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for block_hash in self._block_hashes(request)[:max_blocks]:
            block = self.cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        self.num_queries += request.num_tokens
        self.num_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[Block] = ()) -> bool:
        """Grow a request's block table to hold ``num_computed_tokens + num_new_tokens`` tokens.

        ``computed_blocks`` (prefix hits, first allocation only) are shared, not copied.

        Returns:
            False, changing nothing, when there are not enough free blocks.
        """
        table = self.req_blocks.get(request.request_id, [])
        needed_tokens = request.num_computed_tokens + len(computed_blocks) * self.block_size
        needed_tokens += num_new_tokens
        num_needed = -(-needed_tokens // self.block_size) - len(table) - len(computed_blocks)
        # prefix hits sitting in the free queue (ref 0) stop being free once we take them
        num_evictable_hits = sum(1 for b in computed_blocks if b.ref_count == 0)
        if num_needed > self.num_free_blocks - num_evictable_hits:
            return False
        for block in computed_blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1
        table = table + list(computed_blocks) + [self._pop_free() for _ in range(max(num_needed, 0))]
        self.req_blocks[request.request_id] = table
        if computed_blocks:
            self.num_hashed[request.request_id] = len(computed_blocks)
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the hashes of blocks that became full and computed since the last call."""
        if not self.enable_prefix_caching:
            return
        table = self.req_blocks.get(request.request_id, [])
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        start = self.num_hashed.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request)
        for block, block_hash in zip(table[start:num_full], hashes[start:num_full]):
            if block.block_hash is None and block_hash not in self.cached:
                block.block_hash = block_hash
                self.cached[block_hash] = block
            # else: another request computed the same prefix first; keep ours unhashed
            # (block tables are append-only, so we do not swap blocks to de-duplicate)
        self.num_hashed[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release a request's blocks; cached ones stay reusable until evicted."""
        table = self.req_blocks.pop(request.request_id, [])
        self.num_hashed.pop(request.request_id, None)
        for block in reversed(table):  # tail first: evict the end of a prefix before its start
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = block

    def reset_prefix_cache_stats(self) -> tuple[int, int]:
        """Return and zero (queried tokens, hit tokens) counters."""
        stats = (self.num_queries, self.num_hits)
        self.num_queries = self.num_hits = 0
        return stats

    def _pop_free(self) -> Block:
        _, block = self.free_queue.popitem(last=False)  # least recently freed
        self.num_touched_blocks = max(self.num_touched_blocks, block.block_id + 1)
        if block.block_hash is not None:  # evict its cached prefix
            del self.cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block

    def _block_hashes(self, request: Request) -> list[int]:
        """Prefix hashes of the request's full blocks, extended incrementally and memoized."""
        hashes, bs = request.block_hashes, self.block_size
        tokens = request.all_token_ids
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            parent = hashes[-1] if hashes else _root_hash(request)
            hashes.append(hash_block_tokens(parent, tuple(tokens[i * bs:(i + 1) * bs])))
        return hashes
