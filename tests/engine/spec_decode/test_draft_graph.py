"""The DSpark drafter's block forward through the step graphs' static buffers (engine/spec_decode/draft_graph.py),
eager on the CPU through the Triton kernels in the interpreter: buffers reused across steps, contents as
freshly built, drafts equal to the eager drafter's, a padded bucket drafts as the unpadded one; the engine
serves its drafter through them with the eager engine's tokens."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch  # noqa: E402

from sparkserve.engine.attention import build_attention_metadata  # noqa: E402
from sparkserve.engine.config import EngineArgs  # noqa: E402
from sparkserve.engine.core import EngineCore  # noqa: E402
from sparkserve.engine.sampling.metadata import SamplingMetadata  # noqa: E402
from sparkserve.engine.spec_decode.draft_graph import (  # noqa: E402
    block_attention_metadata,
    draft_step_graph,
    table_tensor,
)
from sparkserve.engine.spec_decode.speculator import Speculator  # noqa: E402
from sparkserve.engine.step_graph import GraphKey  # noqa: E402
from sparkserve.kernels.attention_metadata import build_ragged_metadata  # noqa: E402
from sparkserve.scheduler.sampling_params import SamplingParams  # noqa: E402
from sparkserve.testing.tiny import random_dspark, tiny_target  # noqa: E402

BLOCK, NUM_BLOCKS, MAX_SEQS = 4, 24, 4
TABLES = [(0, 1, 2), (3, 4), (5, 6, 7, 8)]  # the requests' own blocks


def _speculator() -> tuple[Speculator, torch.nn.Module]:
    """A DSpark drafter (gamma 5: a block spans two KV blocks) with 40 context rows per request stored."""
    target = tiny_target(seed=4, layers=3, head_dim=16)
    drafter = random_dspark(target, block_size=5, seed=2)
    spec = Speculator(drafter, NUM_BLOCKS, BLOCK, torch.float32, MAX_SEQS)
    gen = torch.Generator().manual_seed(3)
    width = len(drafter.target_layer_ids) * target.config.hidden_size
    for table in TABLES:
        positions = torch.arange(len(table) * BLOCK)
        slots = torch.tensor(table)[positions // BLOCK] * BLOCK + positions % BLOCK
        spec.add_context(torch.randn(len(positions), width, generator=gen), positions, slots)
    return spec, drafter


def _propose(spec: Speculator, anchors: list[int], starts: list[int], graphs=None, tables=None):  # noqa: ANN001, ANN202
    n = len(anchors)
    sampling = SamplingMetadata.build([SamplingParams(temperature=0.0)] * n, list(range(n)), [[]] * n, 61)
    with torch.inference_mode():
        return spec.propose(torch.tensor(anchors), torch.tensor(starts), starts, TABLES[:n], sampling, (False,) * n,
                            graphs=graphs, table_tensor=tables)


def test_eager_block_metadata_from_device_tables_equals_the_host_built_one() -> None:
    """Without a graph the drafter builds its torch-path metadata from the staged tables on the device
    (no host copy): the same tensors as ``build_attention_metadata``, the same drafts."""
    spec, _ = _speculator()
    starts = [6, 3, 9]
    tables = spec.draft_tables(starts, TABLES)
    built = block_attention_metadata(torch.tensor(starts), table_tensor(tables), 5, BLOCK, max(starts) + 5)
    host = build_attention_metadata([5] * 3, torch.tensor(starts), torch.tensor(starts) + 5, tables, BLOCK,
                                    causal=[False] * 3, max_kv_len=max(starts) + 5)
    for name in ("slot_mapping", "short_q_index", "short_q_valid", "short_block_tables", "short_mask", "short_dst"):
        assert torch.equal(getattr(built, name), getattr(host, name)), name
    assert built.short_src is None and host.short_src is None and not host.prefills
    anchors = [7, 11, 2]
    staged, eager = _propose(spec, anchors, starts, tables=table_tensor(tables)), _propose(spec, anchors, starts)
    assert torch.equal(staged.token_ids, eager.token_ids)
    torch.testing.assert_close(staged.confidences, eager.confidences, atol=1e-6, rtol=1e-6)


def test_drafter_steps_reuse_static_buffers_and_draft_as_the_eager_drafter() -> None:
    spec, drafter = _speculator()
    graphs = draft_step_graph(spec, buckets=(1, 2, 4), max_table_blocks=4, num_splits=2)
    assert graphs is not None and not graphs.causal and graphs.q_lens == {5}
    step = graphs.step(GraphKey(5, 4))
    buffers = (step.input_ids, step.positions, step.meta.kv_lens, step.meta.start_pos, step.meta.block_tables,
               step.meta.slot_mapping)
    pointers = [t.data_ptr() for t in buffers]
    heads = graphs.kernel_heads
    for anchors, starts in (([7, 11, 2], [6, 3, 9]), ([4, 9, 30], [7, 4, 10])):  # two consecutive steps
        eager = _propose(spec, anchors, starts)
        served = _propose(spec, anchors, starts, graphs)
        assert step.replays == (1 if starts[0] == 6 else 2)
        assert torch.equal(served.token_ids, eager.token_ids), (served.token_ids, eager.token_ids)
        torch.testing.assert_close(served.confidences, eager.confidences, atol=1e-5, rtol=1e-5)
        tables = spec.draft_tables(starts, TABLES)
        fresh = build_ragged_metadata([5] * 3, starts, [s + 5 for s in starts], tables, BLOCK, *heads,
                                      causal=[False] * 3)
        assert torch.equal(step.meta.slot_mapping[:15], fresh.slot_mapping)
        assert torch.equal(step.meta.kv_lens[:3], fresh.kv_lens) and torch.equal(step.meta.start_pos[:3], fresh.start_pos)
        assert all(step.meta.block_tables[r, :len(t)].tolist() == t for r, t in enumerate(tables))  # past: unread
        assert torch.equal(step.positions[:15], (torch.tensor(starts)[:, None] + torch.arange(5)).flatten())
        assert step.input_ids[:15:5].tolist() == anchors and set(step.input_ids[1:5].tolist()) == {60}  # mask token
        pad_slots = step.meta.slot_mapping[15:]  # the pad row writes only the last request row's scratch blocks
        scratch = range(graphs.scratch_block * BLOCK, (graphs.scratch_block + spec.scratch_per_row) * BLOCK)
        assert all(int(s) in scratch for s in pad_slots) and graphs.scratch_block == NUM_BLOCKS + 3 * spec.scratch_per_row
        assert [t.data_ptr() for t in buffers] == pointers


def test_a_padded_bucket_drafts_as_the_unpadded_step() -> None:
    spec, _ = _speculator()
    padded = draft_step_graph(spec, buckets=(1, 2, 4), max_table_blocks=4, num_splits=1)
    exact = draft_step_graph(spec, buckets=(1, 2, 3, 4), max_table_blocks=4, num_splits=1)
    anchors, starts = [5, 17, 44], [8, 5, 12]
    a = _propose(spec, anchors, starts, padded)
    b = _propose(spec, anchors, starts, exact)
    assert padded.steps[GraphKey(5, 4)].replays == 1 and exact.steps[GraphKey(5, 3)].replays == 1
    assert torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.confidences, b.confidences, atol=1e-6, rtol=1e-6)


def _engine(graphs: str, dspark_target) -> EngineCore:  # noqa: ANN001
    args = EngineArgs(dtype="float32", num_kv_blocks=48, block_size=8, max_num_seqs=4, max_num_batched_tokens=32,
                      verify_policy="fixed:3", attention_backend="triton", cuda_graphs=graphs, spec_guard=False)
    target, drafter = dspark_target
    return EngineCore(args, loaded=target, drafter=drafter)


def test_engine_serves_the_drafter_through_its_graphs_with_the_eager_tokens() -> None:
    """Greedy and seeded requests, decode and verify steps: the drafter's forward replays its graphs (its
    block tables staged with the step's inputs) and every token equals the eager engine's."""
    target = tiny_target(seed=5, layers=3, head_dim=16)
    pair = (target, random_dspark(target, block_size=4, seed=3))
    prompts = [[3, 9, 14, 2, 7], [5, 6, 7, 8, 9, 10, 11, 12, 13, 21, 22], [40, 41]]
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=11, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)]
    runs = []
    for graphs in ("on", "off"):
        core, steps = _engine(graphs, pair), []
        runs.append((core.generate_batch(prompts, params, steps=steps), [_accepted(s) for s in steps], core.runner))
    (tokens, accepted, served), (eager_tokens, eager_accepted, eager) = runs
    assert served.draft_graphs.replays >= 3 and served.graphs.replays >= 1 and eager.draft_graphs is None
    assert tokens == eager_tokens
    assert accepted == eager_accepted and sum(accepted) > 0  # the same drafts were verified


def _accepted(step) -> int:  # noqa: ANN001
    spec = step.scheduler.spec_decoding
    return spec.num_accepted_tokens if spec is not None else 0


def test_warm_up_compiles_the_drafters_kernel_shape_too() -> None:
    """A drafter whose heads differ from the target's (G = 4 vs 2) gets its attention variants compiled
    before ready (a recording compiler on the CPU), once each."""
    import dataclasses

    from sparkserve.engine.spec_decode.dspark import DSparkDrafter
    from sparkserve.kernels import compile_check

    target = tiny_target(seed=5, layers=3, head_dim=16)
    config = dataclasses.replace(random_dspark(target, block_size=4).config, num_key_value_heads=1)
    drafter = DSparkDrafter(config, target.model.embed_tokens.weight, target.model.lm_head_weight)
    args = EngineArgs(dtype="float32", num_kv_blocks=16, block_size=8, max_num_seqs=2, verify_policy="fixed:3",
                      attention_backend="triton", cuda_graphs="on", warm_up_kernels=False)
    runner = EngineCore(args, loaded=target, drafter=drafter).runner
    assert runner.draft_graphs is not None and runner.draft_graphs.kernel_heads == (1, 4)
    names = runner.warm_up_kernels(compile_fn=lambda v, arch: compile_check.Resources(0.0, 1000, 4, 2))
    expected = {v.name for g in (2, 4) for v in compile_check.served_variants(g, 16, torch.float32)}
    assert set(names) == expected and len(names) == len(expected)
    assert "attention torch.float32 G=4 M=16 hd=16 split=True" in names
