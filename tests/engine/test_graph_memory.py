"""The step graphs' memory counted before the KV cache is sized (engine/graph_memory.py): the static-buffer
formula equals what ``StepGraph`` allocates, the shapes known before the runner exist are the runner's, and
the budget arithmetic on injected numbers (the CUDA measurement itself needs a device)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the runner's Triton path on the CPU (no kernel runs here)

import pytest  # noqa: E402
import torch  # noqa: E402

from sparkserve.engine.config import EngineArgs  # noqa: E402
from sparkserve.engine.core import EngineCore  # noqa: E402
from sparkserve.engine.graph_memory import (  # noqa: E402
    GraphReserve,
    GraphShapes,
    engine_graph_shapes,
    graph_reserve,
    kv_cache_budget,
    static_step_bytes,
)
from sparkserve.engine.step_graph import GraphKey, StepGraph  # noqa: E402
from sparkserve.kernels.attention_metadata import MAX_SPLITS  # noqa: E402
from sparkserve.testing.tiny import random_dspark, tiny_target  # noqa: E402

GIB = 2**30


def _allocated(graphs: StepGraph) -> int:
    """Bytes of every allocated key's static tensors (the packed inputs and the constant metadata)."""
    total = 0
    for step in graphs.steps.values():
        meta = step.meta
        total += step.packed.nbytes + meta.cu_seqlens_q.nbytes + meta.causal.nbytes
        total += sum(g.tile_seq.nbytes + g.tile_q_start.nbytes for g in meta.groups)
    return total


def _engine(max_num_seqs: int = 20) -> EngineCore:
    target = tiny_target(seed=5, layers=3, head_dim=16)
    args = EngineArgs(dtype="float32", num_kv_blocks=40, block_size=8, max_num_seqs=max_num_seqs, max_model_len=100,
                      max_num_batched_tokens=64, verify_policy="fixed:3", attention_backend="triton",
                      cuda_graphs="on", warm_up_kernels=False)
    return EngineCore(args, loaded=target, drafter=random_dspark(target, block_size=5, seed=3))


def test_shapes_known_before_the_runner_are_its_graphs_and_their_static_bytes_exact() -> None:
    core = _engine()
    runner = core.runner
    target, draft = engine_graph_shapes(core.loaded.config, 8, 20, core.max_model_len, torch.float32, core.drafter)
    for shapes, graphs in ((target, runner.graphs), (draft, runner.draft_graphs)):
        assert set(shapes.keys) == {GraphKey(q, b) for q in graphs.q_lens for b in graphs.buckets}
        assert shapes.max_blocks == graphs.max_blocks
        for key in shapes.keys:
            graphs.step(key)  # allocate every key's buffers (no forward)
        assert _allocated(graphs) == sum(static_step_bytes(k.q_len, k.rows, shapes.max_blocks) for k in shapes.keys)
    assert target.output_bytes_per_token == 3 * 32 * 4  # hidden + two auxiliary layers, fp32
    assert draft.keys[0].q_len == 5 and draft.max_blocks == target.max_blocks + runner.speculator.scratch_per_row


def test_no_drafter_graphs_without_a_dspark_drafter() -> None:
    target = tiny_target(seed=5, layers=3, head_dim=16)
    shapes = engine_graph_shapes(target.config, 16, 4, 64, torch.bfloat16, None)
    assert len(shapes) == 1 and shapes[0].output_bytes_per_token == 32 * 2
    assert {k.q_len for k in shapes[0].keys} == {1} and {k.rows for k in shapes[0].keys} == {1, 2, 4}


def test_graph_reserve_from_injected_numbers() -> None:
    a = GraphShapes((GraphKey(1, 4), GraphKey(4, 8)), max_blocks=10, output_bytes_per_token=100, num_heads=2,
                    head_dim=16)
    b = GraphShapes((GraphKey(5, 2),), max_blocks=12, output_bytes_per_token=10, num_heads=4, head_dim=8)
    reserve = graph_reserve([a, b], activation_peak_bytes=1000, activation_tokens=64)
    assert reserve.static_bytes == (static_step_bytes(1, 4, 10) + static_step_bytes(4, 8, 10)
                                    + static_step_bytes(5, 2, 12))
    assert static_step_bytes(1, 4, 10) == 3 * 32 + 2 * 16 + 160 + 20 + 48  # packed inputs + constant metadata
    assert reserve.output_bytes == (4 + 32) * 100 + 10 * 10
    largest_a = -(-1000 * 32 // 64) + 4 * MAX_SPLITS * 32 * 2 * 17  # 32 tokens: half the peak + split scratch
    largest_b = -(-1000 * 10 // 64) + 4 * MAX_SPLITS * 10 * 4 * 9
    assert reserve.pool_transient_bytes == max(largest_a, largest_b)
    assert reserve.total == reserve.static_bytes + reserve.output_bytes + reserve.pool_transient_bytes


def test_kv_cache_budget_subtracts_the_graphs_and_names_them_when_nothing_is_left() -> None:
    graphs = GraphReserve(static_bytes=GIB // 4, output_bytes=GIB // 4, pool_transient_bytes=GIB // 2)
    args = dict(total_bytes=80 * GIB, in_use_bytes=2 * GIB, utilization=0.9, activation_peak_bytes=3 * GIB,
                split_scratch_bytes=GIB)
    without = kv_cache_budget(**args, graphs=None)
    assert without == int(72 * GIB) - 6 * GIB
    assert kv_cache_budget(**args, graphs=graphs) == without - GIB
    full = {**args, "in_use_bytes": 67 * GIB}
    assert kv_cache_budget(**full, graphs=None) == GIB  # the graphs take the last GiB
    with pytest.raises(ValueError, match="1.00 GiB step graphs"):
        kv_cache_budget(**full, graphs=graphs)


def test_the_cpu_engine_counts_no_graph_reserve() -> None:
    """Off CUDA the KV cache is sized by ``kv_cache_memory_gb`` (1 GiB): nothing of the device is reserved."""
    assert _engine(max_num_seqs=4).graph_reserve is None


def test_window_scripts_graph_memory_check_runs_dry(monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/gpu_check.py's serving phase records the estimate against the capture's measurement; on the
    CPU (no capture, an injected activation peak) the estimate is the reserve of the engine's keys."""
    import importlib.util
    from pathlib import Path

    from sparkserve.engine import throughput_probe

    spec = importlib.util.spec_from_file_location("gpu_check_mem", Path(__file__).resolve().parents[2] / "scripts"
                                                  / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(throughput_probe, "activation_peak_bytes", lambda *args: 64 * 1000)
    core = _engine(max_num_seqs=4)
    result = gpu_check.graph_memory_check(core)
    shapes = engine_graph_shapes(core.loaded.config, 8, 4, core.max_model_len, torch.float32, core.drafter)
    assert result["estimated_bytes"] == graph_reserve(shapes, 64 * 1000, 64).total > 0
    assert result["measured_bytes"] == 0 and result["keys"] == len(core.runner.graphs.q_lens) * 3 + 3
