"""The CPU plan (engine/cpu_plan.py, engine/cpu_plan_measure.py): the machine's signature, the pure
selection from injected timings (exhaustive over buckets, dtype choice, memory budget, batch-invariant
restriction), the cache that never reuses another machine's plan or profile, and exactness under any plan:
greedy text under every row cap a plan can give equals the reference loop (fp32 rule) or parts at a
near-tie (bf16 rule, DESIGN.md section 7)."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from sparkserve.engine.cpu_plan import (
    CpuPlan,
    MemoryBudget,
    candidate_paths,
    cpu_signature,
    parse_cpuinfo,
    row_buckets,
    select_lm_head,
    select_plan,
)

X86 = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 amx_tile amx_bf16 sha_ni
"""
ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes sve sve2 bf16
CPU part\t: 0xd40
"""

# issue 22's AVX2 table (Zen 3, [1536 x 576]), in ms: rows -> (dense fp32, dense bf16, int4 GEMV bf16)
AVX2 = {1: (0.137, 0.120, 0.078), 8: (0.322, 0.851, 0.282), 16: (0.400, 1.718, 0.610), 64: (1.203, 6.549, 1.692)}
# the same with native bf16: the bf16 GEMM at 0.75x fp32
NATIVE = {m: (fp32, 0.75 * fp32, int4) for m, (fp32, _, int4) in AVX2.items()}


def _table(rows: dict[int, tuple[float, float, float]]) -> dict[tuple[str, str, int], float]:
    timings = {}
    for m, (fp32, bf16, int4) in rows.items():
        timings |= {("float32", "dense", m): fp32, ("bfloat16", "dense", m): bf16, ("bfloat16", "int4_gemv", m): int4}
    return timings


def test_parse_cpuinfo_x86_arm_and_fallback(tmp_path) -> None:
    assert parse_cpuinfo(X86) == ("AMD EPYC 7B13", ("amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512f"))
    assert parse_cpuinfo(ARM) == ("", ("asimd", "bf16", "sve", "sve2"))
    assert parse_cpuinfo("") == ("", ())
    (tmp_path / "cpuinfo").write_text(X86)
    sig = cpu_signature(str(tmp_path / "cpuinfo"))
    assert sig.model == "AMD EPYC 7B13" and "avx512_bf16" in sig.key() and sig.capability in sig.key()
    missing = cpu_signature(str(tmp_path / "absent"))  # macOS / Windows: no /proc/cpuinfo
    assert missing.flags == () and missing.model and missing.key() != sig.key()


def test_row_buckets_and_candidates() -> None:
    assert row_buckets(1) == (1,) and row_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert row_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    with pytest.raises(ValueError):
        row_buckets(0)
    assert candidate_paths("auto", "bfloat16", gguf=True)[:2] == ("dense", "int4_gemv")
    assert candidate_paths("auto", "float32", gguf=True) == ("dense",)  # the loader serves fp32 GGUF dense
    assert candidate_paths("auto", "bfloat16", gguf=False) == ("dense",)
    assert candidate_paths("int8", "float32", gguf=True) == ("dense", "int8_gemv")
    assert "int8_gemv" not in candidate_paths("int4", "float32", gguf=False)


def test_select_plan_exhaustive_over_buckets() -> None:
    """Every assignment of a winner to each of 4 buckets (3 paths: 81 cases) is recovered, the row cap
    is the quantised prefix, and ties go to the earlier path."""
    buckets, paths = (1, 4, 16, 64), ("dense", "int4_gemv", "int8_gemv")
    quantized = frozenset({"int4_gemv", "int8_gemv"})
    for winners in itertools.product(range(3), repeat=len(buckets)):
        timings = {("float32", p, m): (1.0 if i == w else 2.0 + i) * m
                   for m, w in zip(buckets, winners, strict=True) for i, p in enumerate(paths)}
        plan = select_plan(timings, buckets, ("float32",), paths, quantized=quantized)
        assert plan.paths == tuple(paths[w] for w in winners)
        prefix = list(itertools.takewhile(lambda w: w > 0, winners))
        assert plan.quant_max_rows == (buckets[len(prefix) - 1] if prefix else 0)
        assert [plan.path_for(m) for m in (1, 3, 64, 5000)] == [plan.paths[0], plan.paths[1], plan.paths[3],
                                                                plan.paths[3]]
    tie = {("float32", p, m): 1.0 for p in paths for m in buckets}
    assert select_plan(tie, buckets, ("float32",), paths).paths == ("dense",) * 4


def test_select_plan_dtype_by_measurement() -> None:
    """AVX2 (issue 22's table): bf16 emulated, fp32 dense wins the geometric mean; with native bf16
    (bf16 dense 2x faster than fp32) bf16 wins with int4 at small M."""
    plan = select_plan(_table(AVX2), tuple(AVX2), ("bfloat16", "float32"), ("dense", "int4_gemv"))
    assert plan.dtype == "float32" and plan.paths == ("dense",) * 4 and plan.quant_max_rows == 0
    native = NATIVE
    plan = select_plan(_table(native), tuple(AVX2), ("float32", "bfloat16"), ("dense", "int4_gemv"))
    assert plan.dtype == "bfloat16" and plan.paths == ("int4_gemv", "dense", "dense", "dense")
    assert plan.quant_max_rows == 1 and plan.summary() == "bfloat16:int4_gemv<=1,dense"
    # a path not timed at a bucket (pruned) is no candidate there; a bucket nobody covers rules the dtype out
    pruned = {k: v for k, v in _table(native).items() if not (k[1] == "int4_gemv" and k[2] == 64)}
    assert select_plan(pruned, tuple(AVX2), ("bfloat16",), ("dense", "int4_gemv")).paths[-1] == "dense"
    with pytest.raises(ValueError, match="timed on every bucket"):
        select_plan({("bfloat16", "dense", 1): 1.0}, (1, 2), ("bfloat16",), ("dense",))


def test_select_plan_memory_budget() -> None:
    """A model that does not fit twice keeps one weight format; a dtype whose dense weights do not fit
    is out; nothing fitting raises."""
    native = _table(NATIVE)
    native |= {("float32", "int4_gemv", m): t * 30 for (d, p, m), t in native.items() if p == "int4_gemv"}
    paths, dtypes, buckets = ("dense", "int4_gemv"), ("float32", "bfloat16"), tuple(AVX2)
    dense = {"float32": 400, "bfloat16": 200}
    roomy = select_plan(native, buckets, dtypes, paths, memory=MemoryBudget(1000, dense, 100))
    assert roomy.dtype == "bfloat16" and "int4_gemv" in roomy.paths
    one_format = select_plan(native, buckets, dtypes, paths, memory=MemoryBudget(250, dense, 100))
    assert one_format.dtype == "bfloat16" and set(one_format.paths) == {"dense"}
    no_fp32 = select_plan(_table(AVX2), buckets, dtypes, ("dense",), memory=MemoryBudget(300, dense, 100))
    assert no_fp32.dtype == "bfloat16"  # fp32 would win (AVX2) but does not fit
    with pytest.raises(ValueError, match="memory budget"):
        select_plan(native, buckets, dtypes, paths, memory=MemoryBudget(100, dense, 100))


def test_select_plan_batch_invariant() -> None:
    """``--batch-invariant`` (issue 24): one invariant path for every bucket, even where others are faster."""
    timings = {("float32", "dense", m): 1.0 for m in (1, 2)} | {("float32", "ws", 1): 0.5, ("float32", "ws", 2): 3.0}
    free = select_plan(timings, (1, 2), ("float32",), ("dense", "ws"), quantized=frozenset({"ws"}))
    assert free.paths == ("ws", "dense")
    plan = select_plan(timings, (1, 2), ("float32",), ("dense", "ws"), quantized=frozenset({"ws"}),
                       batch_invariant=True, invariant_paths=frozenset({"ws"}))
    assert plan.paths == ("ws", "ws") and plan.batch_invariant and plan.summary().endswith("|invariant")
    with pytest.raises(ValueError):
        select_plan(timings, (1, 2), ("float32",), ("dense",), batch_invariant=True, invariant_paths=frozenset())


def test_plan_round_trip_and_table() -> None:
    plan = select_plan(_table(AVX2), tuple(AVX2), ("bfloat16", "float32"), ("dense", "int4_gemv"))
    assert CpuPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    table = plan.table().splitlines()
    assert len(table) == 1 + len(AVX2) and "int4_gemv bf16 ms" in table[0] and table[1].startswith("1 |")
    assert "78.000" in table[1] and table[1].endswith("float32 dense")


# --------------------------------------------------------------------------- the LM head's own entry
def test_select_lm_head_per_bucket_and_routing() -> None:
    """Each LM-head bucket takes its fastest timed path (ties: the earlier path); the entry becomes its own
    routing (trailing dense dropped), distinct from the decoder linears', survives the cache round trip and
    shows in the summary; without an entry the LM head follows the decoder routing (None)."""
    buckets, paths = (1, 2, 4, 8, 16), ("dense", "int4_ws")
    for winners in itertools.product(range(2), repeat=len(buckets)):
        timings = {("bfloat16", p, m): (1.0 if i == w else 2.0) * m
                   for m, w in zip(buckets, winners, strict=True) for i, p in enumerate(paths)}
        entry = select_lm_head(timings, buckets, "bfloat16", paths)
        assert entry == tuple((m, paths[w]) for m, w in zip(buckets, winners, strict=True))
    probed = {("bfloat16", "int4_ws", m): 1.0 * m for m in buckets} | {("bfloat16", "dense", m): 9.0 for m in buckets}
    probed[("bfloat16", "dense", 16)] = 16 / 1.3  # the probe: dense 1.3x faster at 9-16 rows
    entry = select_lm_head(probed, buckets, "bfloat16", paths)
    assert entry == ((1, "int4_ws"), (2, "int4_ws"), (4, "int4_ws"), (8, "int4_ws"), (16, "dense"))
    assert select_lm_head({("bfloat16", "dense", 1): 1.0, ("bfloat16", "dense", 2): 1.0}, (1, 2), "bfloat16",
                          paths) == ((1, "dense"), (2, "dense"))
    with pytest.raises(ValueError, match="LM head"):
        select_lm_head({("bfloat16", "dense", 1): 1.0}, (1, 2), "bfloat16", paths)
    decoder = select_plan(_table(NATIVE), tuple(AVX2), ("bfloat16",), ("dense", "int4_gemv"))
    assert decoder.lm_head_routing() is None
    plan = dataclasses.replace(decoder, lm_head=entry, lm_head_timings=probed)
    assert plan.lm_head_routing().limits == ((8, "int4_ws"),) and plan.lm_head_routing().path_for(9) == "dense"
    assert plan.routing() == decoder.routing() and plan.summary() == "bfloat16:int4_gemv<=1,dense|head:int4_ws<=8"
    assert CpuPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    all_dense = dataclasses.replace(decoder, lm_head=((1, "dense"),))
    assert all_dense.lm_head_routing().limits == () and all_dense.summary().endswith("|head:dense")


def test_lm_head_measured_with_its_shape_and_planes(tmp_path, monkeypatch) -> None:
    """A quantised LM head (lm_head_planes > 0) is timed at its own [vocab, hidden] shape with the paths as a
    weight of that many planes is served (two planes: torch's int4 GEMV runs as the weight-stationary
    kernel where it is built), at buckets up to LM_HEAD_MAX_ROWS; the entry lands in the cached plan. A dense
    head (0 planes) and the batch-invariant mode get no entry."""
    from sparkserve.engine import cpu_plan_measure
    from sparkserve.kernels import int4_cpu
    from sparkserve.testing.tiny import tiny_target

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def fake_timings(shapes, buckets, candidates, **kw):
        calls.append((tuple(shapes), tuple(buckets), tuple(candidates), kw.get("build")))
        dense = {m: 2.0 if m < 16 else 0.5 for m in buckets}  # int4 faster up to 8 rows, dense above
        return {(d, p, m): (dense[m] if p == "dense" else 1.0) * m for d, p in candidates for m in buckets}

    monkeypatch.setattr(cpu_plan_measure, "measure_timings", fake_timings)
    config = tiny_target(layers=1).config
    args = (config, {"kind": "cpu_plan", "machine": "x"}, ("bfloat16",), "auto", True, 256)
    plan = cpu_plan_measure.load_or_measure_plan(*args, progress=False, lm_head_planes=2)
    (_, _, decoder, _), (shapes, buckets, head, build) = calls
    assert shapes == ((config.vocab_size, config.hidden_size, 1),) and buckets == (1, 2, 4, 8, 16, 32, 64)
    ws = "int4_ws" if int4_cpu.load() else "int4_gemv"
    assert [p for _, p in head] == ["dense", ws] and build is not None
    assert {p for _, p in decoder} >= {"dense", "int4_gemv"}
    assert plan.lm_head == ((1, ws), (2, ws), (4, ws), (8, ws), (16, "dense"), (32, "dense"), (64, "dense"))
    assert cpu_plan_measure.load_or_measure_plan(*args, progress=False, lm_head_planes=2) == plan and len(calls) == 2
    calls.clear()
    other = (config, {"kind": "cpu_plan", "machine": "y"}, *args[2:])
    assert cpu_plan_measure.load_or_measure_plan(*other, progress=False).lm_head == () and len(calls) == 1
    invariant = (config, {"kind": "cpu_plan", "machine": "z"}, *args[2:])
    monkeypatch.setattr(cpu_plan_measure, "candidate_paths", lambda *a, **k: ("int4_ws",))
    plan = cpu_plan_measure.load_or_measure_plan(*invariant, progress=False, batch_invariant=True, lm_head_planes=2)
    assert plan.lm_head == () and len(calls) == 2


def test_lm_head_build_serves_the_canonical_product() -> None:
    """The LM-head timing build computes what the engine serves: a two-plane weight's int4 path and dense
    path give the canonical product (fp32: the same values; bf16 within the dense copy's rounding)."""
    from sparkserve.engine.cpu_plan_measure import lm_head_build
    from sparkserve.engine.quant import quantize_q8_planes

    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(96, 64, generator=gen), torch.randn(3, 64, generator=gen)
    canonical = quantize_q8_planes(weight).canonical(torch.float32)  # [96, 64]
    assert (canonical - weight).abs().max() <= weight.abs().max() / 127  # Q8_0's rounding, no more
    build = lm_head_build(2)
    quantised = build("int4_gemv", weight, torch.float32)(x)
    torch.testing.assert_close(quantised, x @ canonical.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(build("dense", weight, torch.float32)(x), x @ weight.T)


def test_lm_head_planes_of_the_served_file() -> None:
    """The embedded SmolLM2 file's LM head (the tied Q8_0 embedding) is served as two int4 planes under
    ``auto``; other quantisation modes keep it dense (0)."""
    from sparkserve.engine.cpu_plan_measure import lm_head_planes
    from sparkserve.engine.loader import default_model_path

    try:
        default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert lm_head_planes(None, "auto") == 2
    assert lm_head_planes(None, "none") == 0 and lm_head_planes(None, "int4") == 0


def test_lm_head_routing_reaches_the_lm_head() -> None:
    """``load_weights``' ``lm_head_routing`` routes the quantised LM head alone; the decoder linears keep theirs."""
    from sparkserve.engine.quant import Routing, int4_formats
    from sparkserve.testing.int4_blocks import random_block
    from sparkserve.testing.tiny import tiny_target

    model = tiny_target(vocab=64, layers=1).model  # torch's int4 packing wants N divisible by 16
    config = model.config
    decoder, head = Routing.up_to(4, "int4_gemv"), Routing(((8, "int4_ws"), (16, "int4_gemv")))
    staged = {"lm_head": [(0, random_block(config.vocab_size, config.hidden_size, planes=1))],
              "layers.0.o_proj": [(0, random_block(config.hidden_size, config.hidden_size))]}
    model._attach_quant(staged, decoder, head)
    assert model.lm_head_quant.routing == int4_formats(head, 1)
    assert model.layers[0].quant["o_proj"].routing == int4_formats(decoder, 1)
    model._attach_quant(staged, decoder)
    assert model.lm_head_quant.routing == int4_formats(decoder, 1)


# --------------------------------------------------------------------------- caches keyed by the machine
def test_plan_cache_never_reuses_another_machines_plan(tmp_path, monkeypatch) -> None:
    from sparkserve.engine import cpu_plan_measure
    from sparkserve.testing.tiny import tiny_target

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def fake_timings(shapes, buckets, candidates, **kw):
        calls.append(tuple(candidates))
        return {(d, p, m): (2.0 if p == "dense" else 1.0) * m for d, p in candidates for m in buckets}

    monkeypatch.setattr(cpu_plan_measure, "measure_timings", fake_timings)
    config = tiny_target(layers=1).config
    key = {"kind": "cpu_plan", "machine": "AMD EPYC|avx2,avx512_bf16,avx512f|AVX512"}
    args = (config, key, ("bfloat16",), "int4", False, 16)
    plan = cpu_plan_measure.load_or_measure_plan(*args, progress=False)
    assert plan.paths == ("int4_gemv",) * 5 and plan.quant_max_rows == 16 and len(calls) == 1
    assert cpu_plan_measure.load_or_measure_plan(*args, progress=False) == plan and len(calls) == 1  # cached
    other = {**key, "machine": "AMD EPYC|avx2|AVX2"}
    assert cpu_plan_measure.plan_cache_path(other) != cpu_plan_measure.plan_cache_path(key)
    cpu_plan_measure.load_or_measure_plan(config, other, *args[2:], progress=False)
    assert len(calls) == 2
    # a file at this key's path that holds another machine's plan is measured again, not reused
    path = cpu_plan_measure.plan_cache_path(key)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "key": other}))
    cpu_plan_measure.load_or_measure_plan(*args, progress=False)
    assert len(calls) == 3 and json.loads(path.read_text())["key"] == key


