"""One host-to-device copy for a step's metadata, from persistent (pinned on CUDA) host buffers.

The step's attention metadata is built on the host (CPU tensors); :meth:`HostStaging.to_device` packs
every tensor of it into one persistent byte buffer (8-byte aligned), copies the used prefix to the device
in ONE ``non_blocking`` copy, and hands back the same structure holding views of the device copy.

On CUDA the buffers are pinned (page-locked: the copy is asynchronous DMA) and two alternate, each with an
event recorded after its copy: a buffer is refilled only after its copy of two steps ago has finished
(``Event.synchronize`` waits for that copy, not for the step in flight). Off CUDA a plain buffer is used and
the copy is an ordinary one (the ``meta`` device in the host-sync guard, the CPU under the interpreter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

_ALIGN = 8


class HostStaging:
    """Persistent staging buffers for one device (see the module docstring).

    Args:
        device: where the staged tensors go.
        capacity: initial bytes per buffer (grown by doubling when a step needs more).
        pack_on_cpu: pack and copy even when ``device`` is the CPU (tests check the packing's values).
    """

    def __init__(self, device: torch.device, capacity: int = 1 << 16, pack_on_cpu: bool = False) -> None:
        self.device = device
        self.pack_on_cpu = pack_on_cpu
        self.pinned = device.type == "cuda"
        self.buffers = [self._new(capacity) for _ in range(2 if self.pinned else 1)]
        self.events: list[torch.cuda.Event | None] = [None] * len(self.buffers)
        self.turn = 0
        self._slot = 0  # the buffer of the copy being made
        self.copies = 0  # host-to-device copies made (one per ``to_device`` / ``copy_into`` call)

    def _new(self, capacity: int) -> Tensor:
        return torch.empty(capacity, dtype=torch.uint8, pin_memory=self.pinned)

    def copy_into(self, tensors: Sequence[Tensor], dest: Tensor) -> None:
        """Pack host ``tensors`` in order and copy them into the persistent device byte buffer ``dest`` in one
        (on CUDA ``non_blocking``) copy; ``dest`` and its views come from :func:`packed_views` over the same
        shapes and dtypes (the static buffers of ``engine/step_graph.py``).

        Raises:
            ValueError: the packed bytes do not fill ``dest`` exactly.
        """
        host, _ = self._pack(list(tensors))
        if host.numel() != dest.numel():
            raise ValueError(f"{host.numel()} packed bytes for a {dest.numel()}-byte static buffer")
        dest.copy_(host, non_blocking=self.pinned)
        self._copied()

    def _pack(self, tensors: list[Tensor]) -> tuple[Tensor, list[int]]:
        """``tensors`` packed (8-byte aligned) into the next persistent host buffer: ``([total] uint8 view,
        offsets)``; waits for that buffer's previous copy (two calls ago) first."""
        offsets, total = _layout([(t.shape, t.dtype) for t in tensors])
        slot = self.turn
        self.turn = (self.turn + 1) % len(self.buffers)
        event = self.events[slot]
        if event is not None:
            event.synchronize()  # this buffer's previous copy (two steps ago) has finished
        if self.buffers[slot].numel() < total:
            self.buffers[slot] = self._new(max(total, 2 * self.buffers[slot].numel()))
        host = self.buffers[slot]
        for t, off in zip(tensors, offsets, strict=True):
            nbytes = t.numel() * t.element_size()
            host[off: off + nbytes].copy_(t.contiguous().view(-1).view(torch.uint8))
        self._slot = slot
        return host[:total], offsets

    def _copied(self) -> None:
        self.copies += 1
        if self.pinned:
            self.events[self._slot] = torch.cuda.Event()
            self.events[self._slot].record()

    def to_device(self, obj: object) -> object:
        """``obj`` (a tensor, dataclass, list or tuple of them; other values kept) with every host tensor
        replaced by a view of one device copy. Dataclasses are rebuilt with ``dataclasses.replace``."""
        if self.device.type == "cpu" and not self.pack_on_cpu:  # already there: no packing, no copy
            return obj
        tensors: list[Tensor] = []
        _collect(obj, tensors)
        if not tensors:
            return obj
        host, offsets = self._pack(tensors)
        device_bytes = host.to(self.device, non_blocking=self.pinned, copy=True)
        self._copied()
        views = {id(t): device_bytes[off: off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                 for t, off in zip(tensors, offsets, strict=True)}
        return _rebuild(obj, views)


def _layout(specs: Sequence[tuple[Sequence[int], torch.dtype]]) -> tuple[list[int], int]:
    """Byte offsets of tensors of these (shape, dtype) packed back to back, each 8-byte aligned, and the total."""
    offsets, total = [], 0
    for shape, dtype in specs:
        offsets.append(total)
        numel = 1
        for dim in shape:
            numel *= dim
        total += -(-numel * torch.empty((), dtype=dtype).element_size() // _ALIGN) * _ALIGN
    return offsets, total


def packed_nbytes(specs: Sequence[tuple[Sequence[int], torch.dtype]]) -> int:
    """Bytes of tensors of these (shape, dtype) packed as :func:`packed_views` lays them out."""
    return _layout(specs)[1]


def packed_views(specs: Sequence[tuple[Sequence[int], torch.dtype]], device: torch.device
                 ) -> tuple[Tensor, list[Tensor]]:
    """A zeroed device byte buffer and views of it with these (shape, dtype), in :meth:`HostStaging.copy_into`'s
    layout (static buffers that one copy fills)."""
    offsets, total = _layout(specs)
    packed = torch.zeros(total, dtype=torch.uint8, device=device)
    views = []
    for (shape, dtype), off in zip(specs, offsets, strict=True):
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        views.append(packed[off: off + nbytes].view(dtype).view(tuple(shape)))
    return packed, views


def _collect(obj: object, out: list[Tensor]) -> None:
    if isinstance(obj, Tensor):
        if obj.device.type == "cpu" and all(obj is not t for t in out):
            out.append(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _collect(getattr(obj, f.name), out)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _collect(item, out)


def _rebuild(obj: object, views: dict[int, Tensor]) -> object:
    if isinstance(obj, Tensor):
        return views.get(id(obj), obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _rebuild(getattr(obj, f.name), views) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, list):
        return [_rebuild(item, views) for item in obj]
    if isinstance(obj, tuple):
        return tuple(_rebuild(item, views) for item in obj)
    return obj
