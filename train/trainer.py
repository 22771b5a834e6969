"""``train-drafter``: DSpark / DFlash / autoregressive drafter training (DEEPSPEC_FORMAT.md section 4).

Each step: N sequences -> ONE frozen-target forward (features of ``target_layer_ids`` + top-K target
distributions, train/target.py) -> anchors (positions s with loss_mask[s] and loss_mask[s+1], up to A
per sequence, uniformly without replacement) -> blocks at s..s+B-1 -> dense drafter forward
(train/model.py) -> loss (train/losses.py) -> AdamW, warmup + cosine, clip 1.0.
Everything random (batch order, anchors) is a function of (seed, step), so a resumed run continues
exactly where it stopped. ``out_dir`` holds ``log.jsonl`` (loss terms per step), ``ckpt/`` (latest
export + fp32 training state, written every ``ckpt_every`` steps) and ``final/`` (the export).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from sparkserve.engine.models.llama import LlamaForCausalLM
from sparkserve.train.data import Sample
from sparkserve.train.drafters import export_drafter
from sparkserve.train.losses import LossWeights, dspark_loss
from sparkserve.train.model import block_hidden_states, build_drafter, make_config, trainable_parameters
from sparkserve.train.target import target_outputs


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (defaults sized for SmolLM2-135M; section 4 values where they apply)."""

    kind: str = "dspark"
    target_layer_ids: tuple[int, ...] = (1, 8, 15, 22, 28)
    block_size: int = 7
    num_layers: int = 1
    markov_rank: int = 64
    num_anchors: int = 48
    batch_seqs: int = 4
    max_len: int = 640
    steps: int = 1000
    stop_at_step: int | None = None  # end early (same schedule): equal-step baselines
    lr: float = 6e-4
    warmup_frac: float = 0.04
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    top_k: int = 64
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # bf16 autocast
    init_layer: int | None = None
    ckpt_every: int = 100
    max_minutes: float | None = None
    max_bytes: int | None = 24_000_000
    max_skipped_steps: int = 20  # non-finite loss / gradient steps tolerated (skipped) before stopping

    def __post_init__(self) -> None:
        if self.kind not in ("dspark", "dflash", "ar"):
            raise ValueError(f"kind must be dspark, dflash or ar, got {self.kind!r}")
        if self.steps < 1 or self.batch_seqs < 1 or self.num_anchors < 1:
            raise ValueError("steps, batch_seqs and num_anchors must be >= 1")