def test_profile_key_names_the_machine_and_plan(tmp_path, monkeypatch) -> None:
    """A throughput profile with another machine's key is not reused: other cache path, and a file whose
    stored key differs is measured again."""
    from sparkserve.engine import throughput_probe as profiler
    from sparkserve.scheduler.profile import ThroughputProfile, profile_cache_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = profiler.profile_key("m", "bfloat16", "none", 64, 4, 2)
    assert here["machine"] == cpu_signature().key() and here["plan"] == ""
    other = profiler.profile_key("m", "bfloat16", "none", 64, 4, 2, machine="Zen 3|avx2|AVX2")
    planned = profiler.profile_key("m", "bfloat16", "none", 64, 4, 2, plan="float32:dense")
    assert len({profile_cache_path(k) for k in (here, other, planned)}) == 3
    measured = []

    def fake_measure(step_fn, batch_grid, request_grid, **kw):
        measured.append(kw["key"])
        return ThroughputProfile.from_measurements((1, 2), (1,), ((0.01,), (0.02,)), kw["key"])

    monkeypatch.setattr(profiler, "measure_profile", fake_measure)
    monkeypatch.setattr(profiler, "make_step_fn", lambda runner, num_blocks: None)
    runner = type("Runner", (), {"speculator": None, "graphs": None})()
    first = profiler.load_or_measure_profile(runner, 8, here, 64, 4, progress=False)
    assert profiler.load_or_measure_profile(runner, 8, here, 64, 4, progress=False) == first
    assert len(measured) == 1
    profile_cache_path(here).write_text(ThroughputProfile.from_dict({**first.to_dict(), "key": other}).to_json())
    profiler.load_or_measure_profile(runner, 8, here, 64, 4, progress=False)
    assert measured == [here, here]


