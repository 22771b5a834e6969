"""A guard for device mixing and host syncs on a machine without a GPU (issue 26).

The runner's step runs with the model, caches and step tensors on PyTorch's ``meta`` device (shapes, no
data). There, a device-to-host read (``.item()``, ``.tolist()``, ``int(t)``, ``bool(t)``, ``.cpu()``, a
boolean-mask index, a ``repeat_interleave`` without ``output_size``) raises, as it would sync on CUDA.
:class:`DeviceGuard` also raises when one op meets tensors of two devices (a host tensor where the device's
was meant; 0-dim host scalars are allowed), which ``meta`` alone lets through for indexing.
The step's one legitimate transfer (``model_runner._to_host``) is replaced by :func:`fake_host_step`,
which counts its calls and answers plausible values of the right shapes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparkserve.engine import model_runner


class MixedDeviceError(RuntimeError):
    """One op got tensors on two devices."""


class DeviceGuard(TorchDispatchMode):
    """Raises ``MixedDeviceError`` when an op's tensor arguments live on more than one device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        kwargs = kwargs or {}
        devices = {t.device for t in _tensors((*args, *kwargs.values())) if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            raise MixedDeviceError(f"{func} got tensors on {sorted(str(d) for d in devices)}")
        return func(*args, **kwargs)


def _tensors(values: tuple) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(tuple(value))


class HostTransferCounter:
    """Stands in for ``model_runner._to_host`` (monkeypatch it): counts calls; every emitted block is the
    anchor token ``token`` with no draft accepted, every draft ``draft`` with confidence 0.9."""

    def __init__(self, token: int = 5, draft: int = 7) -> None:
        self.calls = 0
        self.token, self.draft = token, draft

    def __call__(self, verified, drafted) -> model_runner._HostStep:  # noqa: ANN001 - model_runner's types
        self.calls += 1
        rows = [] if verified is None else [[self.token] * verified.token_ids.shape[1]
                                            for _ in range(verified.token_ids.shape[0])]
        num_drafts, width = (0, 0) if drafted is None else tuple(drafted.output.token_ids.shape)
        conf = None if drafted is None or drafted.output.confidences is None else [[0.9] * width] * num_drafts
        return model_runner._HostStep(rows, [0] * len(rows), [[self.draft] * width for _ in range(num_drafts)], conf)
