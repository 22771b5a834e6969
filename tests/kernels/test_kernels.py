"""Triton kernels (kernels/) against their torch references.

On the CPU (CI) the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set below before any
kernel module is imported: Triton reads it when a kernel is decorated); shapes are tiny because the
interpreter costs ~50 us per operation. On CUDA the same tests run compiled, plus a few CUDA-only ones at
serving shapes (``scripts/gpu_check.sh`` phase 1).

Tolerances (kernel vs fp32 reference of the same inputs; relative, and absolute in units of the largest
reference value): fp32 1e-5 (exact-ish: only the summation order differs); fp16 3e-3; bf16 2e-2 (the
kernel rounds the softmax weights to the input dtype before the PV product, as FlashAttention does).
Sampling kernels: exact equality of tokens.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

from sparkserve.engine.attention import build_attention_metadata  # noqa: E402
from sparkserve.engine.attention import paged_attention as engine_paged_attention  # noqa: E402
from sparkserve.engine.attention import store_kv as store_kv_reference  # noqa: E402
from sparkserve.engine.sampling.draw import coupled_choice as coupled_choice_reference  # noqa: E402
from sparkserve.engine.sampling.metadata import SamplingMetadata  # noqa: E402
from sparkserve.engine.sampling.transforms import apply_penalties_and_bias  # noqa: E402
from sparkserve.engine.spec_decode.rejection import RaggedDrafts  # noqa: E402
from sparkserve.engine.spec_decode.verifier import Verifier, emitted_tokens  # noqa: E402
from sparkserve.engine.spec_decode.verifier_kernels import rejection_sample_reference, verify_rows  # noqa: E402
from sparkserve.kernels.attention_metadata import (  # noqa: E402
    build_ragged_metadata,
    split_heuristic,
    split_scratch_bytes,
)
from sparkserve.kernels.common import cdiv  # noqa: E402
from sparkserve.kernels.coupling import coupled_choice  # noqa: E402
from sparkserve.kernels.keyed_hash import keyed_uniform_kernel  # noqa: E402
from sparkserve.kernels.keyed_random import keyed_uniform, request_key  # noqa: E402
from sparkserve.kernels.kv_store import store_kv  # noqa: E402
from sparkserve.kernels.paged_attention import (  # noqa: E402
    AttentionConfig,
    paged_attention,
    paged_attention_reference,
    store_and_attend,
)
from sparkserve.kernels.rejection import FlatVerifyInput, rejection_sample  # noqa: E402


def _load_test_module(relative: str):
    """A sibling test module by path (tests/ is not a package: pytest runs in importlib mode)."""
    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(f"_kernels_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


test_rejection = _load_test_module("engine/spec_decode/test_rejection.py")  # its cases, run through the kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="needs CUDA: compiled kernels at serving shapes (scripts/gpu_check.sh phase 1)")


def CUDA(test):  # noqa: N802 - used as a decorator like a pytest mark
    """The ``gpu`` tier: marked, and skipped without a CUDA device."""
    return pytest.mark.gpu(_NO_CUDA(test))
SMALL = AttentionConfig(block_n=16)  # several key blocks per split at tiny contexts
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


# ---------------------------------------------------------------- ragged attention batches


@dataclasses.dataclass(frozen=True)
class Seq:
    """One sequence of a ragged batch: ``q_len`` new tokens after ``start`` cached ones."""

    q_len: int
    start: int
    causal: bool = True


def make_batch(seqs: list[Seq], num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype, block_size: int = 8,
               seed: int = 0, num_splits: int | None = None, device: str = DEVICE):
    """Random q and caches (physical blocks shuffled) and the kernel metadata of ``seqs``."""
    gen = torch.Generator().manual_seed(seed)
    kv_lens = [s.start + s.q_len for s in seqs]
    need = [cdiv(n, block_size) for n in kv_lens]
    perm = torch.randperm(sum(need) + 2, generator=gen).tolist()
    tables = [perm[sum(need[:i]): sum(need[: i + 1])] for i in range(len(seqs))]
    shape = (num_kv_heads, len(perm), block_size, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    v_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    q = torch.randn(sum(s.q_len for s in seqs), num_kv_heads * group, head_dim, generator=gen)
    meta = build_ragged_metadata([s.q_len for s in seqs], [s.start for s in seqs], kv_lens, tables, block_size,
                                 num_kv_heads, group, causal=[s.causal for s in seqs], device=device,
                                 num_splits=num_splits)
    return q.to(dtype=dtype, device=device), k_cache, v_cache, meta, tables


def mixed(group: int) -> list[Seq]:
    """Decode (context of one token, of exactly 3 blocks, of several blocks), verify blocks, a prefill chunk
    after cached context in the long tile group, a fresh prefill, a bidirectional drafter block."""
    long_q = 64 // group + 3
    return [Seq(1, 0), Seq(1, 23), Seq(1, 37), Seq(3, 8), Seq(8, 30), Seq(long_q, 13), Seq(9, 0),
            Seq(4, 11, causal=False)]


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """``TOL[dtype]`` relative, and absolute in units of the largest reference value (long contexts
    average many values: small outputs must not make a loose absolute tolerance)."""
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol * float(ref.float().abs().max()), rtol=tol)


@pytest.mark.parametrize(("dtype", "head_dim", "group", "num_kv_heads", "split"), [
    (torch.float32, 64, 1, 2, True), (torch.float32, 128, 3, 1, False), (torch.bfloat16, 64, 4, 1, True),
    (torch.float16, 128, 3, 1, False),
])
def test_paged_attention_mixed_batch(dtype: torch.dtype, head_dim: int, group: int, num_kv_heads: int,
                                     split: bool) -> None:
    """Every kind of sequence in one batch (and, with ``split``, split-KV) against the reference."""
    q, k_cache, v_cache, meta, _ = make_batch(mixed(group), num_kv_heads, group, head_dim, dtype, num_splits=1)
    ref = paged_attention_reference(q, k_cache, v_cache, meta, head_dim**-0.5)
    assert len(meta.groups) == 2  # the short and the long tile group
    assert_close(paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5, config=SMALL), ref, dtype)
    if split:
        short, long = meta.groups  # split-KV is for the short group (the long one never splits in serving)
        meta = dataclasses.replace(meta, groups=(dataclasses.replace(short, num_splits=3), long))
        assert_close(paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5, config=SMALL), ref, dtype)


def test_split_scratch_is_sized_by_the_short_group_not_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 200-token prefill beside a decode and a verify block: the split-KV scratch has the short group's
    rows (2 tiles x its longest query, 3), not the step's 204 tokens; the output still equals the reference."""
    from sparkserve.kernels import paged_attention as pa

    q, k_cache, v_cache, meta, _ = make_batch([Seq(1, 40), Seq(3, 30), Seq(200, 5)], 1, 2, 16, torch.float32,
                                              num_splits=1)
    short, long = meta.groups
    meta = dataclasses.replace(meta, groups=(dataclasses.replace(short, num_splits=4), long))
    shapes = []
    empty = torch.empty
    monkeypatch.setattr(pa.torch, "empty", lambda *a, **k: shapes.append(tuple(a[0])) or empty(*a, **k))
    out = paged_attention(q, k_cache, v_cache, meta, 0.25, config=SMALL)
    monkeypatch.undo()
    assert (4, 6, 2, 16) in shapes and (4, 6, 2) in shapes and not any(204 in s for s in shapes if len(s) > 2)
    assert split_scratch_bytes(6, 2, 16, splits=4) == 4 * 4 * 6 * 2 * 17
    assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.25), torch.float32)