# --------------------------------------------------------------------------- exactness under any plan
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from sparkserve.testing.hf_models import CASES, make_hf_model, write_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny_hf")
    make_hf_model(*CASES["qwen2-bias"]).save_pretrained(folder)
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread (the engine sets it), restored afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.usefixtures("one_thread")
def test_greedy_text_under_every_plan(dtype, tiny_folder, tmp_path, monkeypatch) -> None:
    """``--quantization int4``: the row caps a plan can give (0 = all dense, 1, 4, 16 = all int4) and the
    plan measured here all give the reference loop's greedy text on the dense canonical weights, or
    part where its top-2 gap is a near-tie (fp32: 1e-2; bf16: 0.5 nats), for 6 prompts batched."""
    from sparkserve.engine.config import EngineArgs
    from sparkserve.engine.core import EngineCore
    from sparkserve.engine.quant import int4_formats
    from sparkserve.kernels import int4_cpu
    from sparkserve.scheduler.sampling_params import SamplingParams
    from sparkserve.testing.exactness import NEAR_TIE_EPS, assert_same_or_near_tie, top2_gap_fn
    from sparkserve.testing.reference import greedy_reference

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    eps = NEAR_TIE_EPS if dtype == "float32" else 0.5
    params = SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=(1,))

    def core(cap: int | None, plan: bool = False) -> EngineCore:
        return EngineCore(EngineArgs(model=str(tiny_folder), dtype=dtype, drafter="none", quantization="int4",
                                     quant_gemv_max_tokens=cap, cpu_plan=plan, block_size=4, num_kv_blocks=128, max_num_seqs=8,
                                     num_threads=1,
                                     max_num_batched_tokens=16))

    reference = core(0)
    vocab = reference.loaded.config.vocab_size
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, vocab, (2 + 3 * i,), generator=gen).tolist() for i in range(6)]
    stop = {1, reference.tokenizer.eos_token_id}  # the engine also stops at the model's EOS
    refs = [greedy_reference(reference.loaded.model, p, 10, stop).token_ids for p in prompts]
    gaps = [top2_gap_fn(reference.loaded.model, p, r) for p, r in zip(prompts, refs, strict=True)]
    planned = core(None, plan=True)
    assert planned.plan is not None and planned.plan.dtype == dtype
    assert planned.profile_key()["plan"] == planned.plan.summary()
    routings = {q.routing for layer in planned.loaded.model.layers for q in layer.quant.values()}
    assert planned.routing == planned.plan.routing() and routings == {int4_formats(planned.routing, 1)}
    # the plan's key names the int4 kernel's build, so a new kernel is measured again
    stored = [json.loads(p.read_text())["key"] for p in (tmp_path / "sparkserve" / "plans").glob("*.json")]
    assert [k["int4_kernel"] for k in stored] == [int4_cpu.build_dir().name if int4_cpu.load() else "none"]
    for label, engine in (("cap1", core(1)), ("cap4", core(4)), ("cap16", core(16)), ("planned", planned)):
        assert all(layer.quant for layer in engine.loaded.model.layers)
        for i, out in enumerate(engine.generate_batch(prompts, params)):
            assert_same_or_near_tie(out, refs[i], gaps[i], eps=eps, label=f"{dtype} {label}[{i}]")


