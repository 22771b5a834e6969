"""CLI glue: ``add_subcommands(subparsers)`` registers gen-data, train-drafter, calibrate-drafter and
eval-drafter on the project's ``sparkserve`` parser; ``python -m sparkserve.train.cli ...`` runs them standalone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparkserve.train.data import MAX_PROMPT_TOKENS

LAYERS = "1,8,15,22,28"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _load_target(args: argparse.Namespace):
    from sparkserve.engine.loader import load_model

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    return load_model(args.model, dtype=dtype, device=args.device)


def cmd_gen_data(args: argparse.Namespace) -> None:
    from sparkserve.train.data import GenSettings, generate_dataset

    loaded = _load_target(args)
    s = GenSettings(num_prompts=args.num_prompts, seed=args.seed, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens, chunk=args.chunk)
    path = generate_dataset(loaded, Path(args.data_root) / args.name, args.prompts, s, args.backend,
                            args.max_minutes * 60 if args.max_minutes else None)
    print(f"samples: {path}")


def cmd_train(args: argparse.Namespace) -> None:
    from sparkserve.train.data import read_samples, split_holdout
    from sparkserve.train.trainer import TrainConfig, train

    loaded = _load_target(args)
    train_set, _ = split_holdout(read_samples(args.data, args.max_len), args.holdout, args.seed)
    cfg = TrainConfig(kind=args.kind, target_layer_ids=_ints(args.target_layers), block_size=args.block_size,
                      num_layers=args.layers, markov_rank=args.markov_rank, num_anchors=args.anchors,
                      batch_seqs=args.batch, max_len=args.max_len, steps=args.steps, stop_at_step=args.stop_at_step,
                      lr=args.lr, top_k=args.top_k, seed=args.seed, device=args.device, amp=not args.no_amp,
                      ckpt_every=args.ckpt_every, max_minutes=args.max_minutes)
    summary = train(loaded.model, train_set, cfg, args.out, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "last"}, indent=2))


def cmd_calibrate(args: argparse.Namespace) -> None:
    from sparkserve.train.evaluate import calibrate_on_holdout

    loaded = _load_target(args)
    print(json.dumps(calibrate_on_holdout(loaded, args.drafter, args.data, args.num_prompts, args.max_new_tokens,
                                          args.holdout, args.seed, args.batch), indent=2))


def cmd_eval(args: argparse.Namespace) -> None:
    from sparkserve.train.evaluate import evaluate

    loaded = _load_target(args)
    drafters = dict(item.split("=", 1) for item in args.drafter)
    report = evaluate(loaded, drafters, args.out, args.prompts_dir, args.num_prompts, args.max_new_tokens,
                      _temps(args.temperatures), args.seed, args.batch, backend=args.backend)
    print(json.dumps({"offline": report["tau"],
                      "engine": {k: round(v["tau"], 4) for k, v in report.get("engine", {}).items()}}, indent=2))


def _temps(text: str) -> list[float]:
    return [float(t) for t in text.split(",")]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="target GGUF / HF folder (default: embedded SmolLM2-135M)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)


def add_subcommands(subparsers) -> None:
    """Register the four training subcommands on an ``argparse`` subparsers object."""
    from sparkserve.train.data import DEFAULT_PROMPTS

    p = subparsers.add_parser("gen-data", help="regenerate target responses to training prompts")
    _common(p)
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    p.add_argument("--name", default="smollm2")
    p.add_argument("--data-root", default="data")
    p.add_argument("--num-prompts", type=int, default=3000)
    p.add_argument("--max-prompt-tokens", type=int, default=MAX_PROMPT_TOKENS)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--backend", default="auto", choices=("auto", "engine", "loop"))
    p.add_argument("--max-minutes", type=float, default=None)
    p.set_defaults(func=cmd_gen_data)

    p = subparsers.add_parser("train-drafter", help="train a DSpark / DFlash / AR drafter")
    _common(p)
    p.add_argument("--data", default="data/smollm2")
    p.add_argument("--out", required=True)
    p.add_argument("--kind", default="dspark", choices=("dspark", "dflash", "ar"))
    p.add_argument("--target-layers", default=LAYERS)
    p.add_argument("--block-size", type=int, default=7)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--markov-rank", type=int, default=64)
    p.add_argument("--anchors", type=int, default=48)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=640)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--stop-at-step", type=int, default=None)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--holdout", type=float, default=0.05)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "calibrate-drafter", help="sequential temperature scaling on held-out data",
        description="Fit the confidence head's temperature vectors at T=1 and T=0 on held-out prompts. Rewrites "
                    "DRAFTER/config.json (confidence_temperatures, confidence_temperatures_greedy) in place and "
                    "writes DRAFTER/calibration.json (ECE / AUC / Brier before and after).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(p)
    p.add_argument("--drafter", required=True, help="drafter folder (DeepSpec layout); modified in place")
    p.add_argument("--data", default="data/smollm2",
                   help="gen-data folder (hash held-out split) or PROMPTS.jsonl@N (prompts after the first N "
                        "of gen-data's seeded order, e.g. ../shared/data/train/train_prompts.jsonl@6000)")
    p.add_argument("--holdout", type=float, default=0.05, help="held-out fraction of a gen-data folder")
    p.add_argument("--num-prompts", type=int, default=64, help="held-out prompts to decode")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per prompt")
    p.add_argument("--batch", type=int, default=16, help="prompts decoded at once")
    p.set_defaults(func=cmd_calibrate)

    p = subparsers.add_parser("eval-drafter", help="accepted length, survival, calibration, repetition")
    _common(p)
    p.add_argument("--drafter", action="append", required=True, help="NAME=PATH (repeatable)")
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--prompts-dir", default=None)
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperatures", default="0,1")
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--backend", choices=("offline", "engine"), default="engine",
                   help="engine: also measure through the serving engine (same verification code as serving)")
    p.set_defaults(func=cmd_eval)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparkserve.train.cli")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