def test_verify_blocks_one_to_eight_and_block_boundaries() -> None:
    """Verify blocks of 1..8 whose contexts end before, on and after a block boundary (block size 4)."""
    seqs = [Seq(n, start) for n in range(1, 9) for start in (4 - n % 4, 7)]
    q, k_cache, v_cache, meta, _ = make_batch(seqs, 2, 3, 64, torch.float32, block_size=4, seed=3)
    ref = paged_attention_reference(q, k_cache, v_cache, meta, 0.125)
    assert_close(paged_attention(q, k_cache, v_cache, meta, 0.125, config=SMALL), ref, torch.float32)


def test_long_context_small_batch_splits_kv() -> None:
    """One decode sequence over a long context: the heuristic splits its keys over several programs."""
    q, k_cache, v_cache, meta, _ = make_batch([Seq(1, 700), Seq(3, 520)], 1, 4, 64, torch.float32, block_size=16)
    assert meta.groups[0].num_splits > 1
    ref = paged_attention_reference(q, k_cache, v_cache, meta, 0.125)
    assert_close(paged_attention(q, k_cache, v_cache, meta, 0.125), ref, torch.float32)


def test_split_heuristic() -> None:
    assert split_heuristic(num_programs=3 * 32, max_kv_len=8192, num_sms=132) == 3  # fills ~2 waves
    assert split_heuristic(num_programs=3 * 256, max_kv_len=8192, num_sms=132) == 1  # enough programs
    assert split_heuristic(num_programs=3, max_kv_len=300, num_sms=132) == 2  # chunks >= 256 keys
    assert split_heuristic(num_programs=1, max_kv_len=10**6, num_sms=132) == 32  # capped


