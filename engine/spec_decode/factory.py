"""Building the drafter and the speculation controller from ``EngineArgs``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sparkserve.engine.config import EngineArgs
from sparkserve.engine.loader import LoadedModel
from sparkserve.engine.spec_decode.drafter import Drafter
from sparkserve.engine.spec_decode.dspark import DSparkDrafter
from sparkserve.engine.spec_decode.hybrid import HybridDrafter
from sparkserve.engine.spec_decode.suffix import load_suffix_drafter
from sparkserve.scheduler.policy.calibration import conservative_calibration
from sparkserve.scheduler.policy.controller import SpeculationController
from sparkserve.scheduler.policy.guard import SpeculationGuard
from sparkserve.scheduler.policy.spec import parse_policy
from sparkserve.scheduler.profile.grid import ThroughputProfile
from sparkserve.scheduler.profile.online import OnlineProfile

logger = logging.getLogger(__name__)

SHIPPED_DRAFTER = Path(__file__).resolve().parent / "weights" / "smollm2-135m-dspark"
# Draft vocabulary of the shipped drafter when serving (see DSparkDrafter.base_logits; measured in
# docs/benchmarks.md: the full 49,152-token LM head costs more than the target's decode at batch 64).
SHIPPED_DRAFT_VOCAB = 8192


def shipped_drafter_path() -> Path | None:
    """The DSpark drafter trained here for the embedded SmolLM2-135M, if it is installed."""
    return SHIPPED_DRAFTER if (SHIPPED_DRAFTER / "config.json").exists() else None


def effective_draft_vocab(args: EngineArgs) -> int | None:
    """The draft vocabulary a DSpark / DFlash drafter serves with: ``--draft-vocab-size``, else the
    shipped drafter's default for the embedded model, else the full vocabulary (None)."""
    if args.draft_vocab_size is not None:
        return args.draft_vocab_size
    return SHIPPED_DRAFT_VOCAB if args.drafter is None and args.model is None else None


def load_default_or_given_drafter(args: EngineArgs, loaded: LoadedModel, dtype: torch.dtype) -> Drafter | None:
    """The drafter of ``--speculative-method``: the checkpoint drafter (``_load_checkpoint_drafter``), the
    suffix drafter, or the hybrid of the two (which needs a DSpark / DFlash checkpoint).

    Raises:
        FileNotFoundError / ValueError: as ``_load_checkpoint_drafter``; ValueError for a hybrid without
            a DSpark / DFlash checkpoint.
    """
    if args.drafter == "none":
        return None
    if args.speculative_method == "suffix":
        return load_suffix_drafter(global_index=args.suffix_global)
    drafter = _load_checkpoint_drafter(args, loaded, dtype)
    if args.speculative_method == "dspark" or drafter is None:
        return drafter
    if not isinstance(drafter, DSparkDrafter):
        raise ValueError("--speculative-method hybrid needs a DSpark / DFlash drafter checkpoint")
    suffix = load_suffix_drafter(drafter.num_speculative_tokens, global_index=args.suffix_global)
    return HybridDrafter(drafter, suffix)


def _load_checkpoint_drafter(args: EngineArgs, loaded: LoadedModel, dtype: torch.dtype) -> Drafter | None:
    """The drafter to serve with, or None.

    ``--drafter none`` disables speculation; no ``--drafter`` means the shipped drafter for the
    embedded default model and no drafter for any other ``--model``.

    Raises:
        FileNotFoundError: ``--drafter PATH`` does not exist.
        ValueError: the checkpoint does not match the target (see ``load_drafter``).
    """
    if args.drafter == "none":
        return None
    path: Path | None
    if args.drafter is None:
        path = shipped_drafter_path() if args.model is None else None
        if path is None:
            return None
    else:
        path = Path(args.drafter)
        if not path.exists():
            raise FileNotFoundError(f"drafter checkpoint {path} does not exist")
    if args.drafter_kind == "draft-model":
        from sparkserve.engine.spec_decode.draft_model import DraftModelDrafter

        return DraftModelDrafter.load(path, args.num_draft_tokens, dtype, target_vocab=loaded.config.vocab_size,
                                      device=loaded.model.embed_tokens.weight.device)
    from sparkserve.engine.spec_decode.dspark_loader import load_drafter

    drafter = load_drafter(path, loaded.model.embed_tokens.weight, loaded.model.lm_head_weight, dtype=dtype,
                           device=loaded.model.embed_tokens.weight.device)
    vocab = effective_draft_vocab(args)
    if vocab is not None:
        if not 1 <= vocab <= drafter.config.vocab_size:
            raise ValueError(f"draft_vocab_size must be in [1, {drafter.config.vocab_size}], got {vocab}")
        drafter.draft_vocab_size = vocab
    has_head = drafter.config.markov_rank > 0
    if args.drafter_kind == "dflash" and has_head:
        raise ValueError(f"{path} has a Markov head: it is a DSpark drafter, not DFlash")
    logger.info("drafter %s (%s, block_size=%d)", path, args.drafter_kind, drafter.config.block_size)
    return drafter


def make_controller(args: EngineArgs, drafter: Drafter | None,
                    profile: ThroughputProfile | None = None) -> SpeculationController | None:
    """The speculation controller for ``--verify-policy`` (default ``dspark`` with a drafter).

    Returns None without a drafter (the scheduler then never sees drafts). Raises ValueError when the
    policy needs a throughput profile and none is given.
    """
    if drafter is None:
        return None
    spec = parse_policy(args.verify_policy or "dspark")
    online = OnlineProfile(profile) if profile is not None else None
    if spec.needs_profile and online is None:
        raise ValueError(f"verify policy {spec} needs a throughput profile (--profile PATH or start-up profiling)")
    return SpeculationController(spec, online, gate_drafting=args.draft_gate,
                                 num_lookahead_tokens=drafter.num_speculative_tokens,
                                 calibration=conservative_calibration() if args.online_calibration else None,
                                 guard=SpeculationGuard() if args.spec_guard and spec.needs_profile else None)
