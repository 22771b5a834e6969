"""What every rank builds the same way: its shard of the target and a ``ModelRunner`` around it.

Each rank runs the whole step on the same plan (``engine/parallel/worker.py``): the shard's forward with
its all-reduces, the gathered logits, verification and sampling with the same random streams, and the
replicated drafter. Only rank 0's ``RunnerOutput`` reaches the scheduler; the workers' copies keep their
persistent batch, KV cache and drafter context in step with rank 0's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sparkserve.engine.loader import LoadedModel
from sparkserve.engine.model_runner import ModelRunner
from sparkserve.engine.parallel.group import TensorParallelGroup
from sparkserve.engine.parallel.shard import shard_model
from sparkserve.engine.quant import Routing
from sparkserve.engine.sampling.mask import LogitsMask
from sparkserve.engine.spec_decode.drafter import Drafter
from sparkserve.engine.spec_decode.speculator import Speculator

if TYPE_CHECKING:
    from sparkserve.engine.config import EngineArgs

# A picklable function every rank calls to get the full model and its drafter (None: no speculation);
# ``functools.partial`` of a module-level function.
ModelBuild = Callable[[], tuple[LoadedModel, Drafter | None]]


@dataclass(frozen=True)
class RunnerSettings:
    """The ``ModelRunner`` arguments every rank shares (rank 0's resolved values).

    Attributes:
        num_blocks: KV blocks per rank (each holds ``num_key_value_heads / tp`` heads of every block).
        block_size: tokens per block.
        dtype: "float32" or "bfloat16".
        max_num_seqs / max_model_len: persistent batch size.
        engine_seed: mixed into unseeded requests' random streams (the same on every rank).
        unseeded_coupling / attention_backend: as ``ModelRunner``.
    """

    num_blocks: int
    block_size: int
    dtype: str
    max_num_seqs: int
    max_model_len: int
    engine_seed: int = 0
    unseeded_coupling: bool = False
    attention_backend: str = "auto"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32


def build_rank_runner(tp: TensorParallelGroup, loaded: LoadedModel, drafter: Drafter | None,
                      settings: RunnerSettings, device: torch.device, mask: LogitsMask | None) -> ModelRunner:
    """Shard ``loaded`` for ``tp.rank`` and wrap it in a ``ModelRunner`` (the drafter replicated: it keeps the
    full embedding and LM head it was built with). Raises ValueError as ``shard_model``."""
    model = shard_model(loaded.model, tp)
    dtype = settings.torch_dtype
    speculator = None
    if drafter is not None:
        speculator = Speculator(drafter, settings.num_blocks, settings.block_size, dtype, settings.max_num_seqs)
    return ModelRunner(model, model.config, settings.num_blocks, settings.block_size, dtype, device=device,
                       speculator=speculator, max_num_seqs=settings.max_num_seqs,
                       max_model_len=settings.max_model_len, engine_seed=settings.engine_seed, mask=mask,
                       unseeded_coupling=settings.unseeded_coupling, attention_backend=settings.attention_backend)


def load_for_rank(args: EngineArgs, dtype: str, gemv_max_tokens: int | Routing, device: str) -> tuple[LoadedModel, Drafter | None]:
    """The server's ``ModelBuild``: ``args.model`` and its drafter, as rank 0 loaded them (rank 0's resolved
    dtype and quantised-GEMV cap; ``device``: "cpu" or "cuda")."""
    from sparkserve.engine.loader import load_model
    from sparkserve.engine.spec_decode.factory import load_default_or_given_drafter

    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    loaded = load_model(args.model, dtype=torch_dtype, device=device, quantization=args.quantization,
                        gemv_max_tokens=gemv_max_tokens)
    return loaded, load_default_or_given_drafter(args, loaded, torch_dtype)
