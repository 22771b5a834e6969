"""The GPU attention path end to end on the CPU: engine steps through the Triton kernels (interpreter).

Prefill chunks (fresh, then after cached context), decode, verify blocks, the DSpark drafter's forward
under ``fixed:K`` and ``dspark``: greedy tokens through the Triton kernels equal the torch path's on the same
tiny seeded model. Also the store kernel on the model's strided ``v`` view (issue 26, breakage 1), and
``--batch-invariant`` through the kernels (issue 24: the same request alone, batched, chunked; with the
mode off the same comparison differs on this model).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sparkserve.engine.attention import store_kv as store_kv_reference  # noqa: E402
from sparkserve.engine.config import EngineArgs  # noqa: E402
from sparkserve.engine.core import EngineCore  # noqa: E402
from sparkserve.kernels.kv_store import store_kv  # noqa: E402
from sparkserve.scheduler.profile import ThroughputProfile  # noqa: E402
from sparkserve.scheduler.sampling_params import SamplingParams  # noqa: E402
from sparkserve.testing.engine_run import run_to_end  # noqa: E402
from sparkserve.testing.spec_records import spec_totals  # noqa: E402
from sparkserve.testing.tiny import random_dspark, tiny_target  # noqa: E402

PROFILE = Path(__file__).resolve().parents[1] / "data" / "profile_small.json"


def test_store_kv_takes_the_strided_v_of_a_fused_qkv_split() -> None:
    """``v`` split off the fused QKV output is a strided view (rows (H + 2 Hkv) hd apart): stored exactly."""
    num_tokens, heads, kv_heads, head_dim = 5, 4, 2, 16
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    _, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    k, v = k.view(num_tokens, kv_heads, head_dim), v.view(num_tokens, kv_heads, head_dim)
    assert not v.is_contiguous()
    slots = torch.tensor([3, 9, 0, 14, 7])
    caches = [torch.zeros(kv_heads, 4, 4, head_dim) for _ in range(4)]
    store_kv(k, v, caches[0], caches[1], slots)
    store_kv_reference(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    with pytest.raises(ValueError, match="unit stride"):
        strided = torch.zeros(num_tokens, head_dim, kv_heads).transpose(1, 2)  # [T, Hkv, hd], last stride Hkv
        store_kv(strided, strided, *caches[:2], slots)


def _generate(backend: str, policy: str) -> tuple[list[list[int]], list[str], int]:
    target = tiny_target(seed=5, layers=3, head_dim=16)
    drafter = random_dspark(target, block_size=4, seed=2)
    args = EngineArgs(dtype="float32", num_kv_blocks=96, block_size=8, max_num_seqs=4, max_num_batched_tokens=48,
                      verify_policy=policy, attention_backend=backend, seed=0)
    core = EngineCore(args, loaded=target, drafter=drafter, profile=ThroughputProfile.load(PROFILE))
    assert (core.runner.batch.kernel_heads is not None) == core.runner.verifier.use_kernels == (backend == "triton")
    greedy = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
    params = [greedy, SamplingParams(temperature=0.8, seed=3, max_tokens=7, ignore_eos=True)]
    prompts = [[(7 * i + 3) % 61 for i in range(80)], [5, 9, 11, 2, 40, 33]]
    if policy.startswith("fixed"):  # unseeded draws follow the drafts, which dspark picks from step timings
        params.append(SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True))
        prompts.append([8, 1, 30, 22])
    steps: list = []
    run = run_to_end(core, prompts, params, steps=steps)
    return run.tokens, [str(r) for r in run.finish_reasons], spec_totals(core, steps).num_draft_tokens


@pytest.mark.parametrize("policy", ["fixed:3", "dspark"])
def test_engine_steps_through_the_triton_kernels_equal_the_torch_path(policy: str) -> None:
    """An 80-token prompt runs as a 48-token chunk then 32 after cached context (the kernels' long tile
    group), beside short prompts (greedy, seeded and, under fixed:3, unseeded sampling); decode and verify
    blocks follow, drafted by DSpark, verified by the verification kernels in one launch (``use_kernels``)."""
    triton_tokens, reasons, verified = _generate("triton", policy)
    torch_tokens, _, _ = _generate("torch", policy)
    assert all("error" not in r for r in reasons) and verified > 0, (reasons, verified)
    assert triton_tokens == torch_tokens and all(len(t) == 7 for t in triton_tokens)


def test_profile_step_times_the_served_kernels_between_synchronisations(monkeypatch: pytest.MonkeyPatch) -> None:
    """SPS(B, R) is measured on the attention path that serves (here the Triton kernels), with the device
    synchronised before the clock starts and before it stops (a no-op on the CPU, counted here)."""
    from sparkserve.engine import throughput_probe as profiler
    from sparkserve.kernels import paged_attention as kernels

    target = tiny_target(seed=5, layers=3, head_dim=16)
    args = EngineArgs(dtype="float32", num_kv_blocks=64, block_size=8, max_num_seqs=4, max_num_batched_tokens=48,
                      drafter="none", attention_backend="triton")
    core = EngineCore(args, loaded=target)
    events: list[str] = []
    launch = kernels.store_and_attend
    monkeypatch.setattr(profiler, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(kernels, "store_and_attend", lambda *a, **k: events.append("kernel") or launch(*a, **k))
    seconds = profiler.make_step_fn(core.runner, core.num_blocks, context_len=20)(6, 2)
    assert seconds > 0 and events == ["sync"] + ["kernel"] * 3 + ["sync"]


def test_batch_invariant_mode_through_the_triton_kernels() -> None:
    """``--batch-invariant`` with the Triton attention (fixed tiles and splits): a seeded request's tokens and
    logprob bits alone equal those beside two other requests and with its prompt prefilled in chunks of 8."""
    target = tiny_target(seed=5, layers=2, head_dim=16)

    def run(prompts: list[list[int]], budget: int) -> list[tuple[int, float]]:
        args = EngineArgs(dtype="float32", num_kv_blocks=96, block_size=8, max_num_seqs=4, drafter="none",
                          max_num_batched_tokens=budget, attention_backend="triton", batch_invariant=True,
                          cpu_plan=False, enable_prefix_caching=False)
        core = EngineCore(args, loaded=target)
        params = SamplingParams(temperature=0.8, seed=3, max_tokens=4, ignore_eos=True, logprobs=0)
        for i, prompt in enumerate(prompts):
            core.add_request(core.make_request(f"r{i}", prompt, params))
        out: list[tuple[int, float]] = []
        while core.has_unfinished_requests():
            for o in core.step():
                if o.request_id == "r0":
                    out += [(t, lp.logprob) for t, lp in zip(o.new_token_ids, o.new_logprobs, strict=True)]
        return out

    prompt = [(7 * i + 3) % 61 for i in range(40)]
    alone = run([prompt], 64)
    assert len(alone) == 4
    assert run([prompt, [5, 9, 11, 2, 40, 33], [(3 * i) % 50 for i in range(30)]], 64) == alone
    assert run([prompt], 8) == alone
