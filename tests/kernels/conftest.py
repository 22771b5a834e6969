"""Fixtures of the CPU kernel tests."""

from __future__ import annotations

import pytest

from sparkserve.kernels import int4_cpu


@pytest.fixture(scope="module")
def kernel() -> None:
    """The int4 CPU extension, loaded (built once into the cache if the install step did not)."""
    if not int4_cpu.load():
        try:
            int4_cpu.build()
        except Exception as exc:  # noqa: BLE001 - no compiler: the kernel cannot be tested here
            pytest.skip(f"int4 CPU kernel cannot be built here: {exc}")
        int4_cpu.load.cache_clear()
        assert int4_cpu.load()
