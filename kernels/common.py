"""Small helpers shared by the kernel wrappers: interpreter detection, argument checks, sizes."""

from __future__ import annotations

import os

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, the CPU test mode).

    Read per call (cheap); Triton itself reads the variable when a ``@triton.jit`` function is
    decorated, so it must be set before the ``kernels`` modules are imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceil division of non-negative ints."""
    return -(-a // b)


def check_tensor(name: str, t: Tensor, ndim: int, dtypes: tuple[torch.dtype, ...], contiguous: bool = True) -> None:
    """Raise ValueError unless ``t`` has ``ndim`` dims, a dtype in ``dtypes`` and (if asked) is contiguous."""
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {dtypes}, got {t.dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_same_device(**tensors: Tensor) -> None:
    """Raise ValueError when the given tensors are not all on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must share one device, got {devices}")


def check_kernel_device(t: Tensor) -> None:
    """Raise ValueError when a kernel cannot run on ``t``'s device: CUDA, or any device in the interpreter."""
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")
