"""One-process pipeline behind train/gpu_job.sh: load the target once, then gen-data -> DSpark ->
DFlash and AR at the SAME number of steps -> calibration -> offline tau evaluation, each phase under a
wall-clock budget; ``summary.json`` is rewritten after every phase so a cut-off run still reports.

Settings come from environment variables (see train/gpu_job.sh); SMOKE=1 shrinks everything so the
whole job runs on a CPU in a few minutes.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import torch

from sparkserve.engine.loader import load_model
from sparkserve.train.data import DEFAULT_PROMPTS, GenSettings, generate_dataset, read_samples, split_holdout
from sparkserve.train.evaluate import calibrate_on_holdout, evaluate
from sparkserve.train.trainer import TrainConfig, train


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def ship(drafter_dir: str, out: Path, name: str = "dspark_drafter") -> None:
    """Copy a drafter folder into ``out`` as a tar split under 15 MiB (device files come back <= 16 MiB)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(drafter_dir, arcname=name)
    data = buf.getvalue()
    for old in out.glob(f"{name}.tar.part-*"):
        old.unlink()
    part = 15 * 1024 * 1024
    for i in range(0, len(data), part):
        (out / f"{name}.tar.part-{i // part:02d}").write_bytes(data[i:i + part])


def main() -> None:
    smoke = env("SMOKE", "0") == "1"
    out = Path(env("OUT", "runs/gpu_job"))
    work = Path(env("WORK", str(out / "work")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(int(env("THREADS", "2" if smoke else "16")))
    summary: dict = {"device": device, "smoke": smoke, "torch": torch.__version__, "phases": {}}
    if device == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(0)
        torch.set_float32_matmul_precision("high")  # TF32 (the stable API; allow_tf32 is deprecated)

    def save(phase: str, value, t0: float) -> None:
        summary["phases"][phase] = {"seconds": round(time.monotonic() - t0, 1), **value}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"== {phase}: {json.dumps(summary['phases'][phase])[:400]}", flush=True)

    def failed(phase: str, exc: BaseException, t0: float) -> None:
        traceback.print_exc()
        save(phase, {"error": f"{type(exc).__name__}: {exc}"[:2000]}, t0)
        if device == "cuda":
            torch.cuda.empty_cache()

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    loaded = load_model(env("SPARKSERVE_MODEL_PATH", "") or None, dtype=torch.bfloat16, device=device)
    save("load", {"model": loaded.name}, t0)

    t0 = time.monotonic()
    gen = GenSettings(num_prompts=int(env("NUM_PROMPTS", "12" if smoke else "6000")), seed=0,
                      max_tokens=int(env("MAX_TOKENS", "32" if smoke else "256")),
                      chunk=int(env("GEN_CHUNK", "6" if smoke else "768")))
    data_dir = work / "data"
    generate_dataset(loaded, data_dir, env("PROMPTS", str(DEFAULT_PROMPTS)), gen, backend=env("GEN_BACKEND", "auto"),
                     time_budget_s=60 * float(env("GEN_MIN", "1" if smoke else "1.6")))
    samples = read_samples(data_dir, int(env("MAX_LEN", "640")))
    train_set, held = split_holdout(samples, float(env("HOLDOUT", "0.25" if smoke else "0.04")))
    save("gen-data", {"samples": len(samples), "train": len(train_set), "held_out": len(held),
                      "response_tokens": sum(len(s.ids) - s.loss_start for s in samples)}, t0)

    base = dict(target_layer_ids=tuple(int(x) for x in env("LAYERS", "1,8,15,22,28").split(",")),
                block_size=7, num_layers=int(env("DRAFT_LAYERS", "1")), markov_rank=int(env("MARKOV_RANK", "64")),
                num_anchors=int(env("ANCHORS", "8" if smoke else "64")),
                batch_seqs=int(env("BATCH", "2" if smoke else "48")),
                max_len=int(env("MAX_LEN", "640")), steps=int(env("STEPS", "6" if smoke else "400")),
                lr=float(env("LR", "6e-4")), device=device, ckpt_every=int(env("CKPT_EVERY", "200")),
                top_k=64)
    minutes = float(env("TRAIN_MIN", "0.5" if smoke else "1.5"))
    results, steps_done = {}, None
    for kind in ("dspark", "dflash", "ar"):
        t0 = time.monotonic()
        cfg = TrainConfig(kind=kind, stop_at_step=steps_done, max_minutes=minutes * (1.0 if kind == "dspark" else 1.3),
                          **base)
        try:
            res = train(loaded.model, train_set, cfg, work / kind, resume=True, progress=False)
        except Exception as exc:  # noqa: BLE001 - one failed drafter must not cost the others
            failed(f"train-{kind}", exc, t0)
            continue
        steps_done = steps_done or res["steps"]
        results[kind] = res["final"]
        if kind == "dspark":
            ship(res["final"], out)  # bring the drafter back even if a later phase runs out of time
        last = res["last"]
        save(f"train-{kind}", {"steps": res["steps"], "params": res["trainable_params"], "bytes": res["bytes"],
                               "loss": last.get("loss"), "accept_est": last.get("accept_est"),
                               "top1": last.get("top1"), "skipped_steps": res.get("skipped_steps", 0),
                               "last_error": res.get("last_error")}, t0)

    t0 = time.monotonic()
    if "dspark" in results:
        try:
            calib = calibrate_on_holdout(loaded, results["dspark"], str(data_dir),
                                         int(env("CALIB_PROMPTS", "4" if smoke else "64")),
                                         int(env("CALIB_TOKENS", "24" if smoke else "128")),
                                         float(env("HOLDOUT", "0.25" if smoke else "0.04")), 0, 64)
            save("calibrate", calib, t0)
            ship(results["dspark"], out)
        except Exception as exc:  # noqa: BLE001 - evaluate the uncalibrated drafters anyway
            failed("calibrate", exc, t0)

    t0 = time.monotonic()
    if not results:
        raise SystemExit("no drafter was trained; see summary.json")
    try:
        report = evaluate(loaded, results, out, env("EVAL_PROMPTS_DIR", "") or None,
                          int(env("EVAL_PROMPTS", "2" if smoke else "16")),
                          int(env("EVAL_TOKENS", "24" if smoke else "256")), [0.0, 1.0], 0, int(env("EVAL_BATCH", "40")))
    except Exception as exc:
        failed("eval", exc, t0)
        raise
    tau = report["tau"]
    ratio = {k.split("/", 1)[1]: round(v / tau[k.replace("dspark/", "dflash/")], 4)
             for k, v in tau.items() if k.startswith("dspark/") and tau.get(k.replace("dspark/", "dflash/"))}
    save("eval", {"tau": tau, "dspark_over_dflash": ratio}, t0)


if __name__ == "__main__":
    main()