def test_reference_and_metadata_match_the_engine() -> None:
    """The reference's mask rule and the slot mapping are engine.attention's (incl. a drafter block)."""
    seqs = mixed(3)
    q, k_cache, v_cache, meta, tables = make_batch(seqs, 1, 3, 64, torch.float32, device="cpu")
    engine_meta = build_attention_metadata([s.q_len for s in seqs], [s.start for s in seqs],
                                           [s.start + s.q_len for s in seqs], tables, 8, causal=[s.causal for s in seqs])
    assert torch.equal(meta.slot_mapping, engine_meta.slot_mapping)
    k_new = k_cache.view(1, -1, 64)[:, meta.slot_mapping].transpose(0, 1)  # [T, 1, hd] already stored
    v_new = v_cache.view(1, -1, 64)[:, meta.slot_mapping].transpose(0, 1)
    out = engine_paged_attention(q, k_new, v_new, k_cache, v_cache, engine_meta, 0.125)
    torch.testing.assert_close(paged_attention_reference(q, k_cache, v_cache, meta, 0.125), out, atol=1e-5, rtol=1e-5)


def test_store_kv_matches_reference_and_store_and_attend() -> None:
    seqs = [Seq(1, 9), Seq(4, 3), Seq(6, 0)]
    q, k_cache, v_cache, meta, _ = make_batch(seqs, 2, 1, 64, torch.bfloat16, seed=5)
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(meta.num_tokens, 2, 64, generator=gen).to(DEVICE)
    v = torch.randn(meta.num_tokens, 2, 64, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="must be one of"):
        store_kv(k, v.bfloat16(), k_cache, v_cache, meta.slot_mapping)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    store_kv_reference(k, v, ref_k, ref_v, meta.slot_mapping)
    out = store_and_attend(q, k.bfloat16(), v.bfloat16(), k_cache, v_cache, meta, 0.125)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)  # fp32 -> bf16 cast as the reference
    assert_close(out, paged_attention_reference(q, ref_k, ref_v, meta, 0.125), torch.bfloat16)


def test_wrapper_rejects_bad_inputs() -> None:
    q, k_cache, v_cache, meta, _ = make_batch([Seq(2, 3)], 1, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        paged_attention(q.transpose(0, 1).contiguous().transpose(0, 1), k_cache, v_cache, meta, 0.125)
    with pytest.raises(ValueError, match="must be one of"):
        paged_attention(q, k_cache.half(), v_cache, meta, 0.125)
    with pytest.raises(ValueError, match="query heads"):
        paged_attention(q[:, :1].contiguous(), k_cache, v_cache, meta, 0.125)
    with pytest.raises(ValueError, match="at least one query token"):
        build_ragged_metadata([0], [3], [3], [[0]], 8, 1, 2)


# ---------------------------------------------------------------- keyed randomness and sampling


def test_keyed_hash_bit_identical_to_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 4096
    keys = torch.randint(0, 2**63 - 1, (n,), generator=gen)
    keys[:3] = torch.tensor([0, 2**63 - 1, request_key(None, "r0")])
    positions = torch.randint(0, 2**31 - 1, (n,), generator=gen)
    draws = torch.randint(0, 2**24, (n,), generator=gen)
    args = (keys.to(DEVICE), positions.to(DEVICE), draws.to(DEVICE))
    assert torch.equal(keyed_uniform_kernel(*args).cpu(), keyed_uniform(keys, positions, draws))


def test_coupled_choice_matches_torch() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3000, 50, generator=gen) * 3
    logits[:, 41:] = float("-inf")  # top-k style exclusions
    logits[7, :] = -1e30
    keys = torch.randint(0, 2**62, (3000,), generator=gen)
    positions = torch.randint(0, 10**6, (3000,), generator=gen)
    expected = coupled_choice_reference(logits, keys, positions)
    dev = (logits.to(DEVICE), keys.to(DEVICE), positions.to(DEVICE))
    assert torch.equal(coupled_choice(*dev, block_v=16).cpu(), expected)
    assert torch.equal(coupled_choice(*(t[:8] for t in dev), block_v=16, block_r=1).cpu(), expected[:8])
    assert len(set(expected.tolist())) > 30


