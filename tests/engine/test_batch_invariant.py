"""Batch-invariant mode (issue 24) on the real SmolLM2: the same request gives the same tokens cold and
warm, alone and batched, in one prefill chunk and in chunks of 16, streamed and not, with speculation on
(DSpark, hybrid) and off; bf16 (the default server's GGUF int4 + bf16) and fp32, each against itself, in the
default configuration (the mode is on by default on the CPU).
The mode off runs the same checks and prints how many differ. A deliberately row-count-dependent linear
is caught."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparkserve.engine import batch_invariant, quant
from sparkserve.engine.attention import build_attention_metadata, new_kv_cache, paged_attention
from sparkserve.engine.core import EngineCore
from sparkserve.engine.loader import LoadedModel, default_model_path, load_model
from sparkserve.engine.quant import Routing, quant_linear, quantize_int4
from sparkserve.kernels import int4_cpu
from sparkserve.testing.batch_invariance import base_args, check_invariance, summary


@pytest.fixture(scope="module")
def smollm2_bf16(smollm2) -> LoadedModel:
    """The default server's model: the Q4_1 GGUF in bf16 with its int4 blocks kept (``auto``)."""
    return load_model(default_model_path(), dtype=torch.bfloat16, quantization="auto")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_default_configuration_every_setting_gives_the_same_tokens(smollm2, smollm2_bf16, dtype) -> None:
    """The issue's checks (a)-(e) with the mode left at its default, which is on on the CPU."""
    loaded = smollm2_bf16 if dtype == "bfloat16" else smollm2
    assert EngineCore(base_args(dtype, None), loaded=loaded).runner.batch_invariant
    results = check_invariance(loaded, dtype, batch_invariant=None)
    print(f"default configuration (batch-invariant mode on), {dtype}: {summary(results)}")
    assert len(results) == 12
    assert all(r.equal for r in results), summary(results)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_mode_off_reports_how_many_differ(smollm2, smollm2_bf16, dtype) -> None:
    """Not a pass / fail of invariance: the count goes to the report (``pytest -s`` prints it)."""
    loaded = smollm2_bf16 if dtype == "bfloat16" else smollm2
    results = check_invariance(loaded, dtype, batch_invariant=False)
    print(f"batch-invariant mode off, {dtype}: {summary(results)}")
    assert len(results) == 12 and all(len(r.tokens) > 0 for r in results)


