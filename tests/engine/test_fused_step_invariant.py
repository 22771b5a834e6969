"""The fused CPU step in batch-invariant mode (issue 24): a position's final hidden state has the same bits
decoded alone, decoded beside other sequences (a verify block, a prefill chunk), inside a verify block, inside
a prefill chunk (first, middle or last row) and as the last row of a one-chunk prefill, because in the mode every
step (prefill chunks included) runs the fused ops, whose attention reduces each row over its keys in one order.
fp32 and bf16, a tiny random Llama. Control: with the mode off, prefill chunks run the eager layers and the same
position's bits differ between a prefill and a decode."""

from __future__ import annotations

import pytest
import torch

from sparkserve.engine.attention import build_attention_metadata, new_kv_cache
from sparkserve.engine.batch_invariant import batch_invariant_mode, fused_rows_metadata
from sparkserve.engine.models.llama import LlamaForCausalLM
from sparkserve.kernels import fused_cpu
from sparkserve.testing.batch_invariance import count_fused_attention_rows
from sparkserve.testing.tiny import tiny_target

pytestmark = pytest.mark.skipif(not fused_cpu.load(), reason="fused CPU extension not built (scripts/setup.sh)")

BLOCK_SIZE = 4
BLOCKS_PER_SEQ = 16  # 64 positions per sequence
TARGET = 30  # the position whose hidden state is compared
Step = list[tuple[int, int, int]]  # (sequence, first position, rows) of each sequence in one step


def _run(model: LlamaForCausalLM, tokens: torch.Tensor, steps: list[Step]) -> torch.Tensor:
    """Run ``steps`` in order over a fresh cache; returns sequence 0's final hidden state [d] at ``TARGET``."""
    cfg = model.config
    dtype = model.norm.dtype
    caches = [new_kv_cache(3 * BLOCKS_PER_SEQ, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim, dtype)
              for _ in range(cfg.num_hidden_layers)]
    found = None
    for step in steps:
        tables = [list(range(s * BLOCKS_PER_SEQ, (s + 1) * BLOCKS_PER_SEQ))[::-1] for s, _, _ in step]
        meta = build_attention_metadata([n for _, _, n in step], [p for _, p, _ in step],
                                        [p + n for _, p, n in step], tables, BLOCK_SIZE)
        positions = torch.cat([torch.arange(p, p + n) for _, p, n in step])  # [T]
        ids = torch.cat([tokens[s, p:p + n] for s, p, n in step])  # [T]
        hidden, _ = model(ids, positions, caches, meta)  # [T, d]
        row = 0
        for s, p, n in step:
            if s == 0 and p <= TARGET < p + n:
                found = hidden[row + TARGET - p].clone()
            row += n
    assert found is not None
    return found


def _settings() -> dict[str, list[Step]]:
    """Ways of computing sequence 0 up to ``TARGET`` (1 and 2: other sequences sharing steps)."""
    warm_others: Step = [(1, 0, 40), (2, 0, 25)]
    return {
        "one chunk": [[(0, 0, TARGET + 1)]],
        "decode alone": [[(0, 0, TARGET)], [(0, TARGET, 1)]],
        "decode beside a verify block and a chunk": [[(0, 0, TARGET), *warm_others],
                                                     [(0, TARGET, 1), (1, 40, 5), (2, 25, 20)]],
        "inside a verify block": [[(0, 0, TARGET - 2)], [(0, TARGET - 2, 5)]],
        "middle of a chunk of 7": [[(0, p, 7)] for p in range(0, TARGET + 1, 7)],
        "chunks of 16 beside decodes": [[(0, 0, 16), *warm_others], [(0, 16, 16), (1, 40, 1), (2, 25, 1)]],
        "first row of a chunk": [[(0, 0, TARGET)], [(0, TARGET, 12)]],
    }


def _model(dtype: torch.dtype) -> LlamaForCausalLM:
    model = tiny_target(head_dim=16, layers=2, vocab=97).model
    return model.to(dtype)


@pytest.fixture
def fused_rows(monkeypatch) -> list[int]:
    """Rows of each fused attention call (one per layer of a fused step)."""
    return count_fused_attention_rows(monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_bits_do_not_depend_on_the_step_in_the_mode(dtype: torch.dtype, fused_rows: list[int]) -> None:
    model = _model(dtype)
    tokens = torch.randint(0, model.config.vocab_size, (3, 64), generator=torch.Generator().manual_seed(3))
    with batch_invariant_mode():
        hidden = {name: _run(model, tokens, steps) for name, steps in _settings().items()}
    assert fused_rows[0] == TARGET + 1 and len(fused_rows) == 2 * sum(map(len, _settings().values()))  # all fused
    reference = hidden.pop("one chunk")
    differ = [name for name, h in hidden.items() if not torch.equal(h, reference)]
    assert not differ, differ


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_control_mode_off_prefill_and_decode_differ(dtype: torch.dtype) -> None:
    """Off, a prefill chunk runs the eager layers (flash attention, ATen's norms) and a decode the fused ops:
    the same position's bits differ, which the comparison above would see."""
    model = _model(dtype)
    tokens = torch.randint(0, model.config.vocab_size, (3, 64), generator=torch.Generator().manual_seed(3))
    settings = _settings()
    assert not torch.equal(_run(model, tokens, settings["one chunk"]), _run(model, tokens, settings["decode alone"]))


def test_fused_rows_metadata_lists_every_row_once() -> None:
    """Short sequences keep their rows; a prefill chunk's rows are listed in zig-zag order with its block table."""
    tables = [[3, 4, 5], [7, 8, 9, 10, 11, 12], [0, 1]]
    meta = build_attention_metadata([2, 21, 1], [5, 3, 6], [7, 24, 7], tables, BLOCK_SIZE)
    rows = fused_rows_metadata(meta)
    assert not rows.prefills and rows.short_mask is None
    index, valid = rows.short_q_index, rows.short_q_valid  # [3, 21]
    assert index.shape == valid.shape == (3, 21)
    assert sorted(index[valid].tolist()) == list(range(24))
    assert index[2, :4].tolist() == [2, 22, 3, 21]  # the chunk: rows 2 .. 22 of the flat batch
    assert rows.short_block_tables[2].tolist() == tables[1]
    assert rows.short_block_tables[0, :2].tolist() == [3, 4]
    with pytest.raises(ValueError, match="bidirectional"):
        fused_rows_metadata(build_attention_metadata([20], [0], [20], [tables[1]], BLOCK_SIZE, causal=[False]))
