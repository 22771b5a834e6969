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


def _run_steps(core: EngineCore, counter: HostTransferCounter) -> list[int]:
    """Steps run under the guard (errors raise: no step-fault handler); host transfers per step."""
    per_step = []
    while core.has_unfinished_requests():
        plan = core.scheduler.schedule()
        before = counter.calls
        with DeviceGuard():
            out = core.runner.execute(plan)
        per_step.append(counter.calls - before)
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