@dataclass
class Batch:
    """input_ids / loss_mask: [N, S]; anchors: [N, A] int64; keep: [N, A] bool (False = dummy)."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    anchors: torch.Tensor
    keep: torch.Tensor


def lr_factor(step: int, total: int, warmup_frac: float) -> float:
    """Linear warmup over ``warmup_frac`` of the steps, then cosine to 0."""
    warm = max(1, int(warmup_frac * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def make_batch(samples: list[Sample], step: int, cfg: TrainConfig) -> Batch:
    """Sequences of this step (epoch-wise seeded permutation) and their anchors."""
    per_epoch = max(1, len(samples) // cfg.batch_seqs)
    epoch, idx = divmod(step, per_epoch)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
    chosen = [samples[i] for i in order[idx * cfg.batch_seqs:(idx + 1) * cfg.batch_seqs].tolist()]
    seq_len = max(len(s.ids) for s in chosen)
    ids = torch.zeros(len(chosen), seq_len, dtype=torch.int64)
    mask = torch.zeros(len(chosen), seq_len, dtype=torch.bool)
    anchors = torch.zeros(len(chosen), cfg.num_anchors, dtype=torch.int64)
    keep = torch.zeros(len(chosen), cfg.num_anchors, dtype=torch.bool)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    for n, s in enumerate(chosen):
        ids[n, :len(s.ids)] = torch.tensor(s.ids)
        mask[n, s.loss_start:len(s.ids)] = True
        cands = (mask[n, :-1] & mask[n, 1:]).nonzero().squeeze(-1)  # s <= S-2
        pick = cands[torch.randperm(len(cands), generator=gen)[:cfg.num_anchors]].sort().values
        anchors[n, :len(pick)] = pick
        keep[n, :len(pick)] = True
    return Batch(ids, mask, anchors, keep)


def step_loss(drafter, target: LlamaForCausalLM, batch: Batch, cfg: TrainConfig, weights: LossWeights):
    """Target forward + drafter forward + loss for one batch (on ``cfg.device``)."""
    dev = torch.device(cfg.device)
    ids, mask = batch.input_ids.to(dev), batch.loss_mask.to(dev)
    anchors, keep = batch.anchors.to(dev), batch.keep.to(dev)
    n, s = ids.shape
    b = cfg.block_size
    tgt = target_outputs(target, ids, cfg.target_layer_ids, cfg.top_k)
    pos = anchors[:, :, None] + torch.arange(b, device=dev)  # [N, A, B] s+k
    nxt = pos + 1  # label positions s+1+k
    labels = ids.gather(1, nxt.clamp_max(s - 1).flatten(1)).view_as(pos)
    valid = (nxt < s) & mask.gather(1, nxt.clamp_max(s - 1).flatten(1)).view_as(pos) & keep[:, :, None]
    eval_mask = valid.long().cumprod(-1).bool()
    prev = ids.gather(1, pos.clamp_max(s - 1).flatten(1)).view_as(pos)  # [token_s, y_0 .. y_{B-2}]
    if cfg.kind == "ar":
        block_ids = prev
    else:
        block_ids = torch.full_like(prev, drafter.config.mask_token_id)
        block_ids[:, :, 0] = prev[:, :, 0]
    rows = pos.clamp_max(s - 1).flatten(1)  # target rows s+k

    def at(x: torch.Tensor) -> torch.Tensor:  # [N, S, ...] -> [N, A, B, ...]
        flat = x.gather(1, rows.view(n, -1, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))
        return flat.view(*pos.shape, *x.shape[2:])

    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.amp):
        h = block_hidden_states(drafter, tgt.features, anchors, block_ids, causal=cfg.kind == "ar")
        return dspark_loss(drafter, h, prev, labels, eval_mask, at(tgt.topk_ids), at(tgt.topk_probs),
                           at(tgt.rest_mass), weights)


def _save(drafter, opt, sched, step: int, cfg: TrainConfig, out: Path) -> None:
    tmp = out / "ckpt.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export_drafter(drafter, tmp)
    torch.save({"step": step, "model": drafter.state_dict(), "optim": opt.state_dict(),
                "sched": sched.state_dict(), "config": dataclasses.asdict(cfg)}, tmp / "training_state.pt")
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    tmp.rename(out / "ckpt")


def train(target: LlamaForCausalLM, samples: list[Sample], cfg: TrainConfig, out_dir: str | Path,
          resume: bool = False, progress: bool = True) -> dict:
    """Train one drafter; returns a summary dict (steps done, seconds, last losses, export path/bytes)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    config = make_config(cfg.kind, target, cfg.target_layer_ids, cfg.block_size, cfg.num_layers, cfg.markov_rank)
    drafter = build_drafter(cfg.kind, config, target, cfg.seed, cfg.init_layer, cfg.device)
    opt = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, cfg.steps, cfg.warmup_frac))
    weights = LossWeights.for_kind(cfg.kind)
    start = 0
    state_file = out / "ckpt" / "training_state.pt"
    if resume and state_file.is_file():
        state = torch.load(state_file, map_location=cfg.device, weights_only=False)
        drafter.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        start = state["step"]
    end = min(cfg.steps, cfg.stop_at_step or cfg.steps)
    t0, last = time.monotonic(), {}
    skipped, last_error = 0, None
    bar = tqdm(range(start, end), desc=f"train-{cfg.kind}", disable=not progress, initial=start, total=end)
    with (out / "log.jsonl").open("a") as log:
        for step in bar:
            opt.zero_grad(set_to_none=True)
            try:
                loss = step_loss(drafter, target, make_batch(samples, step, cfg), cfg, weights)
            except FloatingPointError as exc:  # non-finite loss: skip this batch, keep the weights
                loss = None
                last_error = str(exc)[:300]
            grad_norm = None
            if loss is not None:
                loss.total.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(drafter.parameters(), cfg.grad_clip)
                if not bool(torch.isfinite(grad_norm)):  # NaN / inf gradients: never let them reach AdamW
                    last_error = f"non-finite grad norm at step {step + 1}"
                    loss = None
            if loss is None:
                sched.step()  # the schedule stays a function of the step number
                skipped += 1
                opt.zero_grad(set_to_none=True)
                log.write(json.dumps({"step": step + 1, "skipped": True, "error": last_error}) + "\n")
                if skipped > cfg.max_skipped_steps:
                    _save(drafter, opt, sched, step + 1, cfg, out)
                    break
                continue
            opt.step()
            sched.step()
            last = {"step": step + 1, **loss.terms, "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0],
                    "accept_est": loss.accept_est, "top1": loss.top1, "elapsed_s": time.monotonic() - t0}
            log.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{loss.terms['loss']:.3f}", acc0=f"{(loss.accept_est[0] or 0):.2f}")
            done = step + 1
            over = cfg.max_minutes is not None and time.monotonic() - t0 > 60 * cfg.max_minutes
            if done % cfg.ckpt_every == 0 or done == end or over:
                _save(drafter, opt, sched, done, cfg, out)
            if over:
                break
    size = export_drafter(drafter, out / "final", cfg.max_bytes if cfg.kind == "dspark" else None)
    return {"kind": cfg.kind, "steps": last.get("step", start), "seconds": time.monotonic() - t0,
            "trainable_params": trainable_parameters(drafter), "bytes": size, "final": str(out / "final"),
            "last": last, "skipped_steps": skipped, "last_error": last_error}
