"""Weight-only quantisation (engine/quant.py): the kernels compute with the canonical weights, GGUF
blocks map exactly, the quantised model is lossless against the reference loop on the same weights,
the default (quantised) path keeps batch invariance, and ``--compile`` matches eager.

Tolerances: the int4 / int8 kernels accumulate in fp32 in their own order, so against an exact
(float64) product with the canonical weights they agree to fp32 rounding (rtol 1e-5) in float32 and
to one bf16 rounding of the output in bfloat16. Real-model bf16 comparisons use the contract's bf16
near-tie rule (a parting is allowed only where the reference's top-2 logit gap is below 0.5 nats).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.quant import BlockQuant, gguf_block_quant, quant_linear, quantize_int4, quantize_int8
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.exactness import assert_same_or_near_tie, top2_gap_fn
from sparkserve.testing.reference import greedy_reference
from sparkserve.testing.tiny import tiny_target

BF16_NEAR_TIE = 0.5  # nats: the contract's bf16 rule


@pytest.fixture(params=["weight_stationary", "torch"])
def int4_backend(request, monkeypatch) -> str:
    """Both int4 kernels: the weight-stationary one (kernels/int4_cpu.py; skipped where it is not built)
    and torch's (``_weight_int4pack_mm_for_cpu``, the fallback)."""
    from sparkserve.kernels import int4_cpu

    if request.param == "torch":
        monkeypatch.setenv("SPARKSERVE_INT4_KERNEL", "0")
    elif not int4_cpu.load():
        pytest.skip("the int4 CPU kernel is not built (scripts/setup.sh builds it)")
    else:
        monkeypatch.setenv("SPARKSERVE_INT4_KERNEL", "all")
    return request.param


