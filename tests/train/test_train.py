"""Drafter training pipeline on a TINY random Llama target: data generation, the dense target forward,
DSpark / DFlash / AR training (loss decreases, DeepSpec export, resume), calibration and the offline
speculative evaluator. Runs in well under a minute on one CPU core.

``SPARKSERVE_TEST_DEVICE=cuda`` runs the same tests on a GPU as a smoke test of every CUDA code path of
train/gpu_job.sh (bf16 autocast training, the paged generation loop, the evaluator); neither the gguf
package nor tests/conftest.py is needed:
    SPARKSERVE_TEST_DEVICE=cuda python3 -m pytest tests/train/test_train.py -q -x --noconftest -p no:cacheprovider
"""

from __future__ import annotations

import gzip
import json
import os
import types

import pytest
import torch

from sparkserve.engine.attention import build_attention_metadata, new_kv_cache
from sparkserve.engine.models.config import ModelConfig
from sparkserve.engine.models.llama import LlamaForCausalLM
from sparkserve.engine.spec_decode.dspark_loader import load_drafter
from sparkserve.train.calibrate import fit_temperatures
from sparkserve.train.data import GenSettings, Sample, generate_dataset, read_samples, split_holdout
from sparkserve.train.drafters import ARDrafter, load_any_drafter
from sparkserve.train.evaluate import calibrate_on_holdout, evaluate
from sparkserve.train.generate import generate_paged
from sparkserve.train.spec_eval import run_spec_decode
from sparkserve.train.target import dense_forward
from sparkserve.train.trainer import TrainConfig, train

DEVICE = torch.device(os.environ.get("SPARKSERVE_TEST_DEVICE", "cpu"))
CUDA = DEVICE.type == "cuda"
if CUDA and not torch.cuda.is_available():
    pytest.skip("SPARKSERVE_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)
TOL = 1e-4 if CUDA else 1e-5

torch.set_num_threads(1)
V, EOS = 48, 1


def tiny_target(seed: int = 0) -> LlamaForCausalLM:
    cfg = ModelConfig(architecture="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4,
                      rope_scaling=None, max_position_embeddings=256, tie_word_embeddings=True,
                      attention_bias=False, qk_norm=False, eos_token_id=EOS)
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm") or name == "norm":
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "embed" in name else 0.25))
    return model.to(DEVICE).eval()


@pytest.fixture(scope="module")
def setup():
    target = tiny_target()
    prompts = [[2 + (i * 7 + j) % (V - 3) for j in range(3 + i % 4)] for i in range(24)]
    outs = generate_paged(target, prompts, 24, {EOS}, 1.0, 1.0, None, seed=0)
    samples = [Sample(str(i), p + o, len(p)) for i, (p, o) in enumerate(zip(prompts, outs, strict=True))
               if len(o) >= 10]
    return target, samples, prompts


def cfg(kind: str, **kw) -> TrainConfig:
    base = dict(kind=kind, target_layer_ids=(0, 1, 2), block_size=4, markov_rank=8, num_anchors=8,
                batch_seqs=4, max_len=64, steps=40, lr=3e-3, top_k=8, ckpt_every=10, amp=False, max_bytes=None,
                device=str(DEVICE))
    return TrainConfig(**{**base, **kw})


