"""Build and locate this package's C++ torch extensions (kernels/cpu/*.cpp), once, into a cache folder.

Each extension is compiled by ``torch.utils.cpp_extension.load`` into
``$SPARKSERVE_KERNEL_CACHE/<stem>-<hash>`` (default cache ``~/.cache/sparkserve/kernels``), the hash covering
the source, the headers in the folder named after it (``cpu/int4_gemm.cpp`` includes ``cpu/int4_gemm/*.h``)
and the torch version, so an edited kernel or another torch builds anew and a stale library is never loaded. Flags: ``-O3``; ``-ffp-contract=off`` (no fused multiply-adds the source did not write, so
each rounding point is the one the source and its reference define); ``-fopenmp`` (``at::parallel_for``'s
OpenMP region is compiled in; libgomp.so.1 resolves to the copy torch already loaded, so the kernels run on
the engine's OpenMP team). No ``-march``: the sources dispatch on the CPU's flags at run time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


def library_path(source: Path, stem: str, extension: str, cflags: tuple[str, ...] = ()) -> Path:
    """Where the compiled ``extension`` of ``source`` lives (the file may not exist yet); ``cflags``, the
    extension's own flags beyond the shared ones, are part of the hash."""
    root = Path(os.environ.get("SPARKSERVE_KERNEL_CACHE", Path.home() / ".cache" / "sparkserve" / "kernels"))
    parts = sorted(source.with_suffix("").glob("*.h"))  # the source's own headers, in name order
    text = b"".join([source.read_bytes(), *(p.name.encode() + p.read_bytes() for p in parts)])
    digest = hashlib.sha256(text + torch.__version__.encode() + " ".join(cflags).encode()).hexdigest()[:16]
    return root / f"{stem}-{digest}" / f"{extension}.so"


def build(source: Path, stem: str, extension: str, verbose: bool = False, cflags: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` into :func:`library_path` with the shared flags and ``cflags`` (the install step runs
    this). Returns the library's path. Raises whatever torch.utils.cpp_extension raises when no compiler works."""
    from torch.utils.cpp_extension import load as cpp_load

    path = library_path(source, stem, extension, cflags)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpp_load(name=extension, sources=[str(source)], build_directory=str(path.parent), is_python_module=False,
             extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp", *cflags], extra_ldflags=["-fopenmp"], verbose=verbose)
    return path