def random_flat_input(num_requests: int, vocab: int, draft_vocab: int, max_len: int, seed: int) -> FlatVerifyInput:
    """Ragged drafts (0..max_len each), mixed agreement / rejection rows, dense and one-hot q."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (num_requests,), generator=gen)
    lengths[:2] = torch.tensor([0, max_len])
    num_drafts = int(lengths.sum())
    cu = torch.zeros(num_requests + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    probs = torch.softmax(2 * torch.randn(num_drafts + num_requests, vocab, generator=gen), -1)
    probs[:, 3] = 0.0  # a zero-probability token
    probs /= probs.sum(-1, keepdim=True)
    drafts = torch.randint(0, vocab, (num_drafts,), generator=gen)
    inp = FlatVerifyInput(
        draft_token_ids=drafts, cu_num_draft_tokens=cu, max_num_draft_tokens=max_len,
        agreement=torch.rand(num_requests, generator=gen) < 0.3, target_choice=probs.argmax(-1), target_probs=probs,
        draft_probs=torch.softmax(2 * torch.randn(num_drafts, draft_vocab, generator=gen), -1),
        draft_one_hot=torch.rand(num_drafts, generator=gen) < 0.3,
        keys=torch.randint(0, 2**62, (num_requests,), generator=gen),
        first_positions=torch.randint(0, 1000, (num_requests,), generator=gen),
        attempts=torch.randint(0, 5, (num_requests,), generator=gen),
    )
    return inp


def to_device(inp: FlatVerifyInput) -> FlatVerifyInput:
    return FlatVerifyInput(**{f.name: v.to(DEVICE) if isinstance(v := getattr(inp, f.name), torch.Tensor) else v
                              for f in dataclasses.fields(inp)})


@pytest.mark.parametrize(("block_v", "block_r"), [(1024, None), (4, 1)])
def test_rejection_kernel_equals_reference(block_v: int, block_r: int | None) -> None:
    """Exactly the reference's tokens: ragged lengths 0..8, agreement and rejection rows, dense q over a
    draft vocabulary prefix and one-hot q, several vocabulary blocks (block_v=4), one request per program."""
    inp = random_flat_input(200 if block_r is None else 6, vocab=13, draft_vocab=10, max_len=8, seed=block_v)
    ref = rejection_sample_reference(inp)
    out = rejection_sample(to_device(inp), block_v=block_v, block_r=block_r)
    assert torch.equal(out.num_accepted.cpu(), ref.num_accepted)
    assert torch.equal(out.token_ids.cpu(), ref.token_ids)
    if block_r is None:
        accepted, lengths = ref.num_accepted, (inp.cu_num_draft_tokens[1:] - inp.cu_num_draft_tokens[:-1]).long()
        assert bool((accepted == lengths).any()) and bool(((accepted == 0) & (lengths > 0)).any())
        no_q = dataclasses.replace(inp, draft_probs=None, draft_one_hot=torch.ones_like(inp.draft_one_hot))
        assert torch.equal(rejection_sample(to_device(no_q)).token_ids.cpu(), rejection_sample_reference(no_q).token_ids)


def test_rejection_kernel_empty_drafts_fully_accepted_and_fully_rejected() -> None:
    """No drafts anywhere (plain sampling), a draft the target is sure of (fully accepted, bonus token),
    a draft of zero target probability (fully rejected at 0)."""
    vocab = 6
    probs = torch.nn.functional.one_hot(torch.tensor([2, 4, 5, 1, 3]), vocab).float()
    base = dict(agreement=torch.zeros(3, dtype=torch.bool), target_choice=None, keys=torch.tensor([1, 2, 3]),
                first_positions=torch.tensor([4, 5, 6]), attempts=torch.zeros(3, dtype=torch.int64))
    empty = FlatVerifyInput(torch.zeros(0, dtype=torch.int64), torch.zeros(4, dtype=torch.int32), 0,
                            target_probs=probs[:3], draft_probs=None, draft_one_hot=torch.zeros(0, dtype=torch.bool),
                            **base)
    out = rejection_sample(to_device(empty))
    assert out.token_ids.tolist() == [[2], [4], [5]] and out.num_accepted.tolist() == [0, 0, 0]
    # request 0: drafts [2, 4] with p one-hot at them -> accepted, bonus 5; request 1: draft 0 with p(0) = 0
    drafts = FlatVerifyInput(torch.tensor([2, 4, 0]), torch.tensor([0, 2, 3, 3], dtype=torch.int32), 2,
                             target_probs=probs[[0, 1, 2, 3, 4, 2]], draft_probs=torch.full((3, vocab), 1 / vocab),
                             draft_one_hot=torch.zeros(3, dtype=torch.bool), **base)
    out = rejection_sample(to_device(drafts))
    assert out.num_accepted.tolist() == [2, 0, 0]
    assert out.token_ids.tolist() == [[2, 4, 5], [1, 0, 0], [5, 0, 0]]


def verify_flat_kernel(probs, drafts, lengths, params, q, keys, first_positions, attempt=0):
    """``verify_flat`` (tests/engine/spec_decode/test_rejection.py) through ``sparkserve.engine.spec_decode.verifier_kernels.verify_rows`` (one launch)."""
    n = len(params)
    meta = SamplingMetadata.build(params, keys, [[] for _ in params], probs.shape[-1], attempts=[attempt] * n,
                                  device=DEVICE)
    ragged = RaggedDrafts(drafts.to(DEVICE), tuple(lengths))
    rows = meta.expand(ragged.num_draft_tokens, ragged.token_ids)
    adjusted = apply_penalties_and_bias(probs.log().to(DEVICE), rows)
    q = None if q is None else type(q)(None if q.probs is None else q.probs.to(DEVICE), q.one_hot.to(DEVICE))
    out = verify_rows(ragged, adjusted, rows, torch.tensor(first_positions, device=DEVICE), q,
                      Verifier().coupled(meta))
    accepted = out.num_accepted.tolist()
    return SimpleNamespace(token_ids=emitted_tokens(out.token_ids.tolist(), accepted), num_accepted=accepted)


@pytest.fixture()
def kernel_verifier(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route tests/engine/spec_decode/test_rejection.py's cases through the kernels."""
    monkeypatch.setattr(test_rejection, "verify_flat", verify_flat_kernel)


