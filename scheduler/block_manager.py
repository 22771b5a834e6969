"""Paged KV block allocator (pure Python: block ids only, the runner owns the KV tensors).

Each request owns a *block table*: the physical block ids holding its KV positions in order
(position ``p`` lives in block ``table[p // block_size]`` at offset ``p % block_size``). Tables only
grow at the end (``allocate``) and shrink from the end (``trim``, e.g. the slots of rejected drafts),
so a prefix of the table never moves while the request runs.
"""

from __future__ import annotations

import random

from scheduler.errors import BlockAccountingError


class BlockManager:
    """Hands out fixed-size KV blocks to requests and takes them back.

    Free blocks are kept on a stack (last freed, first reused). With ``shuffle=True`` a random free
    block is handed out instead, so any code that assumes a request's blocks are contiguous or
    ascending fails in tests.
    """

    def __init__(self, num_blocks: int, block_size: int, shuffle: bool = False, seed: int = 0) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        # pop() hands out block 0 first in the unshuffled order.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}
        self._rng: random.Random | None = random.Random(seed) if shuffle else None

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_total_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self._num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
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
        return (self.num_blocks_of(request_id) + len(self._free)) * self._block_size

    def can_allocate(self, request_id: str, num_tokens_total: int) -> bool:
        """True when the table can be grown to cover ``num_tokens_total`` positions."""
        missing = self.blocks_needed(num_tokens_total) - self.num_blocks_of(request_id)
        return missing <= len(self._free)

    def allocate(self, request_id: str, num_tokens_total: int) -> bool:
        """Grow the table to cover ``num_tokens_total`` positions; all or nothing.

        Returns False (and changes nothing) when there are not enough free blocks. A table that
        already covers the positions is left as it is (allocate never shrinks; see ``trim``).
        """
        missing = self.blocks_needed(num_tokens_total) - self.num_blocks_of(request_id)
        if missing <= 0:
            return True
        if missing > len(self._free):
            return False
        table = self._tables.setdefault(request_id, [])
        for _ in range(missing):
            table.append(self._pop_free())
        return True

    def trim(self, request_id: str, num_tokens_total: int) -> None:
        """Release the blocks beyond those covering ``num_tokens_total`` positions."""
        table = self._tables.get(request_id)
        if table is None:
            return
        keep = self.blocks_needed(num_tokens_total)
        if keep < len(table):
            released = table[keep:]
            del table[keep:]
            self._free.extend(reversed(released))
        if not table:
            del self._tables[request_id]

    def free(self, request_id: str) -> None:
        """Release every block of the request (no-op if it holds none)."""
        self.trim(request_id, 0)

    def check_integrity(self) -> None:
        """Raise ``BlockAccountingError`` unless free + used == total and no block is owned twice."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise BlockAccountingError("a block is on the free list twice")
        owned: set[int] = set()
        for request_id, table in self._tables.items():
            if not table:
                raise BlockAccountingError(f"request {request_id!r} has an empty table entry")
            for block in table:
                if block in owned or block in free:
                    raise BlockAccountingError(f"block {block} is owned twice (seen at {request_id!r})")
                owned.add(block)
        if len(owned) + len(free) != self._num_blocks:
            raise BlockAccountingError(
                f"free ({len(free)}) + used ({len(owned)}) != total ({self._num_blocks})"
            )
        if not all(0 <= block < self._num_blocks for block in owned | free):
            raise BlockAccountingError("a block id is out of range")

    def _pop_free(self) -> int:
        if self._rng is not None:
            index = self._rng.randrange(len(self._free))
            self._free[index], self._free[-1] = self._free[-1], self._free[index]
        return self._free.pop()
