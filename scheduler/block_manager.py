"""Paged KV block allocator with prefix caching (pure Python: block ids only, the runner owns the KV).

Each request owns a *block table*: the physical block ids holding its KV positions in order (position
``p`` lives in block ``table[p // block_size]`` at offset ``p % block_size``). Tables only grow at the end
(``allocate``) and shrink from the end (``trim``, e.g. the slots of rejected drafts), so a prefix of the
table never moves while the request runs.

Prefix caching (after vLLM v1's KV cache manager): a *full* block whose tokens are all computed can be
registered under its ``BlockKey``, a hash chained over the key of the block before it, the block's token
ids and an extra key (the drafter in use: its context cache lives under the same block ids). Blocks are
reference counted; a cached block whose last user is gone stays in an LRU queue of evictable blocks and is
evicted only when a fresh block is needed and no uncached free block is left. A new request whose leading
blocks have cached keys starts with those blocks (``allocate_prefix``, reference +1) instead of
recomputing them. Keys are compared on their token ids and parent, not only on the hash, so a hash
collision is a miss. Partial blocks are never shared.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparkserve.scheduler.errors import BlockAccountingError

if TYPE_CHECKING:
    from sparkserve.scheduler.kv_events import KVCacheEventListener


@dataclass(frozen=True)
class BlockKey:
    """The content key of one full block: ``hash`` chains the parent key's hash, the token ids and the
    extra key; ``token_ids`` and ``parent_hash`` are kept to verify a hit (collisions)."""

    hash: int
    token_ids: tuple[int, ...]
    parent_hash: int | None


def block_keys(token_ids: Sequence[int], block_size: int, extra: object = None,
               existing: Sequence[BlockKey] = ()) -> list[BlockKey]:
    """Keys of every full block of ``token_ids`` (``existing`` keys of the leading blocks are reused)."""
    keys = list(existing)
    parent = keys[-1].hash if keys else None
    for start in range(len(keys) * block_size, len(token_ids) - block_size + 1, block_size):
        tokens = tuple(token_ids[start: start + block_size])
        value = hash((parent, tokens, extra))
        keys.append(BlockKey(value, tokens, parent))
        parent = value
    return keys


class BlockManager:
    """Hands out fixed-size KV blocks to requests and takes them back.

    Free blocks are kept on a stack (last freed, first reused). With ``shuffle=True`` a random free block
    is handed out instead, so any code that assumes a request's blocks are contiguous or ascending fails
    in tests. With ``enable_caching`` full blocks can be registered and shared (module docstring).
    """

    def __init__(self, num_blocks: int, block_size: int, shuffle: bool = False, seed: int = 0,
                 enable_caching: bool = False, listener: KVCacheEventListener | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self.enable_caching = enable_caching
        # pop() hands out block 0 first in the unshuffled order.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced, oldest first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, BlockKey] = {}  # cached block -> its key
        self._by_hash: dict[int, int] = {}  # key hash -> cached block
        self._tables: dict[str, list[int]] = {}
        self._rng: random.Random | None = random.Random(seed) if shuffle else None
        self.num_evictions = 0
        self.listener = listener  # told of blocks cached / evicted (sparkserve.scheduler.kv_events)

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_total_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request can get now: uncached free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self._num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered under a key (in use or evictable)."""
        return len(self._key_of)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (referenced), in [0, 1]; evictable cached blocks count as free."""
        return self.num_used_blocks / self._num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that cover ``num_tokens`` positions (ceil division)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self._block_size)

    def block_table(self, request_id: str) -> tuple[int, ...]:
        """The request's physical block ids in position order (empty if it holds none)."""
        return tuple(self._tables.get(request_id, ()))

    def num_blocks_of(self, request_id: str) -> int:
        return len(self._tables.get(request_id, ()))

    def max_coverable_tokens(self, request_id: str) -> int:
        """Positions the request could cover if it took every free block (its room to grow)."""
        return (self.num_blocks_of(request_id) + self.num_free_blocks) * self._block_size

    def can_allocate(self, request_id: str, num_tokens_total: int) -> bool:
        """True when the table can be grown to cover ``num_tokens_total`` positions."""
        missing = self.blocks_needed(num_tokens_total) - self.num_blocks_of(request_id)
        return missing <= self.num_free_blocks

    # ---------------------------------------------------------------- allocation
    def allocate(self, request_id: str, num_tokens_total: int) -> bool:
        """Grow the table with fresh blocks to cover ``num_tokens_total`` positions; all or nothing.

        Returns False (and changes nothing) when there are not enough free blocks. A table that already
        covers the positions is left as it is (allocate never shrinks; see ``trim``).
        """
        missing = self.blocks_needed(num_tokens_total) - self.num_blocks_of(request_id)
        if missing <= 0:
            return True
        if missing > self.num_free_blocks:
            return False
        table = self._tables.setdefault(request_id, [])
        for _ in range(missing):
            block = self._fresh_block()
            self._refs[block] = 1
            table.append(block)
        return True

    def cached_prefix(self, keys: Sequence[BlockKey], max_blocks: int) -> list[int]:
        """Cached blocks of the longest leading run of ``keys`` (at most ``max_blocks``), verified on the
        token ids and the parent of each key. Empty without caching."""
        if not self.enable_caching:
            return []
        blocks: list[int] = []
        for key in keys[:max_blocks]:
            block = self._by_hash.get(key.hash)
            if block is None or self._key_of[block] != key:
                break
            blocks.append(block)
        return blocks

    def allocate_prefix(self, request_id: str, blocks: Sequence[int]) -> None:
        """Start an empty table with shared cached blocks (from ``cached_prefix``).

        Raises:
            BlockAccountingError: the request already holds blocks, or a block is not cached.
        """
        if self._tables.get(request_id):
            raise BlockAccountingError(f"request {request_id!r} already holds blocks")
        for block in blocks:
            if block not in self._key_of:
                raise BlockAccountingError(f"block {block} is not cached")
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        if blocks:
            self._tables[request_id] = list(blocks)

    def cache_blocks(self, request_id: str, keys: Sequence[BlockKey]) -> None:
        """Register the request's leading blocks under ``keys`` (one per full, computed block). A block
        whose key is already cached under another block stays private (the first copy is shared)."""
        if not self.enable_caching:
            return
        table = self._tables.get(request_id, [])
        stored: list[BlockKey] = []  # the current run of newly cached consecutive blocks
        for block, key in zip(table, keys, strict=False):
            if block not in self._key_of and key.hash not in self._by_hash:
                self._by_hash[key.hash] = block
                self._key_of[block] = key
                stored.append(key)
            elif stored:
                self._report_stored(stored)
                stored = []
        if stored:
            self._report_stored(stored)

    def _report_stored(self, keys: list[BlockKey]) -> None:
        if self.listener is not None:
            self.listener.on_blocks_stored(keys, self._block_size)

    def trim(self, request_id: str, num_tokens_total: int) -> None:
        """Release the blocks beyond those covering ``num_tokens_total`` positions."""
        table = self._tables.get(request_id)
        if table is None:
            return
        keep = self.blocks_needed(num_tokens_total)
        if keep < len(table):
            released = table[keep:]
            del table[keep:]
            for block in reversed(released):
                self._release(block)
        if not table:
            del self._tables[request_id]

    def free(self, request_id: str) -> None:
        """Release every block of the request (no-op if it holds none)."""
        self.trim(request_id, 0)

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] > 0:
            return
        if block in self._key_of:
            self._evictable[block] = None  # most recently used last
        else:
            self._free.append(block)

    def _fresh_block(self) -> int:
        """An uncached free block, else the least recently used evictable cached one (evicted)."""
        if self._free:
            return self._pop_free()
        block, _ = self._evictable.popitem(last=False)
        key = self._key_of.pop(block)
        del self._by_hash[key.hash]
        self.num_evictions += 1
        if self.listener is not None:
            self.listener.on_blocks_removed([key.hash])
        return block

    def _pop_free(self) -> int:
        if self._rng is not None:
            index = self._rng.randrange(len(self._free))
            self._free[index], self._free[-1] = self._free[-1], self._free[index]
        return self._free.pop()

    def check_integrity(self) -> None:
        """Raise ``BlockAccountingError`` unless free + evictable + used == total, reference counts equal
        the tables' uses, and the cache maps are consistent."""
        free, evictable = set(self._free), set(self._evictable)
        if len(free) != len(self._free) or free & evictable:
            raise BlockAccountingError("a block is on the free lists twice")
        uses = [0] * self._num_blocks
        for request_id, table in self._tables.items():
            if not table:
                raise BlockAccountingError(f"request {request_id!r} has an empty table entry")
            for block in table:
                if not 0 <= block < self._num_blocks:
                    raise BlockAccountingError("a block id is out of range")
                uses[block] += 1
        for block in range(self._num_blocks):
            if uses[block] != self._refs[block]:
                raise BlockAccountingError(f"block {block}: {uses[block]} uses, reference count {self._refs[block]}")
            in_use, on_free = uses[block] > 0, block in free or block in evictable
            if in_use == on_free:
                raise BlockAccountingError(f"block {block} is {'used and free' if in_use else 'neither used nor free'}")
            if block in free and block in self._key_of:
                raise BlockAccountingError(f"block {block} is cached but on the uncached free list")
            if block in evictable and block not in self._key_of:
                raise BlockAccountingError(f"block {block} is evictable but not cached")
        if any(self._by_hash.get(key.hash) != block for block, key in self._key_of.items()):
            raise BlockAccountingError("the cache maps disagree")
