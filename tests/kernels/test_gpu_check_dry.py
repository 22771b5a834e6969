"""scripts/gpu_check.py on the CPU with its carried files absent and no ``git`` (issue 26, breakage 3)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check_dry", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_without_git_or_carried_files_runs_the_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_check = _load()
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no git, no compiler
    monkeypatch.delenv("SPARKSERVE_MODEL_PATH", raising=False)
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)  # no data/gpu_a, data/gpu_b
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--dry-run"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["environment"]["commit"] is None and summary["staged"] == {}
    probe = json.loads((out / "phase0_probe.json").read_text())
    smoke = probe["engine_smoke"]
    assert probe["status"] == "ok" and smoke["device"] == "cpu"
    for policy in ("none", "fixed:3", "dspark fixed:3"):
        assert smoke[policy]["finish_errors"] == 0 and [len(t) for t in smoke[policy]["tokens"]] == [8, 8, 8]
    assert smoke["none"]["tokens"] == smoke["fixed:3"]["tokens"] == smoke["dspark fixed:3"]["tokens"]  # lossless


def test_probe_reports_error_finishes_and_serving_keeps_measured_cells(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_check = _load()

    def broken_execute(self, out):  # noqa: ANN001, ANN202
        raise RuntimeError("injected step fault")

    from sparkserve.engine.model_runner import ModelRunner

    monkeypatch.setattr(ModelRunner, "execute", broken_execute)
    smoke = gpu_check.engine_smoke("cpu", max_tokens=2)
    assert smoke["status"] == "failed" and smoke["none"]["finish_errors"] == 3
    monkeypatch.undo()

    calls = []

    def serve_policy(policy, prompts, args, deadline, result):  # noqa: ANN001, ANN202
        calls.append(policy)
        result["cells"].append({"policy": policy, "status": "ok"})
        if policy == "dspark":
            raise ValueError("drafter broke")

    monkeypatch.setattr(gpu_check, "serve_policy", serve_policy)
    monkeypatch.setattr(gpu_check, "serving_prompts", lambda: [[1, 2]])
    monkeypatch.setattr(gpu_check, "engine_is_wired", lambda: None)
    args = gpu_check.parse_args(["--out", str(tmp_path)])
    result = gpu_check.phase_serving(args, gpu_check.Deadline(100))
    assert calls == ["none", "dspark", "fixed:7"] and len(result["cells"]) == 3
    assert result["status"] == "failed" and "drafter broke" in result["errors"]["dspark"]["error"]


@pytest.mark.parametrize("window", ["1", "2", "3"])
def test_each_device_window_fits_its_limit_and_runs_dry(window: str, tmp_path: Path) -> None:
    gpu_check = _load()
    args = gpu_check.parse_args(["--out", str(tmp_path), "--window", window])
    ran = [p for p in gpu_check.PHASES if p not in args.skip]
    assert sum(getattr(args, f"budget_{p}") for p in ran) <= (120 if window == "1" else 150)
    if window != "1":  # window 1's CPU forms (probe, exactness) run in the tests above
        assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--window", window]) == 0
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert {p for p, r in summary["phases"].items() if r["status"] == "dry-run"} == set(ran)


def test_seeded_exactness_runs_dry_on_tiny_shapes_and_catches_a_wrong_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Window 1's exactness at tiny shapes on the CPU: the engine equals the reference; an engine whose
    model differs (an injected weight change) is caught."""
    gpu_check = _load()
    result = gpu_check.seeded_exactness("cpu", gpu_check.DRY_SHAPES, num_prompts=2, max_tokens=6)
    assert result["status"] == "ok", result
    assert all(v in ("identical", "near-tie") for name in gpu_check.DRY_SHAPES for policy in ("none", "fixed:3")
               for v in result[name][policy]["verdicts"])
    import copy

    real_deepcopy = copy.deepcopy

    def perturbed(obj, memo=None):  # noqa: ANN001, ANN202 - the engine's copy gets other embeddings
        clone = real_deepcopy(obj, memo)
        if memo is None and hasattr(clone, "embed_tokens"):
            clone.embed_tokens.weight.data.mul_(-1.0)
        return clone

    monkeypatch.setattr(copy, "deepcopy", perturbed)
    shapes = dict(list(gpu_check.DRY_SHAPES.items())[:1])
    assert gpu_check.seeded_exactness("cpu", shapes, num_prompts=2, max_tokens=6)["status"] == "failed"