def _random_block(n: int, k: int, planes: int = 1, seed: int = 0) -> BlockQuant:
    gen = torch.Generator().manual_seed(seed)
    return BlockQuant(
        tuple(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8) for _ in range(planes)),
        tuple(torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3 for _ in range(planes)),
        tuple(torch.randn(n, k // 32, generator=gen) * 0.05 for _ in range(planes)),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("planes", [1, 2])
def test_int4_kernel_computes_with_canonical_weights(dtype, planes, int4_backend) -> None:
    block = _random_block(96, 160, planes)
    w = block.canonical(dtype).double()  # [N, K]
    packed = block.pack(dtype, 64)
    assert (packed.kernel is not None) == (int4_backend == "weight_stationary")
    for m in (1, 3, 16):
        x = torch.randn(m, 160, generator=torch.Generator().manual_seed(m)).to(dtype)
        exact = x.double() @ w.t()
        out = packed(x).double()
        if dtype == torch.float32:
            torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
        else:  # one bf16 rounding per plane output (2^-8 of that plane), one for their sum
            parts = [x.double() @ BlockQuant((c,), (s,), (z,)).canonical(dtype).double().t()
                     for c, s, z in zip(block.codes, block.scales, block.zeros, strict=True)]
            bound = 2**-8 * (sum(p.abs() for p in parts) + (exact.abs() if planes > 1 else 0)) + 1e-4
            assert ((out - exact).abs() <= bound).all()


def test_bf16_kernel_is_not_the_bf16_rounded_weights(int4_backend) -> None:
    """The canonical values are the kernel's fp32 fma, not bf16-rounded weights: the kernel agrees
    with the former clearly better than with the latter (so the reference must use canonical())."""
    block = _random_block(256, 576)
    w = block.canonical(torch.bfloat16).double()
    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = block.pack(torch.bfloat16, 64)(x).double()
    err_canonical = (out - x.double() @ w.t()).abs().mean()
    err_rounded = (out - x.double() @ w.to(torch.bfloat16).double().t()).abs().mean()
    assert err_canonical < 0.8 * err_rounded


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_dequantise_like_gguf(name, int4_backend) -> None:
    qtype = getattr(GGMLQuantizationType, name)
    rng = np.random.default_rng(0)
    dense = (rng.standard_normal((64, 256)) * 0.1 + rng.standard_normal((64, 1)) * 0.05).astype(np.float32)
    raw = quantize(dense, qtype)
    block = gguf_block_quant(raw, name, dense.shape)
    assert block is not None
    expected = torch.from_numpy(np.asarray(dequantize(raw, qtype), dtype=np.float32).reshape(dense.shape))
    canonical = block.canonical(torch.float32)
    if name == "Q4_1":  # d q + m (two roundings) vs (q - 8) d + (m + 8 d) (one fma): an ulp apart at most
        torch.testing.assert_close(canonical, expected, rtol=2**-22, atol=2**-30)
    else:  # d (q - 8) and d q are exact in fp32
        assert torch.equal(canonical, expected)
    # the kernel reproduces the GGUF dot products (fp32)
    x = torch.randn(2, 256)
    torch.testing.assert_close(block.pack(torch.float32, 4)(x), x @ expected.t(), rtol=1e-5, atol=1e-5)


def test_load_time_int8_int4_and_dispatch(int4_backend) -> None:
    w = torch.randn(64, 96) * 0.1
    q8, canonical8 = quantize_int8(w, torch.float32, 4)
    block = quantize_int4(w, torch.float32)
    canonical4 = block.canonical(torch.float32)
    assert (canonical4 - w).abs().max() <= block.scales[0].max() * 0.5 + 1e-6  # round to nearest code
    assert (canonical8 - w).abs().max() <= q8.scales.max() * 0.5 + 1e-6
    q4 = block.pack(torch.float32, 4)
    for quant, canonical in ((q8, canonical8), (q4, canonical4)):
        for m in (1, 4, 5, 16, 32):  # <= 4 rows: the quantised kernel (the routing's cap); more: dense
            x = torch.randn(m, 96)
            torch.testing.assert_close(quant_linear(x, canonical, None, quant), x @ canonical.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_hf_checkpoint_quantised_at_load(mode, tmp_path) -> None:
    """``--quantization int8|int4`` on a safetensors folder: every decoder linear gets a quantised copy,
    the 1-row (GEMV) forward equals the dense forward on the canonical weights (fp32, 1e-5), and the
    model stays close to the unquantised one (quantisation error, not a wrong mapping)."""
    from sparkserve.engine.attention import build_attention_metadata, new_kv_cache
    from sparkserve.engine.loader import load_model
    from sparkserve.testing.hf_models import CASES, make_hf_model, write_tiny_tokenizer

    make_hf_model(*CASES["qwen2-bias"]).save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path)
    dense = load_model(tmp_path).model
    quant = load_model(tmp_path, quantization=mode).model
    assert quant.quantization == mode and all(len(layer.quant) == 4 for layer in quant.layers)
    cfg = quant.config

    def last_logits(model, ids):
        n = len(ids)
        caches = [new_kv_cache(2, 16, cfg.num_key_value_heads, cfg.head_dim, torch.float32) for _ in model.layers]
        with torch.inference_mode():
            for t in range(n):  # one token per forward: every linear is a 1-row call
                meta = build_attention_metadata([1], [t], [t + 1], [[0, 1]], 16)
                hidden, _ = model(torch.tensor([ids[t]]), torch.tensor([t]), caches, meta)
            return model.compute_logits(hidden)[0]

    ids = [5, 17, 33, 2, 60, 41]
    gemv = last_logits(quant, ids)
    saved = [layer.quant for layer in quant.layers]
    for layer in quant.layers:
        layer.quant = {}  # the dense path on the same (canonical) weights
    torch.testing.assert_close(gemv, last_logits(quant, ids), rtol=1e-5, atol=1e-5)
    for layer, q in zip(quant.layers, saved, strict=True):
        layer.quant = q
    reference = last_logits(dense, ids)
    assert (gemv - reference).abs().max() < (0.05 if mode == "int8" else 0.5) * reference.abs().max()


def test_quantization_flags() -> None:
    from sparkserve.cli import build_parser, engine_args_from

    args = engine_args_from(build_parser().parse_args(["serve", "--quantization", "int4", "--compile",
                                                       "--quant-gemv-max-tokens", "2"]))
    assert (args.quantization, args.compile, args.quant_gemv_max_tokens) == ("int4", True, 2)
    defaults = engine_args_from(build_parser().parse_args(["serve"]))
    assert (defaults.quantization, defaults.compile) == ("auto", False)
    with pytest.raises(ValueError):
        EngineArgs(quantization="fp8")


# --------------------------------------------------------------------------- tiny engine, fp32
def _tiny_quantised(mode: str):
    loaded = tiny_target(layers=2)
    loaded.model.quantize_(mode, gemv_max_tokens=4)
    return loaded


def _prompts(n: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(2, vocab, (3 + (5 * i) % 23,), generator=gen).tolist() for i in range(n)]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_tiny_quantised_engine_lossless_and_batch_invariant(mode) -> None:
    """fp32: the GEMV (decode) and GEMM (batched) paths use identical weights, so solo, batched and
    preempted outputs all equal the reference loop under the fp32 rule (sparkserve/testing/exactness.py)."""
    loaded = _tiny_quantised(mode)
    prompts = _prompts(16, loaded.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(1,))

    def core(**kw) -> EngineCore:
        return EngineCore(EngineArgs(dtype="float32", drafter="none", block_size=4,
                                     num_kv_blocks=kw.pop("num_kv_blocks", 256), max_num_batched_tokens=64, **kw),
                          loaded=loaded)

    solo = [core().generate_batch([p], params)[0] for p in prompts[:4]]
    for p, out in zip(prompts[:4], solo, strict=True):
        ref = greedy_reference(loaded.model, p, 12, {1})
        assert_same_or_near_tie(out, ref.token_ids, lambda j, r=ref: r.top2_gaps[j], label=f"{mode} ref")
    batched = core().generate_batch(prompts, params)
    preempting = core(num_kv_blocks=40, shuffle_blocks=True)
    preempted = preempting.generate_batch(prompts, params)
    assert preempting.scheduler.num_preemptions_total > 0
    for i, p in enumerate(prompts):
        ref = greedy_reference(loaded.model, p, 12, {1}).token_ids if i >= 4 else solo[i]
        gap = top2_gap_fn(loaded.model, p, ref)
        assert_same_or_near_tie(batched[i], ref, gap, label=f"{mode} batch[{i}]")
        assert_same_or_near_tie(preempted[i], ref, gap, label=f"{mode} preempt[{i}]")


# --------------------------------------------------------------------------- real model, bf16, default path
QUESTIONS = [
    "What is the capital of France?", "hi", "List three prime numbers.", "Why is the sky blue?",
    "Write a haiku about the sea.", "What is 12 times 7?", "Suggest a name for a bakery.",
    "Translate 'good morning' into Spanish.", "Give me a tip for learning to code.",
    "How many legs does a spider have?", "What are the primary colors?",
    "Name a famous painter and one of their works, and say why the work matters to art history.",
    "Explain photosynthesis in one sentence.", "Summarize the plot of Romeo and Juliet briefly.",
    "Describe a cat to someone who has never seen one, in a few words.",
    "What is the boiling point of water at sea level in Celsius and Fahrenheit?",
]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def smollm2_q():
    """SmolLM2-135M Q4_1 with its blocks kept (quantization auto, the default) in bf16."""
    from sparkserve.engine.loader import default_model_path, load_model

    try:
        path = default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    loaded = load_model(path, dtype=torch.bfloat16, quantization="auto")
    assert loaded.model.quantization == "gguf" and loaded.model.lm_head_quant is not None
    assert all(len(layer.quant) == 4 for layer in loaded.model.layers)
    return loaded


def test_real_quantised_default_path(smollm2_q) -> None:
    """bf16, GGUF blocks kept: solo greedy text equals the reference loop on the same weights, and 16
    concurrent requests of different lengths (and the same under preemption) give their solo text,
    under the bf16 near-tie rule."""
    tok = smollm2_q.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=tuple(tok.stop_token_ids))

    def core(**kw) -> EngineCore:
        return EngineCore(EngineArgs(dtype="bfloat16", drafter="none", block_size=16,
                                     num_kv_blocks=kw.pop("num_kv_blocks", 256),
                                     max_num_batched_tokens=kw.pop("max_num_batched_tokens", 256), **kw),
                          loaded=smollm2_q)

    assert core().quantization_key() == "gguf@int4_gemv<=4" == core().profile_key()["quantization"]
    solo_core = core()
    solo = [solo_core.generate_batch([p], params, request_prefix=f"solo{i}")[0] for i, p in enumerate(prompts)]
    assert "Paris" in tok.decode(solo[0])
    stop = set(tok.stop_token_ids)
    for i in (0, 3):
        ref = greedy_reference(smollm2_q.model, prompts[i], MAX_TOKENS, stop)
        assert_same_or_near_tie(solo[i], ref.token_ids, lambda j, r=ref: r.top2_gaps[j], eps=BF16_NEAR_TIE,
                                label=f"ref[{i}]")
    batched = core().generate_batch(prompts, params)
    preempting = core(num_kv_blocks=10, shuffle_blocks=True, max_num_batched_tokens=128)
    preempted = preempting.generate_batch(prompts, params)
    assert preempting.scheduler.num_preemptions_total > 0
    identical = 0
    for i, p in enumerate(prompts):
        gap = top2_gap_fn(smollm2_q.model, p, solo[i])
        identical += assert_same_or_near_tie(batched[i], solo[i], gap, eps=BF16_NEAR_TIE, label=f"batch[{i}]")
        identical += assert_same_or_near_tie(preempted[i], solo[i], gap, eps=BF16_NEAR_TIE, label=f"preempt[{i}]")
    print(f"identical to solo: {identical} / {2 * len(prompts)}")


# --------------------------------------------------------------------------- compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_step_matches_eager(dtype, monkeypatch) -> None:
    """``--compile`` (engine/compile_step.py, through EngineCore and its warm-up) vs eager on a tiny
    model: fp32 within 1e-5 (inductor may reassociate fp32 sums), bf16 within 4 bf16 ulps (rtol 2^-5,
    atol 0.05) of the hidden states (inductor skips eager's per-op bf16 roundings); same greedy tokens."""
    import sparkserve.engine.compile_step
    from sparkserve.engine.attention import build_attention_metadata, new_kv_cache

    monkeypatch.setattr(sparkserve.engine.compile_step, "WARMUP_TOKEN_COUNTS", (5,))  # the shape compared below
    loaded = tiny_target(layers=1)
    loaded.model.to(dtype)
    model, cfg = loaded.model, loaded.config
    ids = torch.tensor([3, 5, 7, 11, 13], dtype=torch.int64)

    def run():
        caches = [new_kv_cache(4, 4, cfg.num_key_value_heads, cfg.head_dim, dtype) for _ in model.layers]
        meta = build_attention_metadata([5], [0], [5], [[0, 1]], 4)
        with torch.inference_mode():
            hidden, _ = model(ids, torch.arange(5), caches, meta)
            return hidden.float(), model.compute_logits(hidden)

    eager_hidden, eager_logits = run()
    name = "float32" if dtype == torch.float32 else "bfloat16"
    core = EngineCore(EngineArgs(dtype=name, drafter="none", block_size=4, num_kv_blocks=64, compile=True),
                      loaded=loaded)
    assert core.runner.compiled and core.profile_key()["compile"] == 1
    compiled_hidden, compiled_logits = run()
    assert not any(w.failed for w in core.runner._compiled_layers)
    if dtype == torch.float32:
        torch.testing.assert_close(compiled_hidden, eager_hidden, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(compiled_hidden, eager_hidden, rtol=2**-5, atol=0.05)
    assert torch.equal(compiled_logits.argmax(-1), eager_logits.argmax(-1))


def test_compile_falls_back_to_eager_with_a_warning(caplog) -> None:
    from sparkserve.engine.compile_step import _EagerFallback

    def broken(x):
        raise RuntimeError("inductor exploded")

    wrapper = _EagerFallback(broken, lambda x: x + 1, "layer 0 pre")
    with caplog.at_level("WARNING"):
        assert wrapper(1) == 2 and wrapper(2) == 3
    assert wrapper.failed and "running it eagerly" in caplog.text


def test_drafter_linears_int4_under_int4_quantization(tmp_path) -> None:
    """``--quantization int4`` also makes the drafter's decoder linears int4, routed like the target's
    (engine/core.py: ``quantize_linears_`` with the engine's routing); speculation stays lossless: the
    greedy text equals the target's own greedy loop, or parts at a near-tie (fp32: paths differ only
    by summation order)."""
    from sparkserve.engine.quant import QuantLinear, int4_formats
    from sparkserve.engine.spec_decode.dspark_loader import save_drafter
    from sparkserve.testing.exactness import NEAR_TIE_EPS
    from sparkserve.testing.hf_models import CASES, make_hf_model, write_tiny_tokenizer
    from sparkserve.testing.tiny import random_dspark

    folder = tmp_path / "tiny_hf"
    make_hf_model(*CASES["qwen2-bias"]).save_pretrained(folder)
    write_tiny_tokenizer(folder)
    args = dict(model=str(folder), dtype="float32", quantization="int4", quant_gemv_max_tokens=16, cpu_plan=False,
                block_size=4, num_kv_blocks=128, max_num_seqs=4, num_threads=1, max_num_batched_tokens=32)
    plain = EngineCore(EngineArgs(drafter="none", **args))
    save_drafter(random_dspark(plain.loaded, block_size=4), tmp_path / "drafter", dtype=torch.float32)
    core = EngineCore(EngineArgs(drafter=str(tmp_path / "drafter"), verify_policy="fixed:3", **args))
    quantised = [m for m in core.drafter.layers.modules() if isinstance(m, QuantLinear)]
    assert len(quantised) == 7 and not any(isinstance(m, torch.nn.Linear) for m in core.drafter.layers.modules())
    assert {q.quant.routing for q in quantised} == {int4_formats(core.routing, 1)}
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 96, (3 + 2 * i,), generator=gen).tolist() for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(2,))
    for i, out in enumerate(core.generate_batch(prompts, params)):
        ref = greedy_reference(core.loaded.model, prompts[i], 12, {2}).token_ids
        gap = top2_gap_fn(core.loaded.model, prompts[i], ref)
        assert_same_or_near_tie(out, ref, gap, eps=NEAR_TIE_EPS, label=f"spec[{i}]")
