"""Paged attention over a flattened ragged batch (vectorised pure-torch path).

The runner flattens every scheduled sequence's new tokens into one ``[T]`` batch. Each layer
stores the new keys / values into the paged KV cache through ``slot_mapping`` and then attends over
each sequence's cached context through its block table.

Two groups keep the torch path fast on the CPU:
- *short* sequences (decode, verify blocks, drafter blocks: ``q_len <= SHORT_QUERY_MAX``) are padded
  to ``[S, q_max]`` queries and ``[S, kv_max]`` keys and run as ONE batched SDPA call per layer;
- *long* sequences (prefill chunks) run one SDPA call each, with no dense mask (linear memory in the
  context): a chunk after cached context attends to the context (every key visible) and to its own fresh
  keys (causal) as two flash-attention calls whose outputs are merged by their log-sum-exp
  (the split-softmax identity of flash-decoding; Dao et al. 2023, "Flash-Decoding for long-context
  inference"), so the CPU's flash kernel keeps its causal block skipping and never reads a mask.

Mask rule: query i of a sequence (absolute position ``start + i``) sees key j iff
``j <= start + i`` (causal), or, for a non-causal (bidirectional) block of a drafter, iff
``j < kv_len``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sparkserve.engine import batch_invariant

SHORT_QUERY_MAX = 16


@dataclass
class PrefillSeq:
    """A long query run on its own: token rows ``[q_start, q_end)`` of the flat batch."""

    q_start: int
    q_end: int
    start_pos: int  # absolute position of the first query token
    slots: torch.Tensor  # [kv_len] flat cache slots of the whole context (incl. new tokens)
    kv_len: int  # keys visible to the sequence (context + fresh)
    causal: bool  # False: a bidirectional drafter block (every one of the kv_len keys visible)

    @property
    def q_len(self) -> int:
        return self.q_end - self.q_start

    @property
    def fresh_only(self) -> bool:
        """Causal over this step's keys only (a first prefill chunk): plain causal SDPA on ``k`` / ``v``."""
        return self.causal and self.start_pos == 0 and self.kv_len == self.q_len

    def causal_mask(self) -> torch.Tensor:
        """``[q_len, kv_len]`` bool (True = may attend): only for the fallback off the CPU flash kernel."""
        pos = torch.arange(self.kv_len, device=self.slots.device)
        q_pos = torch.arange(self.start_pos, self.start_pos + self.q_len, device=self.slots.device)
        return pos[None, :] <= q_pos[:, None]


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, shared by all layers.

    Attributes:
        slot_mapping: [T] int64 flat cache slot (block_id * block_size + offset) of each new token.
        short_q_index: [S_s, q_max] int64 rows of the flat batch for the short group (padding points
            at row 0 and is masked out / dropped).
        short_q_valid: [S_s, q_max] bool, which padded query rows are real.
        short_block_tables: [S_s, max_blocks] int64 block tables of the short group.
        short_mask: [S_s, 1, q_max, max_blocks * block_size] bool, True = may attend.
        prefills: long sequences.
        num_tokens: T.
    """

    slot_mapping: torch.Tensor
    short_q_index: torch.Tensor | None
    short_q_valid: torch.Tensor | None
    short_block_tables: torch.Tensor | None
    short_mask: torch.Tensor | None
    prefills: list[PrefillSeq]
    num_tokens: int
    block_size: int
    short_dst: torch.Tensor | None = None
    short_src: torch.Tensor | None = None
    kernel: object | None = None
    """``sparkserve.kernels.attention_metadata.RaggedAttentionMetadata`` when the step runs the Triton kernels
    (CUDA, ``attention_backend`` triton); then ``paged_attention`` dispatches to them."""
    _bias: dict = field(default_factory=dict)

    def short_bias(self, group: int) -> torch.Tensor:
        """Additive fp32 mask (0 / -inf) of the short group for ``group`` query heads per KV head:
        [1, S, group * q_max, L], built once per step and shared by all layers."""
        bias = self._bias.get(group)
        if bias is None:
            mask = self.short_mask  # [S, 1, q_max, L]
            seqs, _, q_max, length = mask.shape
            grouped = mask.expand(seqs, group, q_max, length).reshape(1, seqs, group * q_max, length)
            bias = torch.zeros(grouped.shape, dtype=torch.float32, device=mask.device)
            bias.masked_fill_(~grouped, float("-inf"))
            self._bias[group] = bias
        return bias


def build_attention_metadata(
    q_lens: list[int],
    start_positions: list[int] | torch.Tensor,
    kv_lens: list[int] | torch.Tensor,
    block_tables: torch.Tensor | list[list[int]] | list[tuple[int, ...]],
    block_size: int,
    causal: list[bool] | None = None,
    device: torch.device | str = "cpu",
    token_positions: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_kv_len: int | None = None,
) -> AttentionMetadata:
    """Build the metadata for a flat ragged batch of S sequences (tensor ops, no per-token Python).

    Args:
        q_lens: new (query) tokens per sequence; rows are laid out sequence after sequence.
        start_positions: absolute position of each sequence's first query token.
        kv_lens: context length visible to each sequence after this step's keys are stored
            (``start + q_len`` for the target; context rows + block for a drafter).
        block_tables: ``[S, max_blocks]`` int64 tensor (CPU; entries past a table are ignored) or
            per-sequence lists of physical block ids covering ``kv_lens``.
        block_size: tokens per KV block.
        causal: per sequence, False for a bidirectional block (drafter); default all True.
        token_positions: ``(owner [T], position [T])`` of every query row if the caller has them.
        max_kv_len: a host-side upper bound of ``kv_lens`` (shapes), so tensor ``start_positions`` /
            ``kv_lens`` (e.g. computed on the device from accepted counts) need no host sync.
    Returns:
        AttentionMetadata on ``device``.
    """
    num_seqs = len(q_lens)
    causal = causal if causal is not None else [True] * num_seqs
    # Tensor starts / kv lengths may live on the device (a drafter's anchors after verification): the
    # host-only pieces (lengths, offsets, owners) are built on the CPU and moved; nothing is read back.
    work = next((t.device for t in (start_positions, kv_lens) if isinstance(t, torch.Tensor)), torch.device("cpu"))
    tables = block_tables if isinstance(block_tables, torch.Tensor) else _pad_tables(block_tables)
    counts = torch.tensor(q_lens, dtype=torch.int64)
    q_offsets = torch.cumsum(counts, 0) - counts  # [S] first row of each sequence
    num_tokens = sum(q_lens)
    starts_t = torch.as_tensor(start_positions, dtype=torch.int64).to(work)
    kv_t = torch.as_tensor(kv_lens, dtype=torch.int64).to(work)
    if token_positions is None:
        owner = torch.repeat_interleave(torch.arange(num_seqs), counts)  # [T]
        row = (torch.arange(num_tokens) - q_offsets[owner]).to(work)
        owner = owner.to(work)
        positions = starts_t[owner] + row
    else:
        owner, positions = (t.to(work) for t in token_positions)
    tables_w = tables.to(work)
    slot_mapping = tables_w[owner, positions // block_size] * block_size + positions % block_size  # [T]
    short = [i for i in range(num_seqs) if q_lens[i] <= SHORT_QUERY_MAX]
    long = [i for i in range(num_seqs) if q_lens[i] > SHORT_QUERY_MAX]
    meta = AttentionMetadata(
        slot_mapping=slot_mapping.to(device), short_q_index=None, short_q_valid=None,
        short_block_tables=None, short_mask=None, prefills=[], num_tokens=num_tokens,
        block_size=block_size,
    )
    if short:
        _build_short_group(meta, short, q_lens, q_offsets, starts_t, kv_t, tables_w, causal, block_size, device,
                           max_kv_len)
    offsets = q_offsets.tolist()
    if long and (isinstance(start_positions, torch.Tensor) or isinstance(kv_lens, torch.Tensor)):
        start_positions, kv_lens = starts_t.tolist(), kv_t.tolist()  # prefill chunks only: host values exist
    for i in long:
        pos = torch.arange(kv_lens[i])
        seq_slots = tables[i].cpu()[pos // block_size] * block_size + pos % block_size
        meta.prefills.append(PrefillSeq(offsets[i], offsets[i] + q_lens[i], start_positions[i],
                                        seq_slots.to(device), kv_lens[i], causal[i]))
    return meta


def build_step_metadata(
    q_lens: list[int], start_positions: list[int], kv_lens: list[int], block_tables: torch.Tensor, block_size: int,
    device: torch.device | str, kernel_heads: tuple[int, int] | None = None,
    token_positions: tuple[torch.Tensor, torch.Tensor] | None = None, num_sms: int | None = None,
) -> AttentionMetadata:
    """The metadata of the attention path that serves the step, and only that one.

    ``kernel_heads`` ``(Hkv, H / Hkv)``: the Triton kernels serve (``attention_backend`` triton); the step
    then carries their ``RaggedAttentionMetadata`` (``meta.kernel``) and its slot mapping, and the torch
    path's padded groups and dense mask are not built; in batch-invariant mode (engine/batch_invariant.py,
    entered around the step) with the kernels' fixed tiles and splits. Otherwise ``build_attention_metadata``.
    Host lists in, so no device value is read back (``max_kv_len`` is ``max(kv_lens)``). ``num_sms``: the
    GPU's multiprocessors for the split-KV heuristic when ``device`` is the host (the runner builds on the
    host and stages the result to the GPU in one copy, ``engine/staging.py``).
    """
    if kernel_heads is None:
        return build_attention_metadata(q_lens, start_positions, kv_lens, block_tables, block_size, device=device,
                                        token_positions=token_positions, max_kv_len=max(kv_lens, default=0))
    from sparkserve.kernels.attention_metadata import build_ragged_metadata

    kernel = build_ragged_metadata(q_lens, start_positions, kv_lens, block_tables.to(torch.int32), block_size,
                                   *kernel_heads, device=device, max_kv_len=max(kv_lens, default=0), num_sms=num_sms,
                                   batch_invariant=batch_invariant.is_enabled())
    return AttentionMetadata(slot_mapping=kernel.slot_mapping, short_q_index=None, short_q_valid=None,
                             short_block_tables=None, short_mask=None, prefills=[], num_tokens=kernel.num_tokens,
                             block_size=block_size, kernel=kernel)


def _pad_tables(block_tables: list[list[int]] | list[tuple[int, ...]]) -> torch.Tensor:
    """Per-sequence block id lists -> ``[S, max_blocks]`` int64 (padded with block 0)."""
    width = max((len(t) for t in block_tables), default=0) or 1
    return torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], dtype=torch.int64)


def _build_short_group(
    meta: AttentionMetadata, short: list[int], q_lens: list[int], q_offsets: torch.Tensor,
    start_positions: torch.Tensor, kv_lens: torch.Tensor, tables: torch.Tensor, causal: list[bool], block_size: int,
    device: torch.device | str, max_kv_len: int | None = None,
) -> None:
    """Padded ``[S, q_max]`` queries / ``[S, kv_max]`` keys of the short group (one batched attention
    per layer), built with tensor ops from the sequences' lengths and block tables (``max_kv_len``: a
    host bound of the keys, else read from ``kv_lens``)."""
    work = kv_lens.device  # kv lengths / starts may be device tensors: the mask is built beside them
    index = torch.tensor(short, dtype=torch.int64)
    q_len_t = torch.tensor([q_lens[i] for i in short], dtype=torch.int64)  # [S]
    kv_len_t = kv_lens.index_select(0, index.to(work))
    start_t = start_positions.index_select(0, index.to(work))
    causal_t = torch.tensor([causal[i] for i in short], dtype=torch.bool).to(work)
    q_max = max(q_lens[i] for i in short)
    nb_max = max(1, -(-(max_kv_len if max_kv_len is not None else int(kv_len_t.max())) // block_size))
    cols = torch.arange(q_max)
    valid = cols[None, :] < q_len_t[:, None]  # [S, q_max] host
    index_t = torch.where(valid, q_offsets[index][:, None] + cols[None, :], torch.zeros_like(valid, dtype=torch.int64))
    valid_w = valid.to(work)
    q_pos_t = start_t[:, None] + cols.to(work)[None, :]
    key_pos = torch.arange(nb_max * block_size, device=work)
    mask = (key_pos[None, None, :] < kv_len_t[:, None, None]) & valid_w[:, :, None]
    mask &= (key_pos[None, None, :] <= q_pos_t[:, :, None]) | ~causal_t[:, None, None]
    mask[:, :, 0] |= ~valid_w  # padded query rows attend to key 0: softmax never sees an all-masked row
    block_tables = tables.index_select(0, index.to(tables.device))[:, :nb_max]
    if block_tables.shape[1] < nb_max:
        block_tables = torch.nn.functional.pad(block_tables, (0, nb_max - block_tables.shape[1]))
    used = torch.arange(nb_max, device=work)[None, :] * block_size < kv_len_t[:, None]
    block_tables = torch.where(used, block_tables.to(work), torch.zeros_like(block_tables, device=work))
    flat_valid = valid.flatten()
    src = torch.nonzero(flat_valid).flatten()
    meta.short_dst = index_t.flatten()[src].to(device)
    meta.short_src = None if bool(flat_valid.all()) else src.to(device)
    meta.short_q_index = index_t.to(device)
    meta.short_q_valid = valid.to(device)
    meta.short_block_tables = block_tables.contiguous().to(device)
    meta.short_mask = mask[:, None].to(device)


def new_kv_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's paged (K, V) pool, zero-filled, head-major: each [Hkv, num_blocks, block_size, hd].

    Head-major lets the gather of a batch's context produce [Hkv, S, L, hd] directly, the layout the
    batched attention matmuls read (no permute copy of the whole context per layer).
    """
    shape = (num_kv_heads, num_blocks, block_size, head_dim)
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def store_kv(
    k: torch.Tensor,  # [T, Hkv, hd]
    v: torch.Tensor,  # [T, Hkv, hd]
    k_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, hd]
    v_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, hd]
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """Write new keys / values into their cache slots (reference for the Triton store kernel)."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, slot_mapping, k.transpose(0, 1).to(k_cache.dtype))
    v_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, slot_mapping, v.transpose(0, 1).to(v_cache.dtype))


def _short_group_attention(
    q: torch.Tensor,  # [T, H, hd]
    k_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, hd]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,  # [T, H, hd], written in place
) -> None:
    """Batched attention of the short group as grouped matmuls (GQA without repeating K/V).

    On the CPU this is ~5x faster than SDPA for 1-16 queries per sequence, and ``index_select``
    gathers the paged K/V ~10x faster than advanced indexing. Softmax runs in fp32.
    """
    tables = meta.short_block_tables  # [S, nb]
    seqs, nb = tables.shape
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[0]
    group = num_heads // num_kv_heads
    kv_len = nb * meta.block_size
    flat = tables.flatten()
    # Head-major cache: the gathered K/V are already [Hkv, S, L, hd], matmul-ready without a permute.
    keys = k_cache.index_select(1, flat).view(num_kv_heads, seqs, kv_len, head_dim).to(q.dtype)
    values = v_cache.index_select(1, flat).view(num_kv_heads, seqs, kv_len, head_dim).to(q.dtype)
    q_max = meta.short_q_index.shape[1]
    q_pad = q.index_select(0, meta.short_q_index.flatten()).view(seqs, q_max, num_kv_heads, group, head_dim)
    q_grp = q_pad.permute(2, 0, 3, 1, 4).reshape(num_kv_heads, seqs, group * q_max, head_dim)
    scores = torch.matmul(q_grp, keys.transpose(-1, -2)).float() * scale  # [Hkv, S, G*q_max, L]
    scores += meta.short_bias(group)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    o = torch.matmul(probs, values)  # [Hkv, S, G*q_max, hd]
    o = o.view(num_kv_heads, seqs, group, q_max, head_dim).permute(1, 3, 0, 2, 4)  # [S, q_max, Hkv, G, hd]
    o = o.reshape(seqs * q_max, num_heads, head_dim)
    if meta.short_src is None:
        out.index_copy_(0, meta.short_dst, o)
    else:
        out.index_copy_(0, meta.short_dst, o.index_select(0, meta.short_src))


def paged_attention(
    q: torch.Tensor,  # [T, H, hd]
    k: torch.Tensor,  # [T, Hkv, hd]
    v: torch.Tensor,  # [T, Hkv, hd]
    k_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, hd]
    v_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, hd]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Store this step's K/V and attend over the paged cache. Returns [T, H, hd].

    GQA: each group of ``H / Hkv`` query heads shares one KV head.
    """
    if meta.kernel is not None:  # CUDA: the Triton kernels (imported only here: CPU tests set up Triton first)
        from sparkserve.kernels.paged_attention import store_and_attend

        return store_and_attend(q, k, v, k_cache, v_cache, meta.kernel, scale)
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    if batch_invariant.is_enabled():  # --batch-invariant: fixed KV chunks, every row read from the cache
        return batch_invariant.invariant_attention(q, k_cache, v_cache, meta, scale)
    num_tokens, num_heads, head_dim = q.shape
    out = q.new_empty(num_tokens, num_heads, head_dim)
    if meta.short_q_index is not None:
        _short_group_attention(q, k_cache, v_cache, meta, scale, out)
    for seq in meta.prefills:
        out[seq.q_start:seq.q_end] = _long_attention(q, k, v, k_cache, v_cache, seq, scale)
    return out


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _gather_heads(cache: torch.Tensor, slots: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows at ``slots`` as ``[1, H, L, hd]`` (KV heads repeated for GQA)."""
    num_kv_heads, _, _, head_dim = cache.shape
    rows = cache.view(num_kv_heads, -1, head_dim).index_select(1, slots).to(dtype)  # [Hkv, L, hd]
    return _repeat_heads(rows, num_heads)


def _repeat_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[Hkv, L, hd]`` -> ``[1, H, L, hd]``, each KV head shared by ``H / Hkv`` consecutive query heads."""
    num_kv_heads, length, head_dim = x.shape
    group = num_heads // num_kv_heads
    return x[:, None].expand(num_kv_heads, group, length, head_dim).reshape(1, num_heads, length, head_dim)


def _long_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, seq: PrefillSeq, scale: float) -> torch.Tensor:
    """Attention of one long sequence's queries; returns ``[q_len, H, hd]``.

    Memory is linear in ``kv_len`` (the gathered context; no ``[q_len, kv_len]`` mask): a causal chunk after
    ``start_pos`` cached keys is split into (a) every query against the context ``[0, start_pos)`` and (b)
    causal attention over the chunk's own keys, merged exactly by log-sum-exp:
    ``o = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse)``, ``lse = logaddexp(lse_a, lse_b)``.
    """
    num_heads = q.shape[1]
    gqa = num_heads != k.shape[1]
    qs = q[seq.q_start:seq.q_end].transpose(0, 1)  # [H, q_len, hd]
    if seq.fresh_only:
        ks = k[seq.q_start:seq.q_end].transpose(0, 1)  # [Hkv, q_len, hd]
        vs = v[seq.q_start:seq.q_end].transpose(0, 1)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        return o.transpose(0, 1)
    split = (seq.causal and _CPU_FLASH is not None and q.device.type == "cpu"
             and seq.kv_len == seq.start_pos + seq.q_len and q.dtype in (torch.float32, torch.bfloat16, torch.float16))
    if not split:  # a bidirectional drafter block (every key visible: no mask), or causal off the CPU kernel
        ks = _gather_heads(k_cache, seq.slots, num_heads, q.dtype)[0]
        vs = _gather_heads(v_cache, seq.slots, num_heads, q.dtype)[0]
        mask = seq.causal_mask() if seq.causal else None
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale).transpose(0, 1)
    q4 = qs.unsqueeze(0)  # [1, H, q_len, hd]
    k_new = _repeat_heads(k[seq.q_start:seq.q_end].transpose(0, 1), num_heads)
    v_new = _repeat_heads(v[seq.q_start:seq.q_end].transpose(0, 1), num_heads)
    o_b, lse_b = _CPU_FLASH(q4, k_new, v_new, 0.0, True, scale=scale)[:2]
    context = seq.slots[:seq.start_pos]
    k_ctx = _gather_heads(k_cache, context, num_heads, q.dtype)
    v_ctx = _gather_heads(v_cache, context, num_heads, q.dtype)
    o_a, lse_a = _CPU_FLASH(q4, k_ctx, v_ctx, 0.0, False, scale=scale)[:2]
    lse = torch.logaddexp(lse_a, lse_b)  # [1, H, q_len] fp32
    o = o_a.float() * torch.exp(lse_a - lse).unsqueeze(-1) + o_b.float() * torch.exp(lse_b - lse).unsqueeze(-1)
    return o[0].to(q.dtype).transpose(0, 1)
