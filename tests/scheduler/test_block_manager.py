"""Paged KV block allocator: coverage, all-or-nothing growth, trim, integrity, shuffled ids."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkserve.scheduler.block_manager import BlockManager
from sparkserve.scheduler.errors import BlockAccountingError


def test_allocate_covers_positions_with_ceil_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 1)
    assert len(bm.block_table("a")) == 1
    assert bm.allocate("a", 4)  # still one block
    assert len(bm.block_table("a")) == 1
    assert bm.allocate("a", 5)
    assert len(bm.block_table("a")) == 2
    assert bm.num_free_blocks == 6 and bm.num_used_blocks == 2
    assert bm.usage == pytest.approx(2 / 8)
    bm.check_integrity()


def test_allocate_is_all_or_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    assert bm.allocate("a", 4)
    assert not bm.can_allocate("b", 3)
    assert not bm.allocate("b", 3)  # needs 2, only 1 free
    assert bm.block_table("b") == ()
    assert bm.num_free_blocks == 1
    assert bm.can_allocate("b", 2) and bm.allocate("b", 2)
    assert bm.num_free_blocks == 0
    bm.check_integrity()


def test_table_prefix_is_stable_and_trim_releases_the_tail() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    bm.allocate("a", 3)
    prefix = bm.block_table("a")
    bm.allocate("a", 9)
    assert bm.block_table("a")[:2] == prefix
    bm.trim("a", 4)  # keep positions [0, 4) -> 2 blocks
    assert bm.block_table("a") == prefix
    assert bm.num_free_blocks == 4
    bm.trim("a", 100)  # never grows
    assert len(bm.block_table("a")) == 2
    bm.trim("a", 0)
    assert bm.block_table("a") == ()
    assert bm.num_free_blocks == 6
    bm.check_integrity()


def test_free_and_unknown_ids_are_no_ops() -> None:
    bm = BlockManager(num_blocks=2, block_size=1)
    bm.free("nobody")
    bm.trim("nobody", 0)
    assert bm.block_table("nobody") == ()
    assert bm.allocate("a", 0)  # zero positions need no block
    assert bm.block_table("a") == ()
    bm.allocate("a", 2)
    bm.free("a")
    bm.free("a")
    assert bm.num_free_blocks == 2
    bm.check_integrity()


def test_max_coverable_tokens() -> None:
    bm = BlockManager(num_blocks=5, block_size=4)
    bm.allocate("a", 5)  # 2 blocks
    bm.allocate("b", 1)  # 1 block
    assert bm.max_coverable_tokens("a") == (2 + 2) * 4
    assert bm.max_coverable_tokens("new") == 2 * 4


def test_unshuffled_order_starts_at_zero() -> None:
    bm = BlockManager(num_blocks=4, block_size=1)
    bm.allocate("a", 4)
    assert bm.block_table("a") == (0, 1, 2, 3)


def test_shuffled_block_ids_are_random_but_deterministic() -> None:
    tables = []
    for seed in (0, 0, 1):
        bm = BlockManager(num_blocks=64, block_size=1, shuffle=True, seed=seed)
        bm.allocate("a", 64)
        tables.append(bm.block_table("a"))
        bm.check_integrity()
    assert sorted(tables[0]) == list(range(64))
    assert tables[0] != tuple(range(64))
    assert tables[0] == tables[1]
    assert tables[0] != tables[2]


def test_integrity_check_detects_corruption() -> None:
    bm = BlockManager(num_blocks=4, block_size=1)
    bm.allocate("a", 2)
    bm._free.append(bm.block_table("a")[0])  # a block both owned and free
    with pytest.raises(BlockAccountingError):
        bm.check_integrity()
    bm = BlockManager(num_blocks=4, block_size=1)
    bm._free.pop()  # a leaked block
    with pytest.raises(AssertionError):
        bm.check_integrity()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=1)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=1, block_size=0)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=1, block_size=1).blocks_needed(-1)


_ops = st.lists(
    st.tuples(st.sampled_from(["allocate", "trim", "free"]), st.integers(0, 5), st.integers(0, 40)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(
    ops=_ops,
    num_blocks=st.integers(1, 12),
    block_size=st.integers(1, 5),
    shuffle=st.booleans(),
)
def test_random_operations_keep_accounting_exact(
    ops: list[tuple[str, int, int]], num_blocks: int, block_size: int, shuffle: bool
) -> None:
    """Against a model of table lengths: free + used == total and no block owned twice."""
    bm = BlockManager(num_blocks, block_size, shuffle=shuffle, seed=7)
    lengths: dict[str, int] = {}
    for op, who, num_tokens in ops:
        rid = f"r{who}"
        have = lengths.setdefault(rid, 0)
        need = -(-num_tokens // block_size)
        if op == "allocate":
            fits = need - have <= bm.num_free_blocks
            assert bm.can_allocate(rid, num_tokens) == fits
            assert bm.allocate(rid, num_tokens) == fits
            if fits:
                lengths[rid] = max(have, need)
        elif op == "trim":
            bm.trim(rid, num_tokens)
            lengths[rid] = min(have, need)
        else:
            bm.free(rid)
            lengths[rid] = 0
        assert len(bm.block_table(rid)) == lengths[rid]
        assert bm.num_used_blocks == sum(lengths.values())
        bm.check_integrity()
    for rid in list(lengths):
        bm.free(rid)
    assert bm.num_free_blocks == num_blocks
    bm.check_integrity()


# ---- prefix caching -----------------------------------------------------------------------------
def test_block_keys_chain_and_verify_hits() -> None:
    from sparkserve.scheduler.block_manager import block_keys

    keys = block_keys([1, 2, 3, 4, 5, 6, 7], 3, extra="d")
    assert len(keys) == 2 and keys[1].parent_hash == keys[0].hash and keys[1].token_ids == (4, 5, 6)
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 3, "d", existing=keys)[:2] == keys
    assert block_keys([9, 2, 3, 4, 5, 6], 3, "d")[1].hash != keys[1].hash  # the parent is in the hash
    assert block_keys([1, 2, 3], 3, "other")[0].hash != keys[0].hash  # so is the extra key (drafter)


def test_cached_blocks_are_shared_evicted_last_and_accounted() -> None:
    from sparkserve.scheduler.block_manager import BlockKey, block_keys

    bm = BlockManager(num_blocks=4, block_size=2, enable_caching=True)
    keys = block_keys([1, 2, 3, 4, 5], 2)
    assert bm.allocate("a", 5) and bm.cached_prefix(keys, 2) == []
    bm.cache_blocks("a", keys)  # its two full blocks
    assert bm.num_cached_blocks == 2
    shared = bm.cached_prefix(keys, 2)
    assert shared == list(bm.block_table("a")[:2])
    bm.allocate_prefix("b", shared)
    assert bm.allocate("b", 5) and bm.num_used_blocks == 4  # 2 shared + 1 each
    bm.check_integrity()
    bm.free("a")
    assert bm.num_used_blocks == 3  # the shared ones are still b's
    bm.free("b")
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2 and bm.usage == 0  # evictable: free, cached
    bm.check_integrity()
    assert bm.cached_prefix(keys, 1) == shared[:1]
    assert bm.allocate("c", 4)  # 2 uncached free blocks first: the cache survives
    assert bm.num_cached_blocks == 2 and bm.cached_prefix(keys, 2) == shared
    assert bm.allocate("c", 6)  # now the least recently used cached block is evicted
    assert bm.num_evictions == 1 and bm.num_cached_blocks == 1
    bm.check_integrity()
    # a colliding hash with other tokens is a miss
    fake = BlockKey(keys[0].hash, (9, 9), None)
    assert bm.cached_prefix(keys, 1) == shared[:1] and bm.cached_prefix([fake], 1) == []
    bm.free("c")
    bm.check_integrity()


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["admit", "grow", "cache", "free"]), st.integers(0, 3), st.integers(1, 12)),
                    max_size=40), num_blocks=st.integers(1, 10), block_size=st.integers(1, 3))
def test_random_operations_with_caching_keep_accounting_exact(ops, num_blocks: int, block_size: int) -> None:
    from sparkserve.scheduler.block_manager import block_keys

    bm = BlockManager(num_blocks, block_size, shuffle=True, seed=3, enable_caching=True)
    texts = {f"r{i}": [1 + (j * (i % 2 + 1)) % 5 for j in range(12)] for i in range(4)}  # overlapping prefixes
    for op, who, num_tokens in ops:
        rid = f"r{who}"
        keys = block_keys(texts[rid][:num_tokens], block_size)
        if op == "admit" and not bm.block_table(rid):
            bm.allocate_prefix(rid, bm.cached_prefix(keys, len(keys)))
        elif op == "grow":
            bm.allocate(rid, num_tokens)
        elif op == "cache":
            held = min(len(bm.block_table(rid)), len(keys))
            bm.cache_blocks(rid, keys[:held])
        else:
            bm.free(rid)
        bm.check_integrity()
    for rid in texts:
        bm.free(rid)
    assert bm.num_free_blocks == num_blocks and bm.usage == 0
    bm.check_integrity()