@pytest.mark.usefixtures("kernel_verifier")
def test_rejection_exact_cases_of_the_torch_sampler() -> None:
    test_rejection.test_greedy_rows_accept_matching_prefix_ragged()
    test_rejection.test_random_rows_exact_cases()
    test_rejection.test_seeded_rows_emit_the_same_tokens_at_any_verify_length_and_batch()


@pytest.mark.usefixtures("kernel_verifier")
def test_rejection_statistical_cases_of_the_torch_sampler() -> None:
    """One-hot drafts, no drafts, and losslessness of the first and joint distribution on the Markov
    world (free and coupled rows), at tests/engine/spec_decode/test_rejection.py's sample sizes."""
    test_rejection.test_deterministic_drafts_one_hot_q()
    test_rejection.test_no_drafts_is_plain_sampling()
    for kind in ("free", "coupled"):
        test_rejection.test_lossless_first_and_joint_distribution(kind)


@pytest.mark.usefixtures("kernel_verifier")
def test_rejection_negative_control_wrong_q_fails() -> None:
    test_rejection.test_negative_control_wrong_q_fails()


def test_kernel_verifier_equals_torch_verifier() -> None:
    """Same keys -> the same emitted tokens as ``sparkserve.engine.spec_decode.verifier.Verifier`` (greedy, seeded,
    unseeded rows; dense and one-hot q)."""
    gen = torch.Generator().manual_seed(11)
    vocab, lengths = 12, [0, 3, 1, 5, 2, 4, 0, 6]
    params = [test_rejection.GREEDY, test_rejection.SAMPLED, test_rejection.SamplingParams(temperature=0.8, seed=5)] * 3
    params = params[: len(lengths)]
    probs = torch.softmax(torch.randn(sum(lengths) + len(lengths), vocab, generator=gen), -1)
    drafts = torch.randint(0, vocab, (sum(lengths),), generator=gen)
    q = test_rejection.DraftProbs(torch.softmax(torch.randn(sum(lengths), vocab, generator=gen), -1),
                                  torch.rand(sum(lengths), generator=gen) < 0.3)
    keys = [request_key(p.seed, f"v{i}") for i, p in enumerate(params)]
    for attempt in range(3):
        args = (probs, drafts, lengths, params, q, keys, [20 + i for i in range(len(lengths))], attempt)
        assert verify_flat_kernel(*args) == test_rejection.verify_flat(*args)


