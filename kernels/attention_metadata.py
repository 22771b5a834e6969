"""Metadata of the Triton paged-attention kernel over one flattened ragged batch.

Built from the same host data as ``sparkserve.engine.attention.build_attention_metadata`` (query lengths, start
positions, context lengths, block tables, causal flags) and shared by every layer of one forward.

Work decomposition (``kernels/paged_attention.py``): a *tile* is up to ``block_q`` consecutive query
tokens of one sequence times the ``G = H / Hkv`` query heads that share one KV head (GQA packing: the
``block_q * G <= block_m`` rows of one tile read each K/V block once). Sequences go into two tile
groups, each launched once per layer with its own tile shape:
- *short* (decode, verify blocks, drafter blocks: ``q_len * G <= SHORT_ROWS_MAX``): one tile each,
  ``block_m`` just large enough, and split-KV (flash-decoding) so a few long contexts still fill the GPU;
- *long* (prefill chunks): ``block_m = LONG_BLOCK_M`` rows per tile, no split.

Batch-invariant mode (``batch_invariant=True``, engine/batch_invariant.py's rule on the GPU): one group
whose tile shape depends only on G (``invariant_block_m``), every sequence (decode, verify, prefill
chunk) cut into tiles of ``block_m // G`` query tokens, and split-KV with a fixed chunk of
``INVARIANT_SPLIT_KEYS`` keys at absolute positions (``TileGroup.split_keys``), combined in increasing
split order. A row then runs the same operations in the same order whatever else is in the step, how
its prompt was chunked and whether its context came from the cache: the splits and key blocks it
reads are fixed by its position, extra splits or key blocks (for longer rows of the batch or of its
tile) are fully masked for it and add exact zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sparkserve.kernels.common import cdiv, next_power_of_2

SHORT_ROWS_MAX = 64  # a sequence with q_len * G rows up to this is one tile of the short group
LONG_BLOCK_M = 64  # rows per tile of the long (prefill) group
MIN_BLOCK_M = 16  # tl.dot needs M >= 16
MAX_SPLITS = 32
MIN_KEYS_PER_SPLIT = 256  # split-KV only cuts contexts into chunks of at least this many keys
CPU_NUM_SMS = 4  # "multiprocessors" assumed by the split heuristic off CUDA (interpreter tests)
INVARIANT_SPLIT_KEYS = 256  # batch-invariant mode: keys per split, at absolute positions (a multiple of block_n)


@dataclass(frozen=True)
class TileGroup:
    """The tiles of one kernel launch.

    Attributes:
        tile_seq: ``[num_tiles]`` int32 sequence index of each tile.
        tile_q_start: ``[num_tiles]`` int32 first query token of each tile, within its sequence.
        block_m: rows per tile (power of two >= 16), ``block_q * num_queries_per_kv <= block_m``.
        block_q: query tokens per tile.
        num_splits: KV chunks per tile (split-KV); 1 = no split, the kernel writes the output directly.
        max_q_len: the longest query of the group's sequences (rows of split-KV scratch per tile).
        split_keys: keys per split at absolute positions (batch-invariant mode); 0 = ``num_splits``
            equal chunks of each tile's keys.
    """

    tile_seq: Tensor
    tile_q_start: Tensor
    block_m: int
    block_q: int
    num_splits: int
    max_q_len: int
    split_keys: int = 0

    @property
    def num_tiles(self) -> int:
        return int(self.tile_seq.numel())


@dataclass(frozen=True)
class RaggedAttentionMetadata:
    """One forward's attention inputs (all tensors on the kernels' device).

    Mask rule (as ``sparkserve.engine.attention``): query i of sequence s (absolute position ``start_pos[s] + i``)
    sees key j iff ``j < kv_lens[s]`` and (``j <= start_pos[s] + i`` or not ``causal[s]``).

    Attributes:
        cu_seqlens_q: ``[S + 1]`` int32 first flat query row of each sequence (and T at the end).
        kv_lens: ``[S]`` int32 keys visible to each sequence (context + this step's tokens).
        start_pos: ``[S]`` int32 absolute position of each sequence's first query token.
        block_tables: ``[S, max_blocks]`` int32 physical block ids (entries past a table unused).
        causal: ``[S]`` int32, 1 = causal, 0 = bidirectional over context + block (drafter blocks).
        slot_mapping: ``[T]`` int64 cache slot ``block * block_size + offset`` of each new token.
        groups: the tile groups (short, long), empty groups left out.
        num_tokens: T; block_size: tokens per KV block; num_queries_per_kv: G;
        max_kv_len: host upper bound of ``kv_lens`` (sizes the split heuristic).
    """

    cu_seqlens_q: Tensor
    kv_lens: Tensor
    start_pos: Tensor
    block_tables: Tensor
    causal: Tensor
    slot_mapping: Tensor
    groups: tuple[TileGroup, ...]
    num_tokens: int
    block_size: int
    num_queries_per_kv: int
    max_kv_len: int

    @property
    def num_seqs(self) -> int:
        return int(self.kv_lens.numel())


def build_ragged_metadata(
    q_lens: Sequence[int],
    start_positions: Sequence[int] | Tensor,
    kv_lens: Sequence[int] | Tensor,
    block_tables: Tensor | Sequence[Sequence[int]],
    block_size: int,
    num_kv_heads: int,
    num_queries_per_kv: int,
    causal: Sequence[bool] | None = None,
    device: torch.device | str = "cpu",
    max_kv_len: int | None = None,
    num_splits: int | None = None,
    num_sms: int | None = None,
    batch_invariant: bool = False,
) -> RaggedAttentionMetadata:
    """Metadata of S sequences whose new tokens are laid out sequence after sequence (T rows).

    Args:
        q_lens: new (query) tokens per sequence (host ints, each >= 1).
        start_positions / kv_lens: per sequence, as in ``build_attention_metadata`` (host lists or
            tensors on any device; device tensors need ``max_kv_len`` to avoid a host sync).
        block_tables: ``[S, max_blocks]`` tensor or per-sequence lists covering ``kv_lens``.
        num_kv_heads / num_queries_per_kv: Hkv and G = H / Hkv of the model.
        causal: per sequence, False for a bidirectional drafter block; default all True.
        max_kv_len: host upper bound of ``kv_lens`` (else read from it).
        num_splits: force the split-KV count of the short group (tests, benchmarks); None = heuristic.
        num_sms: multiprocessors for the heuristic (None = the CUDA device's, ``CPU_NUM_SMS`` off CUDA).
        batch_invariant: the fixed tiles and splits of the module docstring (``num_splits`` / ``num_sms``
            unused).
    Raises:
        ValueError: a query length < 1, or G larger than ``SHORT_ROWS_MAX``.
    """
    if any(n < 1 for n in q_lens):
        raise ValueError("every sequence needs at least one query token")
    if num_queries_per_kv > SHORT_ROWS_MAX:
        raise ValueError(f"at most {SHORT_ROWS_MAX} query heads per KV head are supported")
    device = torch.device(device)
    counts = torch.tensor(list(q_lens), dtype=torch.int32)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(counts, 0)
    starts = torch.as_tensor(start_positions).to(device=device, dtype=torch.int32)
    kv = torch.as_tensor(kv_lens).to(device=device, dtype=torch.int32)
    tables = _as_table(block_tables).to(device=device, dtype=torch.int32)
    causal_t = torch.tensor([True] * len(q_lens) if causal is None else list(causal), dtype=torch.int32)
    bound = int(kv.max()) if max_kv_len is None else max_kv_len
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else CPU_NUM_SMS
    groups = (_invariant_group(list(q_lens), num_queries_per_kv, bound, device) if batch_invariant
              else _tile_groups(list(q_lens), num_kv_heads, num_queries_per_kv, bound, num_splits, num_sms, device))
    return RaggedAttentionMetadata(
        cu_seqlens_q=cu.to(device), kv_lens=kv, start_pos=starts, block_tables=tables.contiguous(),
        causal=causal_t.to(device), slot_mapping=_slot_mapping(counts, cu, starts, tables, block_size),
        groups=groups, num_tokens=int(cu[-1]), block_size=block_size, num_queries_per_kv=num_queries_per_kv,
        max_kv_len=bound,
    )


def _as_table(block_tables: Tensor | Sequence[Sequence[int]]) -> Tensor:
    """``[S, max_blocks]`` from a tensor or per-sequence lists (padded with block 0)."""
    if isinstance(block_tables, Tensor):
        return block_tables
    width = max((len(t) for t in block_tables), default=0) or 1
    return torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], dtype=torch.int64)


def _slot_mapping(counts: Tensor, cu: Tensor, starts: Tensor, tables: Tensor, block_size: int) -> Tensor:
    """``[T]`` int64 slot of every new token (``sparkserve.engine.attention``'s rule), on the tables' device."""
    device = tables.device
    owner = torch.repeat_interleave(torch.arange(counts.numel()), counts).to(device)  # [T]
    row = torch.arange(int(cu[-1]), device=device) - cu[:-1].to(device).long()[owner]
    positions = starts.long()[owner] + row  # [T]
    return tables.long()[owner, positions // block_size] * block_size + positions % block_size


def _tile_groups(q_lens: list[int], num_kv_heads: int, group: int, max_kv_len: int, num_splits: int | None,
                 num_sms: int, device: torch.device) -> tuple[TileGroup, ...]:
    """The short and long tile groups (module docstring); empty ones left out."""
    short = [s for s, n in enumerate(q_lens) if n * group <= SHORT_ROWS_MAX]
    long = [s for s, n in enumerate(q_lens) if n * group > SHORT_ROWS_MAX]
    groups = []
    if short:
        block_m = max(MIN_BLOCK_M, next_power_of_2(max(q_lens[s] for s in short) * group))
        splits = num_splits if num_splits is not None else split_heuristic(len(short) * num_kv_heads, max_kv_len, num_sms)
        groups.append(_group([(s, 0) for s in short], block_m, block_m // group, splits, device,
                             max(q_lens[s] for s in short)))
    if long:
        block_m = max(LONG_BLOCK_M, next_power_of_2(group))
        block_q = block_m // group
        tiles = [(s, i) for s in long for i in range(0, q_lens[s], block_q)]
        groups.append(_group(tiles, block_m, block_q, 1, device, max(q_lens[s] for s in long)))
    return tuple(groups)


def invariant_block_m(group: int) -> int:
    """Rows per tile in batch-invariant mode: a function of G alone (the smallest tile ``tl.dot`` takes)."""
    return max(MIN_BLOCK_M, next_power_of_2(group))


def _invariant_group(q_lens: list[int], group: int, max_kv_len: int, device: torch.device) -> tuple[TileGroup]:
    """Batch-invariant mode's one group: every sequence in tiles of ``invariant_block_m(G) // G`` tokens,
    ``INVARIANT_SPLIT_KEYS`` keys per split (as many splits as the longest context needs)."""
    block_m = invariant_block_m(group)
    block_q = block_m // group
    tiles = [(s, i) for s, n in enumerate(q_lens) for i in range(0, n, block_q)]
    splits = cdiv(max(max_kv_len, 1), INVARIANT_SPLIT_KEYS)
    return (_group(tiles, block_m, block_q, splits, device, max(q_lens), INVARIANT_SPLIT_KEYS),)


def _group(tiles: list[tuple[int, int]], block_m: int, block_q: int, splits: int, device: torch.device,
           max_q_len: int, split_keys: int = 0) -> TileGroup:
    seq = torch.tensor([s for s, _ in tiles], dtype=torch.int32, device=device)
    start = torch.tensor([i for _, i in tiles], dtype=torch.int32, device=device)
    return TileGroup(seq, start, block_m, block_q, max(1, splits), max_q_len, split_keys)


def split_heuristic(num_programs: int, max_kv_len: int, num_sms: int) -> int:
    """KV splits per tile so that ``num_programs * splits`` covers ~2 waves of ``num_sms`` programs,
    with chunks of at least ``MIN_KEYS_PER_SPLIT`` keys, at most ``MAX_SPLITS``."""
    by_length = cdiv(max(max_kv_len, 1), MIN_KEYS_PER_SPLIT)
    by_occupancy = cdiv(2 * num_sms, max(num_programs, 1))
    return max(1, min(MAX_SPLITS, by_length, by_occupancy))


def split_scratch_bytes(num_rows: int, num_heads: int, head_dim: int, splits: int = MAX_SPLITS) -> int:
    """Most bytes of split-KV scratch one launch allocates for ``num_rows`` short-group query rows (decode
    tokens, verify blocks; at most ``max_num_seqs * (1 + gamma)`` in a step): fp32 partial outputs
    ``[splits, rows, H, hd]`` and log-sum-exps ``[splits, rows, H]``; ``splits`` defaults to ``MAX_SPLITS``.
    The KV cache sizing on CUDA reserves it (``EngineCore._kv_cache_bytes``)."""
    return 4 * splits * num_rows * num_heads * (head_dim + 1)