def test_dense_forward_matches_paged(setup) -> None:
    target, samples, _ = setup
    ids = torch.tensor(samples[0].ids, device=DEVICE)
    n = len(ids)
    num_blocks = -(-n // 16)
    caches = [new_kv_cache(num_blocks, 16, 2, 8, torch.float32, DEVICE) for _ in range(4)]
    meta = build_attention_metadata([n], [0], [n], [list(range(num_blocks))], 16, device=DEVICE)
    ref_h, ref_aux = target(ids, torch.arange(n, device=DEVICE), caches, meta, aux_layer_ids=(0, 2))
    h, aux = dense_forward(target, ids[None], (0, 2))
    torch.testing.assert_close(h[0], ref_h, atol=TOL, rtol=TOL)
    torch.testing.assert_close(aux[0], ref_aux, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("kind", ["dspark", "dflash", "ar"])
def test_training_reduces_loss_and_exports(setup, tmp_path, kind) -> None:
    target, samples, _ = setup
    summary = train(target, samples, cfg(kind, amp=CUDA), tmp_path, progress=False)  # bf16 autocast on a GPU
    assert summary["skipped_steps"] == 0, summary["last_error"]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < first, (first, last)
    assert summary["steps"] == 40
    drafter = load_any_drafter(tmp_path / "final", target.embed_tokens.weight, target.lm_head_weight, device=DEVICE)
    assert isinstance(drafter, ARDrafter) == (kind == "ar")
    if kind != "ar":
        load_drafter(tmp_path / "final", target.embed_tokens.weight, target.lm_head_weight, device=DEVICE)


def test_equal_parameter_count(setup, tmp_path) -> None:
    target, samples, _ = setup
    sizes = {k: train(target, samples, cfg(k, steps=1), tmp_path / k, progress=False)["trainable_params"]
             for k in ("dspark", "ar")}
    assert abs(sizes["ar"] - sizes["dspark"]) / sizes["dspark"] < 0.02, sizes


def test_resume_is_exact(setup, tmp_path) -> None:
    target, samples, _ = setup
    train(target, samples, cfg("dspark", steps=20), tmp_path / "full", progress=False)
    train(target, samples, cfg("dspark", steps=20, stop_at_step=10), tmp_path / "part", progress=False)
    train(target, samples, cfg("dspark", steps=20), tmp_path / "part", resume=True, progress=False)
    a = torch.load(tmp_path / "full" / "ckpt" / "training_state.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "ckpt" / "training_state.pt", weights_only=False)["model"]
    for name in a:  # CUDA kernels (atomics in backward) are not bitwise deterministic
        torch.testing.assert_close(a[name], b[name], atol=1e-4 if CUDA else 1e-6, rtol=1e-3 if CUDA else 1e-5)


def test_calibration_and_offline_eval(setup, tmp_path) -> None:
    target, samples, prompts = setup
    train(target, samples, cfg("dspark"), tmp_path, progress=False)
    drafter = load_any_drafter(tmp_path / "final", target.embed_tokens.weight, target.lm_head_weight, device=DEVICE)
    for temp in (0.0, 1.0):
        res = run_spec_decode(target, drafter, prompts[:6], max_new_tokens=16, temperature=temp,
                              stop_ids={EOS}, seed=0)
        assert res.tau >= 1.0 and res.num_rounds > 0
        assert all(len(o) <= 16 for o in res.outputs)
    greedy = run_spec_decode(target, drafter, prompts[:6], 16, 0.0, {EOS}, seed=0)
    plain = generate_paged(target, prompts[:6], 16, {EOS}, 0.0, 1.0, None, seed=0)
    assert greedy.outputs == plain  # lossless under greedy
    temps = fit_temperatures(res.conf_logits, res.labels, res.num_drafted)
    assert len(temps) == 4 and all(t > 0 for t in temps)
    train_part, held = split_holdout(samples, 0.25)
    assert held and len(train_part) + len(held) == len(samples)


class CharTokenizer:
    """Stand-in for the real tokenizer: one id per character (ids 2..V-1), a trivial chat template."""

    stop_token_ids = (EOS,)
    eos_token_id = EOS

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<a>" if add_generation_prompt else "")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [2 + ord(c) % (V - 2) for c in text]


def test_gpu_job_phases(tmp_path) -> None:
    """The phases of train/pipeline.py on a bf16 target (as on the GPU): gen-data through the paged loop,
    bf16-autocast training of all three kinds, held-out calibration and the standalone evaluator."""
    target = tiny_target().to(torch.bfloat16)
    loaded = types.SimpleNamespace(model=target, config=target.config, tokenizer=CharTokenizer(), name="tiny-bf16")
    words = ["sum", "code", "list", "plan", "why", "sort", "add", "tree"]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(
        json.dumps({"id": f"p{i}", "kind": ("chat", "code", "math")[i % 3], "prompt": f"{words[i % 8]} {i}"}) + "\n"
        for i in range(18)))
    data_dir = tmp_path / "data"
    settings = GenSettings(num_prompts=18, seed=0, max_tokens=24, temperature=1.0, top_p=0.95, top_k=20, chunk=7)
    generate_dataset(loaded, data_dir, prompts_file, settings, backend="loop", time_budget_s=120)
    rows = [json.loads(x) for x in (data_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and all(1 <= len(r["response_ids"]) <= 24 for r in rows)
    samples = read_samples(data_dir, 64)
    train_set, _ = split_holdout(samples, 0.5)
    assert train_set
    results = {}
    for kind in ("dspark", "dflash", "ar"):
        res = train(target, train_set, cfg(kind, steps=3, amp=True, batch_seqs=2, ckpt_every=2),
                    tmp_path / kind, resume=True, progress=False)
        assert res["steps"] == 3 and res["skipped_steps"] == 0, res
        results[kind] = res["final"]
    calib = calibrate_on_holdout(loaded, results["dspark"], str(data_dir), 4, 12, 0.5, 0, 3)
    assert len(calib["temperatures"]) == 4 and calib["held_out_prompts"] > 0
    stored = load_any_drafter(results["dspark"], target.embed_tokens.weight, target.lm_head_weight).config
    assert list(stored.confidence_temperatures) == calib["temperatures"]
    assert list(stored.confidence_temperatures_greedy) == calib["temperatures_greedy"]
    assert set(calib["T=0"]) >= {"before", "after", "after_other_temperature_fit"}
    prompts_dir = tmp_path / "eval_prompts"
    prompts_dir.mkdir()
    (prompts_dir / "mt_bench_question.jsonl").write_text(
        "".join(json.dumps({"turns": [f"tell me {w}"]}) + "\n" for w in words))
    (prompts_dir / "HumanEval.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"prompt": f"def {w}():"}) + "\n" for w in words).encode()))
    (prompts_dir / "gsm8k_test.jsonl").write_text(
        "".join(json.dumps({"question": f"{i} + {i}?"}) + "\n" for i in range(8)))
    report = evaluate(loaded, results, tmp_path / "eval", str(prompts_dir), 2, 10, [0.0, 1.0], 0, 2)
    assert len(report["tau"]) == 3 * 3 * 2 and all(v >= 1.0 for v in report["tau"].values())
    assert (tmp_path / "eval" / "report.json").is_file()
    assert (tmp_path / "eval" / "acceptance_by_position.png").is_file()
