"""Uniform steps over static buffers at padded buckets (engine/step_graph.py), eager on the CPU through the
Triton kernels in the interpreter: buffers reused, contents as freshly built, padding changes no token; the
engine serves decode and verify steps through them with the same tokens as its eager steps (through the
device windows' smoke, scripts/gpu_check.py), and the profile times decode cells through them."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch  # noqa: E402

from sparkserve.engine.attention import build_step_metadata, new_kv_cache  # noqa: E402
from sparkserve.engine.config import EngineArgs  # noqa: E402
from sparkserve.engine.core import EngineCore  # noqa: E402
from sparkserve.engine.step_graph import GraphKey, StepGraph, default_buckets  # noqa: E402
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


def test_default_buckets_and_keys() -> None:
    assert default_buckets(40) == (1, 2, 4, 8, 16, 32, 40) and default_buckets(3) == (1, 2, 3)
    target, caches, heads = _setup()
    graph = StepGraph(target.model, caches, heads, BLOCK, max_blocks=2, scratch_block=SCRATCH, buckets=(1, 2, 4),
                      q_lens=(1, 4))
    assert graph.key_for([1, 1, 1]) == GraphKey(1, 4) and graph.key_for([4, 4]) == GraphKey(4, 2)
    assert graph.key_for([1, 4]) is None and graph.key_for([2, 2]) is None and graph.key_for([1] * 5) is None


def test_padded_bucket_steps_reuse_static_buffers_and_match_the_eager_step() -> None:
    target, caches, heads = _setup()
    eager_caches = [(k.clone(), v.clone()) for k, v in caches]
    graph = StepGraph(target.model, caches, heads, BLOCK, max_blocks=2, scratch_block=SCRATCH, buckets=(1, 2, 4),
                      num_splits=2)
    step = graph.step(graph.key_for([1, 1, 1]))
    assert step.key == GraphKey(1, 4)
    pointers = [t.data_ptr() for t in (step.input_ids, step.positions, step.meta.kv_lens, step.meta.block_tables,
                                       step.meta.slot_mapping)]
    tokens, positions = [7, 11, 2], list(LENS)
    for _ in range(2):  # two consecutive decode steps
        with torch.inference_mode():
            graph.stage(step, torch.tensor(tokens), torch.tensor(positions), torch.tensor([[0, 0], [1, 2], [3, 0]]),
                        [p + 1 for p in positions])
            hidden, _ = graph.run(step)  # [3, d] of a bucket of 4 (one pad row)
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


def test_profile_times_decode_cells_through_the_static_buffers() -> None:
    """SPS(B, R) of a decode cell (B = R) is timed on the path that serves it: the bucket's static buffers
    (a graph replay on CUDA); a mixed cell stays eager."""
    from sparkserve.engine.throughput_probe import make_step_fn

    target = tiny_target(seed=5, layers=2, head_dim=16)
    args = EngineArgs(dtype="float32", num_kv_blocks=48, block_size=8, max_num_seqs=4, max_num_batched_tokens=32,
                      drafter="none", attention_backend="triton", cuda_graphs="on")
    core = EngineCore(args, loaded=target)
    graphs = core.runner.graphs
    step = make_step_fn(core.runner, core.num_blocks, context_len=12)
    assert step(3, 3) > 0 and graphs.steps[GraphKey(1, 4)].replays == 1
    assert step(6, 3) > 0 and graphs.replays == 1
    assert core.profile_key()["device"] == "cpu+graphs"  # a profile measured without graphs is not reused


def test_gpu_check_window_paths_serve_graph_steps_dry() -> None:
    """The device windows' graph checks run on the CPU (interpreter): window 1's smoke serves decode and
    verify steps, and the DSpark drafter's blocks, through the step graphs with the eager run's tokens; window 2's graph-vs-eager decode
    timing measures both paths."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("gpu_check_graphs", root / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    smoke = gpu_check.engine_smoke("cpu", max_tokens=8, graphs="on")
    assert smoke["status"] == "ok", smoke
    assert smoke["none"]["graph_replays"] >= 2 and smoke["fixed:3"]["graph_replays"] >= 1  # decode and verify
    assert smoke["dspark fixed:3"]["draft_graph_replays"] >= 1 and smoke["fixed:3"]["draft_graph_replays"] is None
    assert smoke["none eager"]["graph_replays"] is None
    assert smoke["none"]["tokens"] == smoke["fixed:3"]["tokens"] == smoke["none eager"]["tokens"]
    target = tiny_target(seed=5, layers=2, head_dim=16)
    core = EngineCore(EngineArgs(dtype="float32", num_kv_blocks=32, block_size=8, max_num_seqs=4, drafter="none",
                                 attention_backend="triton", cuda_graphs="on"), loaded=target)
    assert core.runner.graphs.scratch_block == core.num_blocks == core.runner.kv_caches[0][0].shape[1] - 1
    rows = gpu_check.graph_vs_eager(core, batches=(1, 4, 16), rounds=1)
    assert [r["batch"] for r in rows] == [1, 4] and all(r["graph_s"] > 0 and r["eager_s"] > 0 for r in rows)
    assert core.runner.graphs.replays == 2 * 2  # warm-up + one round per batch through the graphs
