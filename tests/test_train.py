"""Drafter training pipeline on a TINY random Llama target: data generation, the dense target forward,
DSpark / DFlash / AR training (loss decreases, DeepSpec export, resume), calibration and the offline
speculative evaluator. Runs in well under a minute on one CPU core."""

from __future__ import annotations

import json

import pytest
import torch

from engine.attention import build_attention_metadata
from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.spec.dspark_loader import load_drafter
from train.calibrate import fit_temperatures
from train.data import Sample, split_holdout
from train.drafters import ARDrafter, load_any_drafter
from train.generate import generate_paged
from train.spec_eval import run_spec_decode
from train.target import dense_forward
from train.trainer import TrainConfig, train

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
    return model.eval()


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
                batch_seqs=4, max_len=64, steps=40, lr=3e-3, top_k=8, ckpt_every=10, amp=False, max_bytes=None)
    return TrainConfig(**{**base, **kw})


def test_dense_forward_matches_paged(setup) -> None:
    target, samples, _ = setup
    ids = torch.tensor(samples[0].ids)
    n = len(ids)
    shape = (-(-n // 16), 16, 2, 8)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(4)]
    meta = build_attention_metadata([n], [0], [n], [list(range(shape[0]))], 16)
    ref_h, ref_aux = target(ids, torch.arange(n), caches, meta, aux_layer_ids=(0, 2))
    h, aux = dense_forward(target, ids[None], (0, 2))
    torch.testing.assert_close(h[0], ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux[0], ref_aux, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dspark", "dflash", "ar"])
def test_training_reduces_loss_and_exports(setup, tmp_path, kind) -> None:
    target, samples, _ = setup
    summary = train(target, samples, cfg(kind), tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < first, (first, last)
    assert summary["steps"] == 40
    drafter = load_any_drafter(tmp_path / "final", target.embed_tokens.weight, target.lm_head_weight)
    assert isinstance(drafter, ARDrafter) == (kind == "ar")
    if kind != "ar":
        load_drafter(tmp_path / "final", target.embed_tokens.weight, target.lm_head_weight)


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
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


def test_calibration_and_offline_eval(setup, tmp_path) -> None:
    target, samples, prompts = setup
    train(target, samples, cfg("dspark"), tmp_path, progress=False)
    drafter = load_any_drafter(tmp_path / "final", target.embed_tokens.weight, target.lm_head_weight)
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
