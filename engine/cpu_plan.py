"""A CPU plan measured on the host: the compute dtype and, per row bucket, the linear path that serves it.

Which matmul is fastest depends on the machine: with native bf16 (AVX-512 BF16 / AMX) the dense bf16 GEMM
wins above a few rows, without it (AVX2) bf16 is emulated and ~5x slower than fp32 at 64 rows, and the int4
GEMV pays at 1-8 rows on both (issue 22's table). So at the first start the engine times, for the model's
own decoder-layer linear shapes and row buckets M = 1, 2, 4, ... up to the step's token budget, every
available path (``PATHS``) in each candidate dtype, and :func:`select_plan` (pure) picks the fastest path per
bucket and the dtype. The plan is logged as one table and cached beside the throughput profile, under a
key that names the machine (:func:`cpu_signature`).

Paths are a registry (``LinearPath``): ``dense`` (``F.linear`` in the compute dtype), ``int4_gemv``
(torch's ``_weight_int4pack_mm_for_cpu``, activations in the compute dtype), ``int8_gemv`` (only under
``--quantization int8``); the weight-stationary int4 kernel (issue "A weight-stationary int4 kernel",
kernels/int4_cpu.py) registers as ``int4_ws`` where its extension is built. Every path computes with the
one canonical set of weight values of engine/quant.py, so the exactness rule holds whatever the plan.

What the engine applies: ``CpuPlan.routing()``, the plan's buckets and paths as engine/quant.py's
``Routing``, which ``quant_linear`` asks on every call for the path of its row count (the target's linears,
its LM head, and under ``--quantization int4`` the drafter's linears).
"""

from __future__ import annotations

import logging
import math
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from sparkserve.engine.quant import Routing

logger = logging.getLogger(__name__)

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "neon", "sve", "sve2", "bf16")
DTYPES = ("float32", "bfloat16")
PLAN_FORMAT_VERSION = 2  # 2: the LM head's own entry


# --------------------------------------------------------------------------- the machine
@dataclass(frozen=True)
class CpuSignature:
    """What a CPU timing is valid for.

    Attributes:
        model: the CPU model name (``/proc/cpuinfo``: "model name" / "CPU part"; else ``platform``).
        flags: the instruction-set flags of ``ISA_FLAGS`` the CPU has, sorted.
        capability: ATen's dispatch level (``torch.backends.cpu.get_cpu_capability()``: it follows
            ``ATEN_CPU_CAPABILITY``, so an AVX2 emulation on an AVX-512 machine gets its own key).
    """

    model: str
    flags: tuple[str, ...]
    capability: str

    def key(self) -> str:
        """One string for cache keys, e.g. ``AMD EPYC|avx2,avx512_bf16,avx512f|AVX512``."""
        return f"{self.model}|{','.join(self.flags)}|{self.capability}"


def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
    """(CPU model, the ``ISA_FLAGS`` present) from ``/proc/cpuinfo`` text (x86 ``flags``, Arm
    ``Features``); ("", ()) when neither is there."""
    model, flags = "", set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if not model and name in ("model name", "cpu model", "hardware"):
            model = value.strip()
        elif name in ("flags", "features"):
            flags.update(f for f in value.split() if f in ISA_FLAGS)
    return model, tuple(sorted(flags))