# ---------------------------------------------------------------- compiled for sm_90 without a GPU


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="Triton's NVIDIA backend (with ptxas) is not installed")
def test_kernels_compile_for_sm90() -> None:
    """What the interpreter cannot check: the compiler's types and lowering (kernels/compile_check.py;
    a subprocess, since kernels in this process were decorated for the interpreter)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "sparkserve.kernels.compile_check", "--quick"], cwd=Path(__file__).resolve().parents[2],
                          env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == 6 and proc.stdout.count("shared=") == 6 and "num_stages=" in proc.stdout
    assert "split_keys=256" in proc.stdout and "fixed_order" in proc.stdout  # batch-invariant mode's variants


def test_compile_check_fails_a_variant_over_the_sm90_shared_memory(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from sparkserve.kernels import compile_check

    sizes = iter([compile_check.SM90_SHARED_MEMORY_PER_BLOCK, compile_check.SM90_SHARED_MEMORY_PER_BLOCK + 1])
    monkeypatch.setattr(compile_check, "quick_variants", lambda: iter(list(compile_check.variants())[:2]))
    monkeypatch.setattr(compile_check, "compile_variant",
                        lambda variant: compile_check.Resources(0.1, next(sizes), 4, 3))
    assert compile_check.main(["--quick"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok ") and lines[1].startswith("FAIL") and "232448" in lines[1]
    names = [v.name for v in compile_check.variants()]
    assert "attention torch.float32 G=2 M=64 hd=128 split=True" in names  # the Qwen3-0.6B shape, fp32


def test_the_engine_warms_up_compile_checks_list_for_its_model_shape() -> None:
    """One source of truth: the engine's warm-up (a dry run: a recording compiler, the tiny model's G = 2,
    hd = 16, fp32) compiles exactly ``served_variants`` of its shape, the served shapes' lists are all in
    ``variants()``, and a variant over the card's shared memory stops the warm-up."""
    from sparkserve.engine.config import EngineArgs
    from sparkserve.engine.core import EngineCore
    from sparkserve.kernels import compile_check
    from sparkserve.testing.tiny import tiny_target

    core = EngineCore(EngineArgs(dtype="float32", num_kv_blocks=16, block_size=8, max_num_seqs=2, drafter="none",
                                 attention_backend="triton", batch_invariant=False),  # the mode's list: below
                      loaded=tiny_target(seed=1, head_dim=16))
    compiled: list[tuple[str, int]] = []

    def record(variant: compile_check.Variant, arch: int) -> compile_check.Resources:
        compiled.append((variant.name, arch))
        return compile_check.Resources(0.0, 1000, 4, 2)

    names = core.runner.warm_up_kernels(compile_fn=record)
    expected = [v.name for v in compile_check.served_variants(2, 16, torch.float32)]
    assert names == expected and sorted(expected) == sorted(n for n, _ in compiled) and {a for _, a in compiled} == {90}
    assert "attention torch.float32 G=2 M=16 hd=16 split=True" in names and "store_kv fp32 hd=16" in names
    assert core.runner.warm_up_kernels() == []  # off CUDA without a compiler: nothing to warm up
    every = {v.name for v in compile_check.variants()}
    for group, head_dim in compile_check.SERVED_SHAPES.values():
        for dtype in (torch.bfloat16, torch.float32):
            assert {v.name for v in compile_check.served_variants(group, head_dim, dtype)} <= every
    with pytest.raises(RuntimeError, match="shared memory"):
        compile_check.warm_up(3, 64, torch.bfloat16, 90, limit=999, compile_fn=record)


