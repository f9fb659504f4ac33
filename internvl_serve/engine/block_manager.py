"""BlockAllocator: the pure-Python bookkeeping of the paged KV cache (no tensors, no CUDA).

The cache is `num_blocks` blocks of `block_size` token slots. A sequence owns a block table (a list of
block ids); token position p lives in block `table[p // block_size]`, offset `p % block_size`.

Prefix reuse: once a block is full of computed KV it is registered under a chain hash
`hash(parent block's hash, its token ids, the image content of its <IMG_CONTEXT> rows)`, so equal hashes
mean equal KV. A later request whose prompt starts with the same blocks (the next turn of a chat) shares
them (reference counts) instead of recomputing. A cached block whose count drops to 0 stays cached on an
LRU list and is evicted only when a fresh block is needed and no never-cached free block is left.

Does not own: which sequence gets blocks when (scheduler.py), the KV tensors (runner.py).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import Iterable, Sequence

BlockHash = bytes
_ROOT = b"\x00" * 16


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra: bytes = b"") -> BlockHash:
    """Chain hash of one full block: 16-byte blake2b over parent hash, token ids (int64) and `extra`
    (image content keys of the block's image rows; empty for text-only blocks)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or _ROOT)
    h.update(array("q", token_ids).tobytes())
    h.update(extra)
    return h.digest()


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))       # ref 0, holding nothing worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, cached; oldest first
        self._cached: dict[BlockHash, int] = {}                  # hash -> block
        self.prefix_queries = 0  # blocks looked up in the prefix cache
        self.prefix_hits = 0     # of which found

    # -- plain allocation ------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that allocate() can hand out now (never-cached ones plus evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self) -> int:
        """A block with reference count 1; evicts the least recently freed cached block if needed."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash[block]]
            self._hash[block] = None
        else:
            raise RuntimeError("no free KV-cache block (check can_allocate first)")
        assert self._ref[block] == 0
        self._ref[block] = 1
        return block

    def allocate_n(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise RuntimeError(f"{n} blocks requested, {self.num_free} free")
        return [self.allocate() for _ in range(n)]

    def free(self, block: int) -> None:
        """Drop one reference; at 0 a cached block stays reusable (LRU), another goes back to the pool."""
        ref = self._ref[block] - 1
        if ref < 0:
            raise RuntimeError(f"block {block} freed more often than allocated")
        self._ref[block] = ref
        if ref == 0:
            if self._hash[block] is not None:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def free_blocks(self, blocks: Iterable[int]) -> None:
        """Free a block table, last block first: a sequence's tail is evicted before its prefix."""
        for block in reversed(list(blocks)):
            self.free(block)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    # -- prefix cache ----------------------------------------------------------------------------
    def lookup(self, block_hash: BlockHash) -> int | None:
        """The cached block holding this hash, or None (no reference taken)."""
        return self._cached.get(block_hash)

    def share(self, block: int) -> None:
        """Take a reference on a cached block found by lookup()."""
        if self._ref[block] == 0:
            del self._evictable[block]
        self._ref[block] += 1

    def register(self, block: int, block_hash: BlockHash) -> None:
        """Mark a full, computed block as holding `block_hash`. If another block already holds it (two
        sequences computed the same prefix at once), this one stays uncached."""
        if self._hash[block] is None and block_hash not in self._cached:
            self._hash[block] = block_hash
            self._cached[block_hash] = block

    def record_lookups(self, queried: int, hit: int) -> None:
        self.prefix_queries += queried
        self.prefix_hits += hit

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence uses (e.g. after new weights)."""
        for block in list(self._evictable):
            del self._cached[self._hash[block]]
            self._hash[block] = None
            self._free.append(block)
        self._evictable.clear()

    def check_consistency(self) -> None:
        """Internal invariants (for tests): every block is exactly one of used / free / evictable."""
        used = {b for b in range(self.num_blocks) if self._ref[b] > 0}
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free)
        assert not (used & free) and not (used & evictable) and not (free & evictable)
        assert len(used) + len(free) + len(evictable) == self.num_blocks
        assert all(self._hash[b] is None for b in free)
        assert all(self._cached[self._hash[b]] == b for b in evictable)
        assert len(self._cached) == sum(h is not None for h in self._hash)
