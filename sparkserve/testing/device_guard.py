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
    """Raises ``MixedDeviceError`` when an op's tensor arguments live on more than one device; an explicit
    host-to-device copy (``Tensor.to`` / ``copy_`` of a host tensor into a device one) is the one op allowed
    to, and is counted in ``host_to_device`` (the staged copies of ``engine/staging.py`` and any stray one)."""

    def __init__(self) -> None:
        super().__init__()
        self.host_to_device = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        kwargs = kwargs or {}
        if _is_host_to_device(func, args, kwargs):
            self.host_to_device += 1
            return func(*args, **kwargs)
        devices = {t.device for t in _tensors((*args, *kwargs.values())) if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            raise MixedDeviceError(f"{func} got tensors on {sorted(str(d) for d in devices)}")
        return func(*args, **kwargs)


def _is_host_to_device(func, args: tuple, kwargs: dict) -> bool:  # noqa: ANN001 - an OpOverload
    """``to`` / ``_to_copy`` of a host tensor onto another device (``to`` stays whole under inference mode), or
    ``copy_`` of a host tensor into a device one. ``torch.tensor(data, device=...)`` is not seen by a dispatch
    mode, so the runner builds host tensors and stages them (engine/staging.py) instead."""
    aten = torch.ops.aten
    if func.overloadpacket in (aten._to_copy, aten.to) and isinstance(args[0], torch.Tensor):
        target = kwargs.get("device")
        return args[0].device.type == "cpu" and target is not None and torch.device(target).type != "cpu"
    if func is aten.copy_.default:
        return args[1].device.type == "cpu" and args[1].dim() > 0 and args[0].device.type != "cpu"
    return False


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