def test_first_start_measures_the_cut_grid_and_the_profile_command_the_full_one(tmp_path, monkeypatch) -> None:
    """``load_or_measure_profile`` (a first start) asks for the cut grid and cut cells; ``cut=False``
    (``sparkserve profile``) for every cell of the full grid."""
    from sparkserve.engine import throughput_probe as profiler
    from sparkserve.scheduler.profile import ThroughputProfile, default_grid

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    asked = []

    def fake_measure(step_fn, batch_grid, request_grid, **kw):
        asked.append((batch_grid, request_grid, kw["cut"]))
        return ThroughputProfile.from_measurements((1, 2), (1,), ((0.01,), (0.02,)), kw["key"])

    monkeypatch.setattr(profiler, "measure_profile", fake_measure)
    monkeypatch.setattr(profiler, "make_step_fn", lambda runner, num_blocks: None)
    runner = type("Runner", (), {"speculator": None, "graphs": None})()
    profiler.load_or_measure_profile(runner, 8, profiler.profile_key("m", "bf16", "none", 1024, 64, 2), 1024, 64,
                                     progress=False)
    profiler.load_or_measure_profile(runner, 8, profiler.profile_key("m", "fp32", "none", 1024, 64, 2), 1024, 64,
                                     progress=False, cut=False)
    assert asked == [(*default_grid(1024, 64, cut=True), True), (*default_grid(1024, 64), False)]
    assert asked[0][0][-1] == 512 and asked[1][0][-1] == 1024
