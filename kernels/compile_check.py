"""Compile the kernels for a CUDA target without a GPU (Triton frontend + NVIDIA backend down to cubin).

The interpreter (the CPU tests) runs kernels as Python and misses what only the compiler checks (types
of loop-carried values, layouts, lowering). This compiles the served variants for sm_90 (H100 / H200) on
any machine with Triton's NVIDIA backend (ptxas ships in the wheel) and prints each one's resources:
shared memory per block, ``num_warps``, ``num_stages``. A variant over ``SM90_SHARED_MEMORY_PER_BLOCK``
(the opt-in limit of sm_90, 232,448 B) fails. The figures come from the local Triton (3.7.1 here); the
device image's Triton (3.6) may choose differently, so the GPU probe reads the card's own limit.

Served attention variants: SmolLM2-135M (G = 9 / 3 = 3, hd 64) and Qwen3-0.6B (G = 16 / 8 = 2, hd 128),
bf16 and fp32, tiles of 16 / 32 / 64 rows (the short group: decode, verify blocks, drafter blocks; 64 is
also the long group's), with and without split-KV; and batch-invariant mode's (one tile shape per G, fixed
256-key splits, the fixed-order combine).

    TRITON_INTERPRET=0 python -m sparkserve.kernels.compile_check          # every variant (~3-5 minutes)
    TRITON_INTERPRET=0 python -m sparkserve.kernels.compile_check --quick  # four representative ones (CPU test)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
          torch.int64: "i64"}


@dataclass(frozen=True)
class Variant:
    """One kernel specialisation: pointer dtypes by name, other runtime args (ints / floats), constexprs."""

    name: str
    kernel: object  # a triton JITFunction
    args: dict


SM90_SHARED_MEMORY_PER_BLOCK = 232_448  # bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin on H100 / H200


@dataclass(frozen=True)
class Resources:
    """What one compiled variant needs per block (from Triton's kernel metadata)."""

    seconds: float
    shared_bytes: int
    num_warps: int
    num_stages: int

    def fits(self, limit: int = SM90_SHARED_MEMORY_PER_BLOCK) -> bool:
        return self.shared_bytes <= limit

    def __str__(self) -> str:
        return (f"shared={self.shared_bytes} B num_warps={self.num_warps} num_stages={self.num_stages} "
                f"({self.seconds:.1f} s)")


def compile_variant(variant: Variant, arch: int = 90) -> Resources:
    """Compile one variant; returns its resources. Raises whatever Triton raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = variant.kernel
    signature, constexprs = {}, {}
    for index, name in enumerate(fn.arg_names):
        value = variant.args[name]
        if fn.params[index].is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.dtype):
            signature[name] = "*" + _TYPES[value]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))
    meta = compiled.metadata
    return Resources(time.perf_counter() - start, int(meta.shared), int(meta.num_warps), int(meta.num_stages))


def _ints(*names: str) -> dict:
    return dict.fromkeys(names, 7)


def attention_variant(dtype: torch.dtype, group: int, block_m: int, head_dim: int, split: bool,
                      split_keys: int = 0) -> Variant:
    """The attention kernel at one tile shape; ``split_keys`` > 0: batch-invariant mode's fixed split of that
    many keys (kernels/attention_metadata.py ``INVARIANT_SPLIT_KEYS``)."""
    from sparkserve.kernels import paged_attention as pa

    partial = torch.float32 if split else dtype
    args = dict(q_ptr=dtype, k_cache_ptr=dtype, v_cache_ptr=dtype, out_ptr=dtype, o_partial_ptr=partial,
                lse_ptr=partial, scale_log2=0.18,
                QUERIES_PER_KV=group, BLOCK_Q=block_m // group, BLOCK_M=block_m, BLOCK_N=64, HEAD_DIM=head_dim,
                BLOCK_SIZE=16, SPLIT=split, UPCAST=False, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                SPLIT_KEYS=split_keys)
    args.update(dict.fromkeys(("cu_seqlens_q_ptr", "kv_lens_ptr", "start_pos_ptr", "causal_ptr", "block_tables_ptr",
                               "tile_seq_ptr", "tile_q_start_ptr"), torch.int32))
    args.update(_ints("num_splits", "scratch_rows", "stride_qt", "stride_qh", "stride_ch", "stride_cb", "stride_cs", "stride_bt",
                      "stride_ot", "stride_oh", "stride_ps", "stride_pt", "stride_ph", "stride_ls", "stride_lt"))
    mode = f" split_keys={split_keys}" if split_keys else ""
    return Variant(f"attention {dtype} G={group} M={block_m} hd={head_dim} split={split}{mode}",
                   pa._paged_attention_kernel, args)


def rejection_variant(has_q: bool) -> Variant:
    from sparkserve.kernels import rejection as rj

    args = dict(tokens_ptr=torch.int64, num_accepted_ptr=torch.int64, draft_ids_ptr=torch.int64, cu_ptr=torch.int32,
                agree_ptr=torch.int32, choice_ptr=torch.int64, p_ptr=torch.float32, q_ptr=torch.float32,
                one_hot_ptr=torch.int32, keys_ptr=torch.int64, first_pos_ptr=torch.int64, attempts_ptr=torch.int64,
                HAS_Q=has_q, BLOCK_R=1, BLOCK_V=1024, BLOCK_W=8,
                **_ints("stride_t", "stride_p", "stride_q", "vocab", "vocab_q", "width", "num_requests", "max_n"))
    return Variant(f"rejection has_q={has_q}", rj._rejection_kernel, args)


SERVED_SHAPES = {"smollm2-135m": (3, 64), "qwen3-0.6b": (2, 128)}  # (G = H / Hkv, head dim)


def _tag(dtype: torch.dtype) -> str:
    return "" if dtype == torch.bfloat16 else f" {_TYPES[dtype]}"


def combine_variant(head_dim: int, dtype: torch.dtype = torch.bfloat16, fixed_order: bool = False) -> Variant:
    """The split combine; ``fixed_order``: batch-invariant mode's sum in increasing split order."""
    from sparkserve.kernels import paged_attention as pa

    name = f"combine{_tag(dtype)} hd={head_dim}{' fixed_order' if fixed_order else ''}"
    return Variant(name, pa._combine_splits_kernel, dict(
        out_ptr=dtype, o_partial_ptr=torch.float32, lse_ptr=torch.float32, cu_seqlens_q_ptr=torch.int32,
        tile_seq_ptr=torch.int32, tile_q_start_ptr=torch.int32, BLOCK_Q=5, SPLITS_PAD=4, HEAD_DIM=head_dim,
        FIXED_ORDER=fixed_order,
        **_ints("num_splits", "scratch_rows", "stride_ot", "stride_oh", "stride_ps", "stride_pt", "stride_ph", "stride_ls",
                "stride_lt")))


def store_variant(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> Variant:
    from sparkserve.kernels import kv_store

    name = "store_kv" if head_dim == 64 and dtype == torch.bfloat16 else f"store_kv{_tag(dtype)} hd={head_dim}"
    return Variant(name, kv_store._store_kv_kernel, dict(
        k_ptr=dtype, v_ptr=dtype, k_cache_ptr=dtype, v_cache_ptr=dtype,
        slot_mapping_ptr=torch.int64, BLOCK_SIZE=16, HEAD_DIM=head_dim, HEADS_PAD=4,
        **_ints("num_kv_heads", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ch", "stride_cb", "stride_cs")))


def coupling_variant() -> Variant:
    from sparkserve.kernels import coupling

    return Variant("coupled_choice", coupling._coupled_choice_kernel, dict(
        logits_ptr=torch.float32, keys_ptr=torch.int64, positions_ptr=torch.int64, out_ptr=torch.int64, DRAW=0,
        BLOCK_R=1, BLOCK_V=1024, **_ints("stride_l", "num_rows", "vocab")))


def served_variants(group: int, head_dim: int, dtype: torch.dtype, batch_invariant: bool = False) -> list[Variant]:
    """The variants one model serves: attention in ``dtype`` at its G = H / Hkv and head dim (tiles of
    16 / 32 / 64 rows, with and without split-KV), the split combine and the KV store at its head dim, and
    the verification kernels; with ``batch_invariant`` (``--batch-invariant``) instead the mode's attention
    (one tile of ``invariant_block_m(G)`` rows, fixed ``INVARIANT_SPLIT_KEYS``-key splits, one split or
    several) and its fixed-order combine. This is the engine's warm-up list on CUDA (:func:`warm_up`) and, over
    ``SERVED_SHAPES`` in bf16 and fp32, both modes, what :func:`variants` checks: one source of truth."""
    from sparkserve.kernels.attention_metadata import INVARIANT_SPLIT_KEYS, invariant_block_m

    if batch_invariant:
        attention = [attention_variant(dtype, group, invariant_block_m(group), head_dim, split, INVARIANT_SPLIT_KEYS)
                     for split in (False, True)]
    else:
        attention = [attention_variant(dtype, group, block_m, head_dim, split)
                     for block_m in (16, 32, 64) for split in (False, True)]
    return [*attention, combine_variant(head_dim, dtype, fixed_order=batch_invariant), store_variant(head_dim, dtype),
            rejection_variant(True), rejection_variant(False), coupling_variant()]


def variants() -> Iterator[Variant]:
    """Every served specialisation (dtypes, head dims, tile shapes, split or not) and the other kernels:
    the union of ``served_variants`` over ``SERVED_SHAPES`` in bf16 and fp32, batch-invariant mode off and on,
    each once."""
    seen: set[str] = set()
    for dtype in (torch.bfloat16, torch.float32):
        for (group, head_dim), mode in ((shape, mode) for mode in (False, True) for shape in SERVED_SHAPES.values()):
            for variant in served_variants(group, head_dim, dtype, mode):
                if variant.name not in seen:
                    seen.add(variant.name)
                    yield variant


def warm_up(group: int, head_dim: int, dtype: torch.dtype, arch: int,
            limit: int = SM90_SHARED_MEMORY_PER_BLOCK,
            compile_fn: Callable[[Variant, int], Resources] | None = None,
            max_workers: int = 8, batch_invariant: bool = False) -> list[tuple[str, Resources]]:
    """Compile the model's ``served_variants`` for ``arch`` (e.g. 90) before the server reports ready: every
    served specialisation compiles for this card and fits its shared memory, or the engine fails at start
    instead of on a request. (The JIT's launches may specialise integer arguments differently, so the
    engine's graph capture, whose warm-up forward launches the real shapes, compiles those before ready
    too.) The variants compile in threads (``max_workers``; Triton's compiler and ptxas release the GIL for
    part of the time: 11 variants took 18 s with 4 threads vs 29 s one by one on a shared 2-core machine,
    0.04 s from Triton's cache). Returns each variant's name and resources; ``compile_fn`` replaces
    :func:`compile_variant` (dry runs on the CPU); ``batch_invariant``: the mode's variants.

    Raises:
        RuntimeError: a variant needs more shared memory per block than ``limit`` (the card's opt-in limit).
    """
    from concurrent.futures import ThreadPoolExecutor

    compile_fn = compile_fn or compile_variant
    served = served_variants(group, head_dim, dtype, batch_invariant)
    with ThreadPoolExecutor(max(1, min(max_workers, os.cpu_count() or 1))) as pool:
        compiled = list(pool.map(lambda v: compile_fn(v, arch), served))
    done = []
    for variant, resources in zip(served, compiled, strict=True):
        if not resources.fits(limit):
            raise RuntimeError(f"{variant.name}: {resources} over this card's {limit} B of shared memory per block")
        done.append((variant.name, resources))
    return done


def quick_variants() -> Iterator[Variant]:
    """A few representative ones (the CPU test): split decode attention in bf16 (default and batch-invariant
    mode), the mode's combine, rejection, coupling, store."""
    wanted = {"attention torch.bfloat16 G=3 M=16 hd=64 split=True", "rejection has_q=True", "coupled_choice", "store_kv",
              "attention torch.bfloat16 G=3 M=16 hd=64 split=True split_keys=256", "combine hd=64 fixed_order"}
    return (v for v in variants() if v.name in wanted)


def main(argv: list[str] | None = None) -> int:
    """Compile every variant (``--quick``: a few) and print its resources; exit status 1 when any fails to
    compile or needs more shared memory per block than sm_90 has."""
    argv = sys.argv[1:] if argv is None else argv
    failed = 0
    for variant in quick_variants() if "--quick" in argv else variants():
        try:
            resources = compile_variant(variant)
        except Exception as exc:  # report every variant
            failed += 1
            print(f"FAIL {variant.name}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
            continue
        if not resources.fits():
            failed += 1
            print(f"FAIL {variant.name}: {resources} over the sm_90 limit of {SM90_SHARED_MEMORY_PER_BLOCK} B",
                  flush=True)
            continue
        print(f"ok   {variant.name}: {resources}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