def test_batch_invariant_engine_warms_up_the_modes_variants() -> None:
    """With ``--batch-invariant`` the warm-up compiles the mode's attention (one tile of ``invariant_block_m(G)``
    rows, 256-key splits) and its fixed-order combine, and ``variants()`` lists them for every served shape."""
    from sparkserve.engine.config import EngineArgs
    from sparkserve.engine.core import EngineCore
    from sparkserve.kernels import compile_check
    from sparkserve.testing.tiny import tiny_target

    core = EngineCore(EngineArgs(dtype="float32", num_kv_blocks=16, block_size=8, max_num_seqs=2, drafter="none",
                                 attention_backend="triton", batch_invariant=True),
                      loaded=tiny_target(seed=1, head_dim=16))
    names = core.runner.warm_up_kernels(compile_fn=lambda variant, arch: compile_check.Resources(0.0, 1000, 4, 2))
    assert names == [v.name for v in compile_check.served_variants(2, 16, torch.float32, batch_invariant=True)]
    assert "attention torch.float32 G=2 M=16 hd=16 split=True split_keys=256" in names
    assert "combine fp32 hd=16 fixed_order" in names and not any("M=32" in n for n in names)
    every = {v.name for v in compile_check.variants()}
    for group, head_dim in compile_check.SERVED_SHAPES.values():
        for dtype in (torch.bfloat16, torch.float32):
            mode = {v.name for v in compile_check.served_variants(group, head_dim, dtype, batch_invariant=True)}
            assert mode <= every and any("split_keys=256" in n for n in mode)


def test_the_engine_warms_up_unless_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparkserve.engine.config import EngineArgs
    from sparkserve.engine.core import EngineCore
    from sparkserve.engine.model_runner import ModelRunner
    from sparkserve.testing.tiny import tiny_target

    calls: list[int] = []
    monkeypatch.setattr(ModelRunner, "warm_up_kernels", lambda self: calls.append(1) or [])
    for warm in (True, False):
        EngineCore(EngineArgs(dtype="float32", num_kv_blocks=16, block_size=8, max_num_seqs=2, drafter="none",
                              warm_up_kernels=warm), loaded=tiny_target(seed=1, head_dim=16))
    assert calls == [1]


# ---------------------------------------------------------------- the GPU check's driver (CPU-safe parts)


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run_writes_every_phase_in_order(tmp_path: Path) -> None:
    gpu_check = load_gpu_check()
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--skip", "serving", "--concurrency", "1", "16"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["phases"]) == ["probe", "tests", "kernels", "serving", "exactness"]
    assert [p["status"] for p in summary["phases"].values()] == ["ok", "dry-run", "dry-run", "skipped (--skip)",
                                                                 "ok"]  # probe and exactness run on the CPU
    assert summary["environment"]["torch"] == torch.__version__
    serving = json.loads((tmp_path / "phase3_serving.json").read_text())
    assert serving["plan"]["concurrency"] == [1, 16]
    args = gpu_check.parse_args(["--out", str(tmp_path)])
    assert gpu_check.run_phase("kernels", args, cuda=False)["status"] == "skipped: CUDA is not available"
    junit = tmp_path / "j.xml"
    junit.write_text('<testsuites><testsuite><testcase name="a" time="0.5"/><testcase name="b" time="1">'
                     '<failure message="boom"/></testcase><testcase name="c"><skipped message="no CUDA"/></testcase>'
                     '</testsuite></testsuites>')
    parsed = gpu_check.junit_summary(junit)
    assert parsed["counts"] == {"passed": 1, "failure": 1, "error": 0, "skipped": 1}
    assert parsed["cases"][1]["message"] == "boom"


def test_benchmark_and_exactness_code_paths_run_at_tiny_shapes() -> None:
    """Phase 2's and phase 4's kernel code at tiny shapes (on the CPU: interpreter timings, meaningless)."""
    from sparkserve.benchmarks import bench_kernels as bench

    plan = bench.BenchPlan(batches=(2,), contexts=(40,), verify_q_len=3, tune_cells=((2, 40),), configs=(SMALL,),
                           copy_bytes=1 << 20, sampling=(4, 2, 64))
    result = bench.run_benchmarks(lambda: 1e9, plan)
    assert result["status"] == "ok" and result["config"]["block_n"] == 16
    assert [(c["batch"], c["q_len"]) for c in result["decode"] + result["verify"]] == [(2, 1), (2, 3)]
    assert result["verify"][0]["sdpa_ms"] > 0 and set(result["sampling"]) >= {"rejection_kernel_ms", "coupled_kernel_ms"}
    assert bench.kernel_exactness((1, 4, 20), (30, 10, 5))["pass"]


