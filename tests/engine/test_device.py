"""Device placement plumbing on the CPU (the CUDA paths run in scripts/gpu_check.sh on a lent GPU)."""

from __future__ import annotations

import pytest
import torch

from sparkserve.cli import build_parser, engine_args_from
from sparkserve.engine.config import EngineArgs, resolve_device
from sparkserve.engine.core import EngineCore
from sparkserve.testing.tiny import tiny_target


def test_device_flags_parse_and_validate() -> None:
    ns = build_parser().parse_args(["serve", "--device", "cpu", "--gpu-memory-utilization", "0.8",
                                    "--attention-backend", "torch"])
    args = engine_args_from(ns)
    assert (args.device, args.gpu_memory_utilization, args.attention_backend) == ("cpu", 0.8, "torch")
    for bad in (dict(device="tpu"), dict(gpu_memory_utilization=1.5), dict(attention_backend="cudnn")):
        with pytest.raises(ValueError):
            EngineArgs(**bad)
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(ValueError, match="CUDA is not available"):
        EngineCore(EngineArgs(device="cuda", drafter="none"))


def test_explicit_cpu_serves_and_triton_backend_needs_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernel tests set 1 for the session (it admits the CPU)
    target = tiny_target(seed=2)
    core = EngineCore(EngineArgs(device="cpu", dtype="float32", num_kv_blocks=32, block_size=4, drafter="none"),
                      loaded=target)
    assert core.device.type == "cpu" and core.runner.kv_caches[0][0].device.type == "cpu"
    assert len(core.generate_batch([[3, 4, 5]], _params())[0]) == 5
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            EngineCore(EngineArgs(device="cpu", dtype="float32", num_kv_blocks=32, block_size=4, drafter="none",
                                  attention_backend="triton"), loaded=target)


def _params():
    from sparkserve.scheduler.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