def test_a_row_count_dependent_linear_is_caught(smollm2, monkeypatch) -> None:
    """A linear that splits K in two for more than one row (the order a split-K GEMM picks by M)
    breaks invariance; the checker must see it."""
    def split_k_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] == 1:
            return F.linear(x, weight, bias)
        half = x.shape[1] // 2
        return F.linear(x[:, :half], weight[:, :half]) + F.linear(x[:, half:], weight[:, half:], bias)

    monkeypatch.setattr(batch_invariant, "invariant_linear", split_k_linear)
    results = check_invariance(smollm2, "float32", batch_invariant=True, settings=("batch",))
    assert not all(r.equal for r in results), summary(results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_row_bits_do_not_depend_on_the_batch(dtype) -> None:
    """One query row at position 300 (two KV chunks) attends alike alone, beside other sequences, and
    inside a long prefill chunk after cached context."""
    torch.manual_seed(0)
    heads, kv_heads, hd, bs = 6, 2, 16, 16
    k_cache, v_cache = new_kv_cache(64, bs, kv_heads, hd, dtype)
    k_cache.normal_(), v_cache.normal_()
    tables = torch.arange(64).view(2, 32)  # sequence 0: blocks 0-31, sequence 1: 32-63
    q_all = torch.randn(40, heads, hd).to(dtype)

    def attend(q_lens, starts, rows) -> torch.Tensor:
        meta = build_attention_metadata(q_lens, starts, [s + n for s, n in zip(starts, q_lens, strict=True)],
                                        tables[:len(q_lens)], bs)
        q = q_all[:sum(q_lens)]
        k_new = k_cache.view(kv_heads, -1, hd).index_select(1, meta.slot_mapping).transpose(0, 1)
        v_new = v_cache.view(kv_heads, -1, hd).index_select(1, meta.slot_mapping).transpose(0, 1)
        with batch_invariant.batch_invariant_mode():
            return paged_attention(q, k_new, v_new, k_cache, v_cache, meta, hd**-0.5)[rows]

    alone = attend([1], [300], 0)  # decode of sequence 0 at position 300
    beside = attend([1, 5], [300, 20], 0)  # with a verify block of another sequence
    q_all[29] = q_all[0]  # the same query as the last row of a 30-row prefill chunk from position 271
    in_prefill = attend([30], [271], 29)
    assert torch.equal(alone, beside) and torch.equal(alone, in_prefill)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariant_linear_rows_do_not_depend_on_the_row_count(dtype) -> None:
    """Each row of 1..40 rows has the bits of the same row in a 40-row call (model shapes: the fused
    q/k/v projection and down_proj of SmolLM2); plain F.linear in fp32 does not (MKL orders K otherwise
    for a few rows), which is why the mode pads to a row tile."""
    torch.manual_seed(0)
    for n, k in ((960, 576), (576, 1536)):
        weight, bias = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
        x = torch.randn(40, k).to(dtype)
        full = batch_invariant.invariant_linear(x, weight, bias)
        for rows in range(1, 41):
            assert torch.equal(batch_invariant.invariant_linear(x[:rows], weight, bias), full[:rows]), (n, k, rows)


def test_mode_switch_config_cli_and_plan() -> None:
    from sparkserve.cli import build_parser, engine_args_from
    from sparkserve.engine.config import EngineArgs
    from sparkserve.engine.cpu_plan import PATHS, candidate_paths, select_plan

    assert not batch_invariant.is_enabled()
    with batch_invariant.batch_invariant_mode():
        assert batch_invariant.is_enabled()
    assert not batch_invariant.is_enabled()
    parser = build_parser(include_train=False)
    assert engine_args_from(parser.parse_args(["serve", "--batch-invariant"])).batch_invariant
    assert engine_args_from(parser.parse_args(["serve", "--no-batch-invariant"])).batch_invariant is False
    default = engine_args_from(parser.parse_args(["serve"]))
    assert default.batch_invariant is None and default.batch_invariant_on("cpu") and not default.batch_invariant_on("cuda")
    assert not EngineArgs(batch_invariant=False).batch_invariant_on("cpu") and EngineArgs(batch_invariant=True).batch_invariant_on("cuda")
    assert not EngineArgs(compile=True).batch_invariant_on("cpu") and not EngineArgs(cuda_graphs="on").batch_invariant_on("cpu")
    with pytest.raises(ValueError, match="compile"):
        EngineArgs(batch_invariant=True, compile=True)
    assert candidate_paths("none", "float32", gguf=False, batch_invariant=True) == ("dense_fixed",)
    int4_paths = candidate_paths("auto", "bfloat16", gguf=True, batch_invariant=True)
    expected = (("int4_gemv", "int4_ws") if quant.int4_kernels_agree(torch.bfloat16)
                else ("int4_ws",) if int4_cpu.load() else ("dense_fixed",))
    assert int4_paths == expected
    assert PATHS["dense_fixed"].batch_invariant and not PATHS["dense"].batch_invariant
    timings = {("bfloat16", "dense_fixed", m): 1.0 for m in (1, 8)}
    plan = select_plan(timings, (1, 8), ("bfloat16",), ("dense_fixed",), batch_invariant=True)
    assert plan.paths == ("dense_fixed", "dense_fixed") and plan.quant_max_rows == 0
    timings = {("bfloat16", "int4_gemv", 1): 1.0, ("bfloat16", "int4_gemv", 8): 5.0,
               ("bfloat16", "int4_ws", 1): 2.0, ("bfloat16", "int4_ws", 8): 2.0}
    pair = ("int4_gemv", "int4_ws")
    one = select_plan(timings, (1, 8), ("bfloat16",), pair, batch_invariant=True, invariant_paths=frozenset(pair))
    assert one.paths == ("int4_ws", "int4_ws")  # kernels not known to agree: one path for every bucket
    mixed = select_plan(timings, (1, 8), ("bfloat16",), pair, batch_invariant=True, invariant_paths=frozenset(pair),
                        same_bits=frozenset(pair))
    assert mixed.paths == ("int4_gemv", "int4_ws")  # the same bits: each bucket its fastest
    layer = PATHS["dense_fixed"].build(torch.randn(8, 32), torch.float32)
    assert layer(torch.randn(3, 32)).shape == (3, 8)


needs_int4_kernel = pytest.mark.skipif(not int4_cpu.load(), reason="weight-stationary int4 kernel not built")


@needs_int4_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_linear_rows_do_not_depend_on_the_row_count(dtype) -> None:
    """In the mode an int4 weight serves every row count, prefill sizes included, with int4 kernels of
    one canonical product: each row of 1..20, 64 and 130 rows has the bits of the same row in a 130-row
    call, and the canonical product's bits (int4_mm_reference). Off, the routing's dense GEMM above 4 rows
    does not give those bits (the reason the mode keeps the int4 kernels)."""
    torch.manual_seed(0)
    block = quantize_int4(torch.randn(96, 576), dtype)
    weight = block.canonical(dtype).to(dtype)  # [N, K] the dense copy
    quant = block.pack(dtype, Routing.up_to(4))  # torch's int4 kernel up to 4 rows, dense above
    x = torch.randn(130, 576).to(dtype)
    with batch_invariant.batch_invariant_mode():
        full = quant_linear(x, weight, None, quant)  # [130, N]
        for rows in (*range(1, 21), 64):
            assert torch.equal(quant_linear(x[:rows], weight, None, quant), full[:rows]), rows
    assert torch.equal(full[:3], int4_cpu.int4_mm_reference(x[:3], block.canonical(dtype)))
    assert not torch.equal(quant_linear(x, weight, None, quant)[:3], full[:3])


@needs_int4_kernel
def test_int4_invariant_path_keeps_only_agreeing_kernels(monkeypatch) -> None:
    """The mode's path per row count: the routing's int4 kernel where both agree, else the weight-stationary
    kernel; torch's kernel alone (no agreement) falls back to the dense fixed tile (None)."""
    block = quantize_int4(torch.randn(64, 64), torch.bfloat16)
    both = block.pack_as(torch.bfloat16, Routing(((4, "int4_gemv"), (16, "int4_ws"))))
    gemv_only = block.pack_as(torch.bfloat16, Routing.up_to(4, "int4_gemv"))
    monkeypatch.setattr(quant, "int4_kernels_agree", lambda dtype: True)
    assert [both.invariant_path(m) for m in (1, 4, 5, 16, 17, 500)] == ["int4_gemv"] * 2 + ["int4_ws"] * 4
    assert [gemv_only.invariant_path(m) for m in (1, 5, 500)] == ["int4_gemv"] * 3
    monkeypatch.setattr(quant, "int4_kernels_agree", lambda dtype: False)
    assert {both.invariant_path(m) for m in (1, 4, 5, 500)} == {"int4_ws"}
    assert gemv_only.invariant_path(1) is None
