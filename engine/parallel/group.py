"""The tensor-parallel process group: rank, world size and the three collectives the sharded model and the
step loop use (Megatron-LM's tensor parallelism, Shoeybi et al. 2019, section 3).

- ``all_reduce``: sums the partial outputs of a row-parallel linear (``o_proj``, ``down_proj``); one per
  linear, so two per decoder layer.
- ``gather_vocab``: concatenates the vocab-parallel LM head's logit shards ``[N, V / tp]`` into ``[N, V]``.
- ``broadcast_object``: rank 0 hands each step's plan to the workers (over a gloo group also on CUDA,
  where the model's collectives go through NCCL).

Every rank gets bitwise the same all-reduce result (gloo and NCCL reduce each chunk once and copy it), so
the replicated parts of the step (norms, logits, sampling, the drafter) stay identical across ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from sparkserve.engine.models.config import ModelConfig


def check_tensor_parallel_size(config: ModelConfig, size: int) -> None:
    """Raise ValueError unless query heads, KV heads and the MLP width all divide by ``size``."""
    if size < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {size}")
    for name, value in (("num_attention_heads", config.num_attention_heads),
                        ("num_key_value_heads", config.num_key_value_heads),
                        ("intermediate_size", config.intermediate_size)):
        if value % size:
            raise ValueError(f"--tensor-parallel-size {size} does not divide the model's {name} ({value}): "
                             f"choose a size that divides {config.num_attention_heads} query heads, "
                             f"{config.num_key_value_heads} KV heads and {config.intermediate_size} MLP columns")


@dataclass
class CollectiveTimes:
    """Wall-clock seconds spent inside the model's collectives on this rank (the benchmark's all-reduce
    share); ``calls`` counts them."""

    seconds: float = 0.0
    calls: int = 0


@dataclass(frozen=True)
class TensorParallelGroup:
    """This process's place in the tensor-parallel group.

    Attributes:
        rank: 0 (the server: scheduler, sampler's results kept) .. world_size - 1.
        world_size: tp, the number of shards.
        device_group: the process group of the model's collectives (gloo on the CPU, NCCL on CUDA).
        cpu_group: a gloo group for the step messages (the same group on the CPU).
        times: time spent in the model's collectives.
    """

    rank: int
    world_size: int
    device_group: Any
    cpu_group: Any
    times: CollectiveTimes = field(default_factory=CollectiveTimes)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, {self.world_size})")

    def vocab_shard(self, vocab_size: int) -> tuple[int, int]:
        """Rows ``[start, end)`` of the LM head this rank holds; shards are ``ceil(V / tp)`` rows (the last
        shorter, zero-padded in the weight so every shard has the same shape for the all-gather)."""
        size = -(-vocab_size // self.world_size)
        start = min(self.rank * size, vocab_size)
        return start, min(start + size, vocab_size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks in place; returns it (same shape)."""
        start = time.perf_counter()
        dist.all_reduce(x, group=self.device_group)
        self._count(start)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[N, ceil(V / tp)] logit shards of every rank -> [N, V] (rank order, the padding cut off)."""
        start = time.perf_counter()
        parts = [torch.empty_like(logits) for _ in range(self.world_size)]
        dist.all_gather(parts, logits.contiguous(), group=self.device_group)
        self._count(start)
        return torch.cat(parts, dim=-1)[:, :vocab_size]

    def broadcast_object(self, obj: object | None) -> object:
        """Rank 0's ``obj`` on every rank (pickled over the gloo group); other ranks pass None."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def _count(self, start: float) -> None:
        self.times.seconds += time.perf_counter() - start
        self.times.calls += 1


def init_group(rank: int, world_size: int, port: int, device: torch.device, timeout_s: float = 600.0
               ) -> TensorParallelGroup:
    """Join the group over TCP on 127.0.0.1:``port`` (one host); NCCL for a CUDA ``device``, else gloo."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    return TensorParallelGroup(rank, world_size, dist.group.WORLD, cpu_group)


def destroy_group() -> None:
    """Leave the process group (no-op when none is open)."""
    if dist.is_initialized():
        dist.destroy_process_group()