def cpu_signature(cpuinfo_path: str = "/proc/cpuinfo") -> CpuSignature:
    """This machine's :class:`CpuSignature`; without ``/proc/cpuinfo`` (macOS, Windows) the model is
    ``platform.processor()`` / ``platform.machine()`` and the flags are empty (the capability still tells
    ATen's level)."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            model, flags = parse_cpuinfo(f.read())
    except OSError:
        model, flags = "", ()
    model = model or platform.processor() or platform.machine() or "unknown"
    return CpuSignature(model, flags, torch.backends.cpu.get_cpu_capability())


# --------------------------------------------------------------------------- the path registry
@dataclass(frozen=True)
class LinearPath:
    """One way to compute ``x @ w.T`` for a linear of the model.

    Attributes:
        name: the plan's name for it.
        quantized: needs a quantised copy of the weights beside the dense one (more memory).
        batch_invariant: a row's output bits do not depend on how many rows share the call.
        build: ``build(weight [N, K] float32, dtype) -> fn`` with ``fn(x [M, K] dtype) -> [M, N]``; only
            for timing (the engine's own linears live in engine/quant.py). Raises RuntimeError where the
            path is unavailable on this machine or build.
        exact: computes the canonical product (the weights' values times x, fp32 accumulation); False
            for a path that also rounds the activations, offered only on request (:func:`lossy_paths_allowed`).
    """

    name: str
    quantized: bool
    batch_invariant: bool
    build: Callable[[torch.Tensor, torch.dtype], Callable[[torch.Tensor], torch.Tensor]]
    exact: bool = True


def _build_dense(weight: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    w = weight.to(dtype).contiguous()
    return lambda x: F.linear(x, w)


def _build_dense_fixed(weight: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    from sparkserve.engine.batch_invariant import invariant_linear

    w = weight.to(dtype).contiguous()
    return lambda x: invariant_linear(x, w, None)


def _build_int4(weight: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    from sparkserve.engine.quant import Routing, quantize_int4

    packed = quantize_int4(weight, dtype).pack_as(dtype, Routing.up_to(1 << 30, "int4_gemv"))
    return lambda x: packed(x, "int4_gemv")


def _build_int4_ws(weight: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    from sparkserve.engine.quant import Routing, quantize_int4
    packed = quantize_int4(weight, dtype).pack_as(dtype, Routing.up_to(1 << 30, "int4_ws"))
    return lambda x: packed(x, "int4_ws")


def _build_int4_ws_q8(weight: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    from sparkserve.engine.quant import Routing, quantize_int4

    packed = quantize_int4(weight, dtype).pack_as(dtype, Routing.up_to(1 << 30, "int4_ws_q8"))
    return lambda x: packed(x, "int4_ws_q8")


def _build_int8(weight: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    from sparkserve.engine.quant import quantize_int8

    return quantize_int8(weight, dtype, 1 << 30)[0]


PATHS: dict[str, LinearPath] = {
    "dense": LinearPath("dense", quantized=False, batch_invariant=False, build=_build_dense),
    "int4_gemv": LinearPath("int4_gemv", quantized=True, batch_invariant=False, build=_build_int4),
    "int8_gemv": LinearPath("int8_gemv", quantized=True, batch_invariant=False, build=_build_int8),
    # --batch-invariant's one path: the dense GEMM on rows padded to a fixed tile (engine/batch_invariant.py)
    "dense_fixed": LinearPath("dense_fixed", quantized=False, batch_invariant=True, build=_build_dense_fixed),
    # the weight-stationary kernel (kernels/int4_cpu.py): one fp32 fma chain per output, any M
    "int4_ws": LinearPath("int4_ws", quantized=True, batch_invariant=True, build=_build_int4_ws),
    # its int8-dot variant: activations rounded to int8 per group of 32 (not the canonical product: opt-in)
    "int4_ws_q8": LinearPath("int4_ws_q8", quantized=True, batch_invariant=True, build=_build_int4_ws_q8,
                             exact=False),
}


def lossy_paths_allowed() -> bool:
    """``SPARKSERVE_INT4_ACTIVATIONS=int8``: the plan may also choose paths that round the activations
    (``int4_ws_q8``); the text then differs from the canonical product's. Default: exact paths only."""
    value = os.environ.get("SPARKSERVE_INT4_ACTIVATIONS", "exact")
    if value not in ("exact", "int8"):
        raise ValueError(f"SPARKSERVE_INT4_ACTIVATIONS must be exact or int8, got {value!r}")
    return value == "int8"


def register_path(path: LinearPath) -> None:
    """Add a path to the registry (the weight-stationary int4 kernel registers ``int4_ws`` here)."""
    PATHS[path.name] = path


def candidate_paths(quantization: str, dtype: str, gguf: bool, batch_invariant: bool = False) -> tuple[str, ...]:
    """The registry paths a model loaded with ``quantization`` in ``dtype`` can serve (engine/loader.py's
    rule): dense always; the int4 paths for a GGUF file's blocks (``auto``, bf16 only: the fp32 int4
    kernel is scalar) and for ``int4``; int8 only under ``int8`` (its per-channel scales cannot express
    GGUF's per-32 blocks, so it is never the canonical weight of a GGUF model). Paths that are not exact
    only with :func:`lossy_paths_allowed`. ``batch_invariant``: the paths engine/quant.py may serve every
    row count with in that mode: for int4 weights the int4 kernels that agree bit for bit
    (``int4_ws``, and ``int4_gemv`` where ``int4_kernels_agree``: the same bits, so the plan picks the
    faster per bucket), never the dense copy; else ``dense_fixed``."""
    int4_weights = quantization == "int4" or (quantization == "auto" and gguf and dtype == "bfloat16")
    if batch_invariant:
        return _invariant_paths(int4_weights, dtype)
    int4 = tuple(name for name, p in PATHS.items() if name.startswith("int4") and (p.exact or lossy_paths_allowed()))
    if int4_weights:
        return ("dense", *int4)
    if quantization == "int8":
        return ("dense", "int8_gemv")
    return ("dense",)


def _invariant_paths(int4_weights: bool, dtype: str) -> tuple[str, ...]:
    """:func:`candidate_paths` in batch-invariant mode (engine/batch_invariant.py)."""
    from sparkserve.engine.quant import int4_kernels_agree
    from sparkserve.kernels import int4_cpu

    if not int4_weights or not int4_cpu.load():
        return ("dense_fixed",)
    return ("int4_gemv", "int4_ws") if int4_kernels_agree(getattr(torch, dtype)) else ("int4_ws",)


def row_buckets(max_rows: int) -> tuple[int, ...]:
    """1, 2, 4, ... (powers of two) below ``max_rows``, then ``max_rows`` itself."""
    if max_rows < 1:
        raise ValueError("max_rows must be >= 1")
    buckets, m = [], 1
    while m < max_rows:
        buckets.append(m)
        m *= 2
    return (*buckets, max_rows)


# --------------------------------------------------------------------------- selection (pure)
Timings = Mapping[tuple[str, str, int], float]  # (dtype, path, rows) -> seconds of the model's linears


@dataclass(frozen=True)
class CpuPlan:
    """The plan: a compute dtype and the path serving each row bucket.

    Attributes:
        dtype: "float32" or "bfloat16" (residual stream, norms, attention, KV cache, dense weights).
        buckets: increasing row counts M.
        paths: ``[len(buckets)]`` the path chosen for each bucket.
        quantized: path names that need the quantised weight copy (from the registry at selection).
        timings: the measurements the choice was made from (seconds).
        batch_invariant: selected under the batch-invariant restriction (one invariant path).
        lm_head: ``(max_rows, path)`` per LM-head bucket (:func:`select_lm_head`), beyond the last bucket
            dense; empty: the LM head follows :meth:`routing` like the decoder linears.
        lm_head_timings: the LM head's measurements (seconds of one call), keyed like ``timings``.
    """

    dtype: str
    buckets: tuple[int, ...]
    paths: tuple[str, ...]
    quantized: frozenset[str] = frozenset()
    timings: Mapping[tuple[str, str, int], float] = field(default_factory=dict, hash=False)
    batch_invariant: bool = False
    lm_head: tuple[tuple[int, str], ...] = ()
    lm_head_timings: Mapping[tuple[str, str, int], float] = field(default_factory=dict, hash=False)

    def path_for(self, rows: int) -> str:
        """The path serving ``rows`` rows: the smallest bucket >= rows (the last one beyond)."""
        for bucket, path in zip(self.buckets, self.paths, strict=True):
            if rows <= bucket:
                return path
        return self.paths[-1]

    @property
    def quant_max_rows(self) -> int:
        """The quantised prefix, for summaries (the engine applies :meth:`routing`): the largest bucket
        such that it and every smaller one chose a quantised path; 0 when the first bucket is dense."""
        cap = 0
        for bucket, path in zip(self.buckets, self.paths, strict=True):
            if path not in self.quantized:
                break
            cap = bucket
        return cap

    def routing(self) -> Routing:
        """The plan as engine/quant.py's per-call :class:`~sparkserve.engine.quant.Routing`: each bucket's
        path up to its row count (trailing dense buckets dropped: beyond the last limit is dense)."""
        from sparkserve.engine.quant import Routing

        limits = list(zip(self.buckets, self.paths, strict=True))
        while limits and limits[-1][1] == "dense":
            limits.pop()
        return Routing(tuple(limits))

    def lm_head_routing(self) -> Routing | None:
        """The LM head's own :class:`~sparkserve.engine.quant.Routing` (each run of buckets on one path as one
        limit, trailing dense dropped), or None when the plan has no LM-head entry (then :meth:`routing`
        serves it)."""
        from sparkserve.engine.quant import Routing

        if not self.lm_head:
            return None
        runs = [e for e, after in zip(self.lm_head, (*self.lm_head[1:], None), strict=True)
                if after is None or after[1] != e[1]]  # a run of buckets on one path: its largest
        while runs and runs[-1][1] == "dense":
            runs.pop()
        return Routing(tuple(runs))

    def summary(self) -> str:
        """A short stable string for cache keys, e.g. ``bfloat16:int4_gemv<=4,dense``."""
        runs: list[str] = []
        for i, path in enumerate(self.paths):
            if i + 1 < len(self.paths) and self.paths[i + 1] == path:
                continue
            runs.append(f"{path}<={self.buckets[i]}" if i + 1 < len(self.paths) else path)
        head = f"|head:{routing.summary() or 'dense'}" if (routing := self.lm_head_routing()) is not None else ""
        return f"{self.dtype}:{','.join(runs)}{'|invariant' if self.batch_invariant else ''}{head}"

    def table(self) -> str:
        """One readable table: rows M, milliseconds per path and dtype, the choice."""
        columns = sorted({(d, p) for d, p, _ in self.timings})
        short = {"float32": "fp32", "bfloat16": "bf16"}
        head = ["M", *(f"{p} {short.get(d, d)} ms" for d, p in columns), "chosen"]
        lines = [" | ".join(head)]
        for bucket, path in zip(self.buckets, self.paths, strict=True):
            cells = [f"{self.timings[(d, p, bucket)] * 1e3:.3f}" if (d, p, bucket) in self.timings else "-"
                     for d, p in columns]
            lines.append(" | ".join([str(bucket), *cells, f"{self.dtype} {path}"]))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        return {"version": PLAN_FORMAT_VERSION, "dtype": self.dtype, "buckets": list(self.buckets),
                "paths": list(self.paths), "quantized": sorted(self.quantized),
                "batch_invariant": self.batch_invariant,
                "timings": [[d, p, m, t] for (d, p, m), t in sorted(self.timings.items())],
                "lm_head": [list(e) for e in self.lm_head],
                "lm_head_timings": [[d, p, m, t] for (d, p, m), t in sorted(self.lm_head_timings.items())]}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> CpuPlan:
        if data.get("version") != PLAN_FORMAT_VERSION:
            raise ValueError(f"unsupported plan version {data.get('version')!r}")
        timings, head_timings = ({(str(d), str(p), int(m)): float(t) for d, p, m, t in data[name]}  # type: ignore[union-attr]
                                 for name in ("timings", "lm_head_timings"))
        return cls(str(data["dtype"]), tuple(int(b) for b in data["buckets"]),  # type: ignore[union-attr]
                   tuple(str(p) for p in data["paths"]), frozenset(data["quantized"]),  # type: ignore[union-attr, arg-type]
                   timings, bool(data["batch_invariant"]),
                   tuple((int(m), str(p)) for m, p in data["lm_head"]), head_timings)  # type: ignore[union-attr]


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes the weights may take, and what each dtype's formats need (bytes).

    Attributes:
        budget_bytes: memory the weights may use.
        dense_bytes: per dtype, the dense weights alone.
        quant_bytes: the quantised copies beside them (int4 / int8 codes and scales).
    """

    budget_bytes: int
    dense_bytes: Mapping[str, int]
    quant_bytes: int

    def fits(self, dtype: str, quantized: bool) -> bool:
        """Whether the dense weights in ``dtype`` (plus the quantised copy if ``quantized``) fit."""
        return self.dense_bytes[dtype] + (self.quant_bytes if quantized else 0) <= self.budget_bytes


def select_plan(
    timings: Timings, buckets: Sequence[int], dtypes: Sequence[str], paths: Sequence[str],
    quantized: frozenset[str] | None = None, memory: MemoryBudget | None = None, batch_invariant: bool = False,
    invariant_paths: frozenset[str] | None = None, same_bits: frozenset[str] = frozenset(),
) -> CpuPlan:
    """Pick the compute dtype and the fastest path per bucket from measured ``timings``.

    Per dtype, a path is eligible if it fits ``memory`` (a model that does not fit twice keeps one weight
    format: dense only); each bucket takes its fastest eligible path timed there (a path not timed at a
    bucket, e.g. pruned as far too slow, is not a candidate there; ties: the earlier in ``paths``). A dtype
    with a bucket no eligible path covers is out. The dtype is the one whose chosen times have the
    smallest sum of logs over the buckets (the geometric mean: every bucket's ratio counts the same, so a
    1024-row bucket does not outweigh decode); ties: the earlier in ``dtypes``. ``batch_invariant``
    (issue 24's ``--batch-invariant``): one path of ``invariant_paths``, timed on every bucket, serves all
    of them (mixing kernels by row count changes a row's bits with the batch), unless every eligible path
    is in ``same_bits`` (kernels that compute the same bits: each bucket then takes its fastest).

    Args:
        timings: (dtype, path, rows) -> seconds.
        quantized: the path names that need a quantised copy (default: from the registry).
        invariant_paths: the batch-invariant path names (default: from the registry).
        same_bits: path names known to give the same bits as each other (``int4_gemv`` and ``int4_ws``
            where ``int4_kernels_agree``).
    Raises:
        ValueError: no dtype has an eligible path timed on every bucket.
    """
    buckets = tuple(buckets)
    quantized = quantized if quantized is not None else frozenset(n for n, p in PATHS.items() if p.quantized)
    invariant = (invariant_paths if invariant_paths is not None
                 else frozenset(n for n, p in PATHS.items() if p.batch_invariant))
    best: tuple[float, CpuPlan] | None = None
    for dtype in dtypes:
        eligible = [p for p in paths if (memory is None or memory.fits(dtype, p in quantized))
                    and (not batch_invariant or p in invariant)]
        chosen = _choose(timings, buckets, dtype, eligible, batch_invariant and not set(eligible) <= same_bits)
        if chosen is None:
            continue
        score = sum(math.log(timings[(dtype, p, m)]) for p, m in zip(chosen, buckets, strict=True))
        if best is None or score < best[0]:
            relevant = {k: v for k, v in timings.items() if k[1] in paths and k[2] in buckets}
            best = (score, CpuPlan(dtype, buckets, chosen, quantized, relevant, batch_invariant))
    if best is None:
        raise ValueError(f"no dtype of {tuple(dtypes)} has a path of {tuple(paths)} timed on every bucket "
                         f"{buckets} within the memory budget")
    return best[1]


def _choose(timings: Timings, buckets: tuple[int, ...], dtype: str, eligible: list[str],
            one_path: bool) -> tuple[str, ...] | None:
    """The fastest eligible path per bucket (or the one path, timed everywhere, of least log-sum)."""
    if one_path:
        full = [p for p in eligible if all((dtype, p, m) in timings for m in buckets)]
        if not full:
            return None
        one = min(full, key=lambda p: (sum(math.log(timings[(dtype, p, m)]) for m in buckets), full.index(p)))
        return (one,) * len(buckets)
    chosen = []
    for m in buckets:
        timed = [p for p in eligible if (dtype, p, m) in timings]
        if not timed:
            return None
        chosen.append(min(timed, key=lambda p, m=m: (timings[(dtype, p, m)], timed.index(p))))
    return tuple(chosen)


def select_lm_head(timings: Timings, buckets: Sequence[int], dtype: str,
                   paths: Sequence[str]) -> tuple[tuple[int, str], ...]:
    """The LM head's own entry: per bucket the fastest of ``paths`` timed there in ``dtype`` (ties: the earlier
    in ``paths``). The LM head is the largest matmul ([vocab, hidden]: SmolLM2's Q8_0 head has two int4
    planes) and runs only on the sampled rows, so its crossover differs from the decoder linears' (probed:
    dense 1.3x faster at 9-16 rows where the decoder linears keep int4). Every path computes with the
    canonical weight values (engine/quant.py), so the choice changes speed, not the exactness rule.

    Raises:
        ValueError: a bucket where none of ``paths`` is timed.
    """
    chosen = _choose(timings, tuple(buckets), dtype, list(paths), one_path=False)
    if chosen is None:
        raise ValueError(f"the LM head has a bucket of {tuple(buckets)} where none of {tuple(paths)} is timed")
    return tuple(zip(buckets, chosen, strict=True))
