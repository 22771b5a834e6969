"""Decode steps over static buffers at padded buckets (engine/step_graph.py), eager on the CPU through the
Triton kernels in the interpreter: buffers reused, contents as freshly built, padding changes no token."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch  # noqa: E402

from sparkserve.engine.attention import build_step_metadata, new_kv_cache  # noqa: E402
from sparkserve.engine.step_graph import StepGraph, default_buckets  # noqa: E402
from sparkserve.kernels.attention_metadata import build_ragged_metadata  # noqa: E402
from sparkserve.testing.tiny import tiny_target  # noqa: E402

BLOCK, TABLES, SCRATCH = 8, [[0], [1, 2], [3]], 15
LENS = [5, 9, 3]  # cached tokens per sequence before the decode steps


def _setup():
    target = tiny_target(seed=6, layers=2, head_dim=16)
    cfg = target.config
    caches = [new_kv_cache(16, BLOCK, cfg.num_key_value_heads, cfg.head_dim, torch.float32)
              for _ in range(cfg.num_hidden_layers)]
    heads = (cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads)
    meta = build_step_metadata(LENS, [0] * 3, LENS, torch.tensor([[0, 0], [1, 2], [3, 0]]), BLOCK, "cpu", heads)
    ids = torch.randint(0, cfg.vocab_size, (sum(LENS),), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(n) for n in LENS])
    with torch.inference_mode():
        target.model(ids, positions, caches, meta)  # prefill
    return target, caches, heads


def _eager_decode(target, caches, heads, tokens: list[int], positions: list[int]) -> torch.Tensor:
    meta = build_step_metadata([1] * 3, positions, [p + 1 for p in positions], torch.tensor([[0, 0], [1, 2], [3, 0]]),
                               BLOCK, "cpu", heads)
    with torch.inference_mode():
        return target.model(torch.tensor(tokens), torch.tensor(positions), caches, meta)[0]


def test_default_buckets() -> None:
    assert default_buckets(40) == (1, 2, 4, 8, 16, 32, 40) and default_buckets(3) == (1, 2, 3)


def test_padded_bucket_steps_reuse_static_buffers_and_match_the_eager_step() -> None:
    target, caches, heads = _setup()
    eager_caches = [(k.clone(), v.clone()) for k, v in caches]
    graph = StepGraph(target.model, caches, heads, BLOCK, max_blocks=2, scratch_block=SCRATCH, buckets=(1, 2, 4))
    assert graph.bucket_for(3) == 4
    step = graph.steps[4]
    pointers = [t.data_ptr() for t in (step.input_ids, step.positions, step.meta.kv_lens, step.meta.block_tables,
                                       step.meta.slot_mapping)]
    tokens, positions = [7, 11, 2], list(LENS)
    for _ in range(2):  # two consecutive decode steps
        with torch.inference_mode():
            hidden = graph.run(tokens, positions, TABLES)  # [3, d] of a bucket of 4 (one pad row)
        reference = _eager_decode(target, eager_caches, heads, tokens, positions)
        torch.testing.assert_close(hidden, reference, atol=1e-5, rtol=1e-5)
        logits, ref_logits = target.model.compute_logits(hidden), target.model.compute_logits(reference)
        assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
        fresh = build_ragged_metadata([1] * 3, positions, [p + 1 for p in positions], TABLES, BLOCK, *heads)
        assert torch.equal(step.meta.slot_mapping[:3], fresh.slot_mapping)
        assert torch.equal(step.meta.kv_lens[:3], fresh.kv_lens) and torch.equal(step.meta.start_pos[:3], fresh.start_pos)
        assert int(step.meta.slot_mapping[3]) == SCRATCH * BLOCK  # the pad row writes the scratch block
        assert [t.data_ptr() for t in (step.input_ids, step.positions, step.meta.kv_lens, step.meta.block_tables,
                                       step.meta.slot_mapping)] == pointers
        tokens, positions = logits.argmax(-1).tolist(), [p + 1 for p in positions]
    for (k, v), (ek, ev) in zip(caches, eager_caches, strict=True):  # real blocks identical, pads only in scratch
        torch.testing.assert_close(k[:, :SCRATCH], ek[:, :SCRATCH], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[:, :SCRATCH], ev[:, :SCRATCH], atol=1e-5, rtol=1e-5)
