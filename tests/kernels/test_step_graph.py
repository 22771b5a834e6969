"""Uniform steps over static buffers at padded buckets (engine/step_graph.py), eager on the CPU through the
Triton kernels in the interpreter: buffers reused, contents as freshly built, padding changes no token; the
engine serves decode and verify steps through them with the same tokens as its eager steps."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch  # noqa: E402

from sparkserve.engine.attention import build_step_metadata, new_kv_cache  # noqa: E402
from sparkserve.engine.config import EngineArgs  # noqa: E402
from sparkserve.engine.core import EngineCore  # noqa: E402
from sparkserve.engine.step_graph import GraphKey, StepGraph, default_buckets  # noqa: E402
from sparkserve.kernels.attention_metadata import build_ragged_metadata  # noqa: E402
from sparkserve.scheduler.sampling_params import SamplingParams  # noqa: E402
from sparkserve.testing.engine_run import run_to_end  # noqa: E402
from sparkserve.testing.tiny import random_dspark, tiny_target  # noqa: E402

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


def _engine_tokens(graphs: str, policy: str | None) -> tuple[list[list[int]], EngineCore]:
    target = tiny_target(seed=5, layers=3, head_dim=16)
    drafter = random_dspark(target, block_size=4, seed=2) if policy else None
    args = EngineArgs(dtype="float32", num_kv_blocks=48, block_size=8, max_num_seqs=4, max_num_batched_tokens=32,
                      verify_policy=policy, drafter=None if policy else "none", attention_backend="triton",
                      cuda_graphs=graphs, seed=0)
    core = EngineCore(args, loaded=target, drafter=drafter)
    params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)]
    prompts = [[(7 * i + 3) % 61 for i in range(20)], [5, 9, 11, 2, 40, 33], [8, 1, 30]]
    return run_to_end(core, prompts, params).tokens, core


def test_engine_serves_uniform_steps_through_the_static_buffers() -> None:
    """Three requests (bucket 4: one pad row) under fixed:3 decode and verify uniform blocks of 1 + K tokens
    through ``StepGraph`` (``cuda_graphs="on"``: eager replay on the CPU): the same tokens as every step eager,
    the pads' scratch block outside the scheduler's blocks."""
    eager, eager_core = _engine_tokens("off", "fixed:3")
    served, core = _engine_tokens("on", "fixed:3")
    graphs = core.runner.graphs
    assert eager_core.runner.graphs is None and graphs is not None
    assert served == eager and all(len(t) == 6 for t in served)
    assert graphs.scratch_block == core.num_blocks == core.runner.kv_caches[0][0].shape[1] - 1
    used = {key: step.replays for key, step in graphs.steps.items() if step.replays}
    assert used.get(GraphKey(1, 4), 0) >= 1 and any(key.q_len > 1 for key in used), used  # decode and verify


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
