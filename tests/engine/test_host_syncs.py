"""One device-to-host transfer per step, no device mixing: the runner's step on the ``meta`` device
under ``sparkserve.testing.device_guard`` (issue 26: breakages 2 and 4 caught without a GPU)."""

from __future__ import annotations

import pytest
import torch

from sparkserve.engine import model_runner
from sparkserve.engine.config import EngineArgs
from sparkserve.engine.core import EngineCore
from sparkserve.engine.spec_decode.verifier import Verifier
from sparkserve.scheduler.sampling_params import SamplingParams
from sparkserve.testing.device_guard import DeviceGuard, HostTransferCounter, MixedDeviceError
from sparkserve.testing.tiny import random_dspark, tiny_target


def _meta_engine(drafter: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[EngineCore, HostTransferCounter]:
    target = tiny_target(seed=3, head_dim=16)
    dspark = random_dspark(target) if drafter else None
    target.model.to("meta")
    if dspark is not None:
        dspark.to("meta")
    counter = HostTransferCounter()
    monkeypatch.setattr(model_runner, "_to_host", counter)
    args = EngineArgs(dtype="float32", num_kv_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
                      verify_policy="fixed:3" if drafter else None, drafter=None if drafter else "none")
    core = EngineCore(args, loaded=target, drafter=dspark)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=6, ignore_eos=True)
    core.add_request(core.make_request("long", list(range(3, 40)), params))  # 32-token chunk, then 5 after it
    core.add_request(core.make_request("short", list(range(3, 9)), sampled))
    return core, counter


def _run_steps(core: EngineCore, counter: HostTransferCounter, uploads: list[int] | None = None) -> list[int]:
    """Steps run under the guard (errors raise: no step-fault handler); host transfers per step (and
    host-to-device copies per step into ``uploads``)."""
    per_step = []
    while core.has_unfinished_requests():
        plan = core.scheduler.schedule()
        before = counter.calls
        with DeviceGuard() as guard:
            out = core.runner.execute(plan)
        per_step.append(counter.calls - before)
        if uploads is not None:
            uploads.append(guard.host_to_device)
        core.scheduler.update_from_output(plan, out)
    return per_step


@pytest.mark.parametrize("drafter", [True, False])
def test_runner_step_has_one_host_transfer_and_no_device_mix(drafter: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill chunks (one after cached context), decode, verify blocks of 3 drafts, the DSpark drafter's
    forward on device anchors: each step reads the device once, through the packed transfer."""
    core, counter = _meta_engine(drafter, monkeypatch)
    assert core.runner.kv_caches[0][0].device.type == "meta"
    per_step = _run_steps(core, counter)
    assert len(per_step) >= 5 and per_step == [1] * len(per_step)


def test_the_guard_fails_on_an_injected_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    core, counter = _meta_engine(True, monkeypatch)
    verify = Verifier.verify

    def syncing_verify(self, inp):  # noqa: ANN001, ANN202
        out = verify(self, inp)
        int(out.num_accepted.max())  # a host read in the verifier
        return out

    monkeypatch.setattr(Verifier, "verify", syncing_verify)
    with pytest.raises(RuntimeError, match="meta"):
        _run_steps(core, counter)


def test_the_guard_fails_on_an_injected_device_mix() -> None:
    device_t = torch.zeros(4, device="meta")
    with DeviceGuard(), pytest.raises(MixedDeviceError):
        device_t.index_select(0, torch.tensor([0, 1]))  # a host index meeting a device tensor
    with DeviceGuard():
        assert (device_t * torch.tensor(2.0)).device.type == "meta"  # 0-dim host scalars are fine


@pytest.mark.parametrize("drafter", [True, False])
def test_step_metadata_reaches_the_device_in_one_copy(drafter: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``engine/staging.py``: every step's inputs, attention metadata, sampling metadata and the verifier's
    and drafter's index tensors (the DSpark drafter's block tables included) travel in one host-to-device
    copy; the drafter's own forward (counted apart by a nested guard) copies nothing."""
    core, counter = _meta_engine(drafter, monkeypatch)
    in_drafter: list[int] = []
    speculator = core.runner.speculator
    if speculator is not None:
        propose = speculator.propose

        def counted_propose(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            with DeviceGuard() as inner:
                out = propose(*args, **kwargs)
            in_drafter.append(inner.host_to_device)
            return out

        monkeypatch.setattr(speculator, "propose", counted_propose)
    uploads: list[int] = []
    per_step = _run_steps(core, counter, uploads)
    assert core.runner.batch.staging.copies == len(per_step)
    assert (len(in_drafter) >= 3) == drafter and sum(in_drafter) == 0, in_drafter
    assert uploads == [1] * len(per_step), uploads


def test_staging_packs_mixed_dtypes_and_structures_exactly() -> None:
    from sparkserve.engine.attention import build_attention_metadata
    from sparkserve.engine.staging import HostStaging

    meta = build_attention_metadata([3, 20, 1], [0, 4, 9], [3, 24, 10], [[0, 1], [2, 3, 4, 5, 6, 7], [8, 9, 10]], 4)
    extra = (torch.arange(5, dtype=torch.int32), torch.tensor([True, False, True]), torch.randn(3, 2))
    staging = HostStaging(torch.device("cpu"), capacity=64, pack_on_cpu=True)  # grows past 64 bytes
    for _ in range(3):  # buffers reused across steps
        staged_meta, staged_extra = staging.to_device((meta, extra))
        for name in ("slot_mapping", "short_q_index", "short_q_valid", "short_block_tables", "short_mask"):
            assert torch.equal(getattr(staged_meta, name), getattr(meta, name))
            assert getattr(staged_meta, name).data_ptr() != getattr(meta, name).data_ptr()
        assert torch.equal(staged_meta.prefills[0].slots, meta.prefills[0].slots)
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(staged_extra, extra, strict=True))
    assert staging.copies == 3
