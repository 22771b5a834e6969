"""The Triton paged attention in batch-invariant mode (issue 24): fixed tiles, fixed split-KV chunks at
absolute positions and an in-order combine, so a row's output bits do not depend on the batch, on how
its prompt was chunked, or on whether its context came from the cache.

Run in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, set before the kernels are imported) at
tiny shapes: the split size is lowered to 16 keys, one key block, so that a context of 40 keys spans
three splits.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sparkserve.kernels import attention_metadata  # noqa: E402
from sparkserve.kernels.attention_metadata import build_ragged_metadata  # noqa: E402
from sparkserve.kernels.paged_attention import AttentionConfig, paged_attention, paged_attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = AttentionConfig(block_n=16)
NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_SIZE = 2, 3, 16, 8  # SmolLM2's G = 3
CONTEXT = 40  # keys of the request under test: its last token is at position 39
OTHER = 56  # a longer sequence beside it (more splits than the request needs)


@pytest.fixture(autouse=True)
def small_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_metadata, "INVARIANT_SPLIT_KEYS", 16)


def _cache(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caches holding the request's keys (table 0) and another sequence's (table 1), and the queries of
    every position of the request, [CONTEXT, H, hd], and of the other sequence, [OTHER, H, hd]."""
    gen = torch.Generator().manual_seed(0)
    blocks = -(-CONTEXT // BLOCK_SIZE) + -(-OTHER // BLOCK_SIZE)
    shape = (NUM_KV_HEADS, blocks, BLOCK_SIZE, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device=DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device=DEVICE)
    q = torch.randn(CONTEXT + OTHER, NUM_KV_HEADS * GROUP, HEAD_DIM, generator=gen).to(dtype=dtype, device=DEVICE)
    return k_cache, v_cache, q[:CONTEXT], q[CONTEXT:]


def _tables() -> list[list[int]]:
    own = -(-CONTEXT // BLOCK_SIZE)
    perm = torch.randperm(own + -(-OTHER // BLOCK_SIZE), generator=torch.Generator().manual_seed(1)).tolist()
    return [perm[:own], perm[own:]]


def _attend(seqs: list[tuple[int, int, int]], q_rows: list[torch.Tensor], caches: tuple[torch.Tensor, torch.Tensor],
            invariant: bool) -> torch.Tensor:
    """Attention of a step of sequences ``(table, start, q_len)`` (causal) with the given query rows;
    returns [T, H, hd]. Without the mode the split count is what the default heuristic gives a GPU at
    long contexts: more splits for fewer programs (one split for a step of several sequences)."""
    tables = _tables()
    meta = build_ragged_metadata([n for _, _, n in seqs], [s for _, s, _ in seqs], [s + n for _, s, n in seqs],
                                 [tables[t] for t, _, _ in seqs], BLOCK_SIZE, NUM_KV_HEADS, GROUP, device=DEVICE,
                                 batch_invariant=invariant, num_splits=None if invariant else 4 // len(seqs))
    return paged_attention(torch.cat(q_rows), *caches, meta, HEAD_DIM ** -0.5, config=SMALL)


def _last_row_in_every_setting(dtype: torch.dtype, invariant: bool) -> dict[str, torch.Tensor]:
    """The request's last token (position 39) attended: decoded alone; decoded beside a verify block and
    a prefill chunk of a longer sequence; as the last row of its whole prompt prefilled in one chunk; as
    the last row of a 12-token chunk after 28 cached tokens; inside a verify block."""
    k_cache, v_cache, q, q_other = _cache(dtype)
    caches = (k_cache, v_cache)
    last = CONTEXT - 1
    return {
        "alone": _attend([(0, last, 1)], [q[last:]], caches, invariant)[0],
        "batched": _attend([(1, OTHER - 5, 5), (0, last, 1), (1, 10, 12)],
                           [q_other[-5:], q[last:], q_other[10:22]], caches, invariant)[5],
        "one_chunk": _attend([(0, 0, CONTEXT)], [q], caches, invariant)[last],
        "from_cache": _attend([(0, 28, 12)], [q[28:]], caches, invariant)[11],
        "verify_block": _attend([(1, 40, 3), (0, last - 3, 4)], [q_other[40:43], q[last - 3:]], caches, invariant)[6],
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_bits_do_not_depend_on_batch_chunking_or_cache(dtype: torch.dtype) -> None:
    rows = _last_row_in_every_setting(dtype, invariant=True)
    for setting, row in rows.items():
        assert torch.equal(row, rows["alone"]), setting


def test_without_the_mode_the_split_follows_the_batch() -> None:
    """The control: with the default rule (equal chunks of each tile's keys, their count chosen by the
    step) the same row gets other bits in some setting (a check that could not fail would prove nothing)."""
    rows = _last_row_in_every_setting(torch.float32, invariant=False)
    assert not all(torch.equal(row, rows["alone"]) for row in rows.values())


def test_invariant_mode_matches_the_reference(dtype: torch.dtype = torch.float32) -> None:
    """Fixed splits still compute attention: a mixed step against the torch reference (fp32; the
    dtypes' tolerances are test_kernels.py's)."""
    k_cache, v_cache, q, q_other = _cache(dtype)
    tables = _tables()
    seqs = [(1, OTHER - 5, 5), (0, CONTEXT - 1, 1), (1, 10, 12)]
    meta = build_ragged_metadata([n for _, _, n in seqs], [s for _, s, _ in seqs], [s + n for _, s, n in seqs],
                                 [tables[t] for t, _, _ in seqs], BLOCK_SIZE, NUM_KV_HEADS, GROUP, device=DEVICE,
                                 batch_invariant=True)
    assert len(meta.groups) == 1 and meta.groups[0].split_keys == 16 and meta.groups[0].num_splits == 4
    x = torch.cat([q_other[-5:], q[-1:], q_other[10:22]])
    out = paged_attention(x, k_cache, v_cache, meta, HEAD_DIM ** -0.5, config=SMALL)
    ref = paged_attention_reference(x, k_cache, v_cache, meta, HEAD_DIM ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)


def test_invariant_tiles_depend_on_the_group_size_only() -> None:
    """Every sequence, decode or prefill, in tiles of invariant_block_m(G) rows; splits cover the
    longest context in fixed chunks."""
    meta = build_ragged_metadata([1, 40], [99, 0], [100, 40], [[0] * 13, [0] * 5], BLOCK_SIZE, NUM_KV_HEADS, GROUP,
                                 batch_invariant=True)
    (group,) = meta.groups
    assert group.block_m == attention_metadata.invariant_block_m(GROUP) == 16 and group.block_q == 5
    assert group.tile_seq.tolist() == [0] + [1] * 8 and group.tile_q_start.tolist() == [0, *range(0, 40, 5)]
    assert group.num_splits == 7  # ceil(100 / 16)