# ---------------------------------------------------------------- CUDA only: serving shapes, graphs


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_attention_at_serving_shapes(dtype: torch.dtype) -> None:
    """SmolLM2 heads (9 / 3, hd 64), block size 16: 64 decodes at 2k, 16 verify blocks of 8 at 4k, a
    512-token prefill chunk after 1k cached tokens, drafter blocks; split-KV by the heuristic."""
    seqs = [Seq(1, 2047)] * 64 + [Seq(8, 4000)] * 16 + [Seq(512, 1024)] + [Seq(8, 600, causal=False)] * 4
    torch.backends.cuda.matmul.allow_tf32 = False
    q, k_cache, v_cache, meta, _ = make_batch(seqs, 3, 3, 64, dtype, block_size=16)
    ref = paged_attention_reference(q, k_cache, v_cache, meta, 0.125)
    assert_close(paged_attention(q, k_cache, v_cache, meta, 0.125), ref, dtype)
    single = [Seq(1, 8191)]  # one long sequence: the heuristic splits it over many programs
    q, k_cache, v_cache, meta, _ = make_batch(single, 3, 3, 64, dtype, block_size=16)
    assert meta.groups[0].num_splits >= 8
    assert_close(paged_attention(q, k_cache, v_cache, meta, 0.125),
                 paged_attention_reference(q, k_cache, v_cache, meta, 0.125), dtype)


@CUDA
def test_cuda_graph_capture_and_replay_of_store_and_attention() -> None:
    """Store + attention captured in a CUDA graph replay with new inputs like eager calls."""
    seqs = [Seq(1, 300)] * 8 + [Seq(4, 200)] * 4
    q, k_cache, v_cache, meta, _ = make_batch(seqs, 3, 3, 64, torch.bfloat16, block_size=16)
    k_new = torch.randn(meta.num_tokens, 3, 64, dtype=torch.bfloat16, device=DEVICE)
    v_new = torch.randn_like(k_new)
    caches = (k_cache.clone(), v_cache.clone())
    store_and_attend(q, k_new, v_new, *caches, meta, 0.125)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = store_and_attend(q, k_new, v_new, *caches, meta, 0.125)
    for _ in range(2):
        q.normal_()
        k_new.normal_()
        graph.replay()
        eager = store_and_attend(q, k_new, v_new, k_cache, v_cache, meta, 0.125)
        assert torch.equal(out, eager)


@CUDA
def test_cuda_sampling_kernels_at_the_real_vocabulary() -> None:
    inp = random_flat_input(256, vocab=49152, draft_vocab=8192, max_len=7, seed=4)
    ref = rejection_sample_reference(inp)
    out = rejection_sample(to_device(inp))
    assert torch.equal(out.token_ids.cpu(), ref.token_ids)
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(512, 49152, generator=gen) * 4
    keys, positions = torch.randint(0, 2**62, (512,), generator=gen), torch.arange(512)
    mismatch = coupled_choice(logits.cuda(), keys.cuda(), positions.cuda()).cpu() != coupled_choice_reference(
        logits, keys, positions)
    assert int(mismatch.sum()) <= 1  # the device's log may move a Gumbel near-tie by an ulp


def test_gpu_check_stages_the_carried_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GGUF carried in two parts is reassembled and checked; corrupt parts are refused."""
    import hashlib

    gpu_check = load_gpu_check()
    model = bytes(range(256)) * 10
    for folder, part in (("gpu_a", model[:1000]), ("gpu_b", model[1000:])):
        (tmp_path / "data" / folder / "prompts").mkdir(parents=True)
        (tmp_path / "data" / folder / f"gguf.part.0{folder == 'gpu_b':d}").write_bytes(part)
    (tmp_path / "data" / "gpu_b" / "gguf.sha256").write_text(hashlib.sha256(model).hexdigest() + "  smollm2.gguf\n")
    for var in ("SPARKSERVE_MODEL_PATH", "SPARKSERVE_DATA"):  # set first, so monkeypatch restores them after
        monkeypatch.setenv(var, "")                             # stage_carried_files writes them
        monkeypatch.delenv(var)
    staged = gpu_check.stage_carried_files(tmp_path, tmp_path)
    assert Path(staged["model"]).read_bytes() == model and os.environ["SPARKSERVE_MODEL_PATH"] == staged["model"]
    assert staged["data"] == str(tmp_path / "data" / "gpu_b")
    monkeypatch.delenv("SPARKSERVE_MODEL_PATH")
    (tmp_path / "data" / "gpu_a" / "gguf.part.00").write_bytes(b"x" + model[1:1000])
    with pytest.raises(ValueError, match="do not match"):
        gpu_check.stage_carried_files(tmp_path, tmp_path)
