"""DSpark / DFlash drafter: paged forward vs a dense reference written from DEEPSPEC_FORMAT.md section 2,
Markov / confidence heads, and DeepSpec checkpoint I/O (section 1)."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sparkserve.engine.sampling.metadata import SamplingMetadata
from sparkserve.engine.spec_decode.drafter import DraftBatch
from sparkserve.engine.spec_decode.dspark import DSparkDrafter
from sparkserve.engine.spec_decode.dspark_loader import (
    DSparkConfig,
    load_drafter,
    random_drafter_config,
    save_drafter,
)
from sparkserve.kernels.keyed_random import request_key
from sparkserve.scheduler.sampling_params import SamplingParams

torch.set_num_threads(1)

D, V, B, H, HKV, HD, INTER, L, M, R = 64, 97, 4, 4, 2, 16, 96, 2, 3, 8
PAGE = 4  # KV block size of the paged pool


def make_config(markov_rank: int = R, confidence: bool = True, temps: tuple[float, ...] | None = None) -> DSparkConfig:
    return DSparkConfig(
        hidden_size=D, intermediate_size=INTER, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=HKV, head_dim=HD, vocab_size=V, target_layer_ids=(0, 2, 4), block_size=B,
        mask_token_id=V - 1, rope_theta=10000.0, markov_rank=markov_rank, enable_confidence_head=confidence,
        confidence_head_with_markov=confidence and markov_rank > 0,
        confidence_temperatures=temps,
    )


def make_drafter(config: DSparkConfig, seed: int = 0) -> DSparkDrafter:
    gen = torch.Generator().manual_seed(seed)
    embed, head = torch.randn(V, D, generator=gen), torch.randn(V, D, generator=gen) * 0.3
    drafter = DSparkDrafter(config, embed, head)
    drafter.reset_parameters(gen)
    with torch.no_grad():  # larger-than-default weights so every term matters numerically
        for name, p in drafter.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.15, generator=gen)
            else:
                p.uniform_(0.5, 1.5, generator=gen)
    return drafter.eval()


# ---------------------------------------------------------------- dense reference (spec section 2)
def ref_rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_rope(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    half = x.shape[-1] // 2  # rotate-half: pairs (i, i + hd/2) rotate by pos * theta^(-2i/hd)
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    ang = pos.double()[:, None, None] * freq
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()), -1)


def ref_block(w: dict[str, torch.Tensor], feats: torch.Tensor, anchor: int) -> torch.Tensor:
    """h = norm(x) [B, D] of one request whose context rows are feats [S, M*D] at positions 0..S-1."""
    w = {k: v.double() for k, v in w.items()}
    S = feats.shape[0]
    hctx = ref_rms(feats.double() @ w["fc.weight"].T, w["hidden_norm.weight"])
    x = w["embed_tokens.weight"][[anchor] + [V - 1] * (B - 1)]
    pos_ctx, pos_blk = torch.arange(S), torch.arange(S, S + B)
    for i in range(L):
        p = f"layers.{i}."
        xin = ref_rms(x, w[p + "input_layernorm.weight"])
        q = ref_rope(ref_rms((xin @ w[p + "self_attn.q_proj.weight"].T).view(B, H, HD),
                             w[p + "self_attn.q_norm.weight"]), pos_blk)
        kv_in = torch.cat((hctx, xin))
        k = (kv_in @ w[p + "self_attn.k_proj.weight"].T).view(S + B, HKV, HD)
        k = ref_rms(k, w[p + "self_attn.k_norm.weight"])
        k = ref_rope(k, torch.cat((pos_ctx, pos_blk)))
        v = (kv_in @ w[p + "self_attn.v_proj.weight"].T).view(S + B, HKV, HD)
        k, v = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * HD**-0.5, -1)  # no mask
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(B, H * HD) @ w[p + "self_attn.o_proj.weight"].T
        h2 = ref_rms(x, w[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(h2 @ w[p + "mlp.gate_proj.weight"].T)
        mlp = gate * (h2 @ w[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ w[p + "mlp.down_proj.weight"].T
    return ref_rms(x, w["norm.weight"])


def ref_heads(w: dict[str, torch.Tensor], h: torch.Tensor, prev: list[int], temps: tuple[float, ...]):
    """U, Z and confidences of one request given the previous tokens [anchor, x_0..x_{B-2}]."""
    w = {k: v.double() for k, v in w.items()}
    U = h @ w["lm_head.weight"].T
    if "markov_head.markov_w1.weight" not in w:
        return U, U, None
    e = w["markov_head.markov_w1.weight"][prev]  # [B, r]
    Z = U + e @ w["markov_head.markov_w2.weight"].T
    conf = None
    if "confidence_head.proj.weight" in w:
        logit = torch.cat((h, e), -1) @ w["confidence_head.proj.weight"].T + w["confidence_head.proj.bias"]
        conf = torch.sigmoid(logit[:, 0] / torch.tensor(temps, dtype=torch.float64))
    return U, Z, conf


def full_weights(drafter: DSparkDrafter) -> dict[str, torch.Tensor]:
    w = dict(drafter.state_dict())
    w["embed_tokens.weight"], w["lm_head.weight"] = drafter.embed_weight, drafter.lm_head_weight
    return w


# ---------------------------------------------------------------- serving-style harness
class Pool:
    """Shuffled physical blocks, per-request block tables, incremental context like a runner."""

    def __init__(self, drafter: DSparkDrafter, num_blocks: int = 40, seed: int = 0) -> None:
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.caches = drafter.make_kv_caches(num_blocks, PAGE, torch.float32)
        self.tables: list[list[int]] = []
        self.drafter = drafter

    def new_request(self) -> int:
        self.tables.append([])
        return len(self.tables) - 1

    def ensure(self, req: int, num_positions: int) -> None:
        while len(self.tables[req]) * PAGE < num_positions:
            self.tables[req].append(self.free.pop())

    def add(self, rows: list[tuple[int, int]], feats: list[torch.Tensor]) -> None:
        """rows: (request, position) pairs; feats: their feature rows (several requests in one call)."""
        slots = []
        for req, pos in rows:
            self.ensure(req, pos + 1)
            slots.append(self.tables[req][pos // PAGE] * PAGE + pos % PAGE)
        self.drafter.add_context(torch.stack(feats), torch.tensor([p for _, p in rows]),
                                 torch.tensor(slots), self.caches)

    def propose(self, anchors: list[int], starts: list[int], temps: list[float], seeds=None):
        for req, s in enumerate(starts):
            self.ensure(req, s + B)
        anchor_ids = torch.tensor(anchors)
        h = self.drafter.block_hidden_states(anchor_ids, starts, self.tables, PAGE, self.caches)
        out = self.drafter.propose(draft_batch(anchor_ids, starts, self.tables, self.caches, temps, seeds))
        return h, out


def draft_batch(anchor_ids: torch.Tensor, starts: list[int], tables, caches, temps: list[float], seeds=None) -> DraftBatch:
    """A DraftBatch of unseeded (free) or seeded (coupled) rows at the given temperatures."""
    seeds = seeds or [None] * len(starts)
    params = [SamplingParams(temperature=t, seed=sd) for t, sd in zip(temps, seeds, strict=True)]
    keys = [request_key(sd, f"row{i}") for i, sd in enumerate(seeds)]
    meta = SamplingMetadata.build(params, keys, [[]] * len(params), V)
    return DraftBatch(anchor_ids, torch.tensor(starts), max(starts), [list(t) for t in tables], PAGE, caches, meta,
                      tuple(sd is not None for sd in seeds))


def test_paged_forward_matches_dense_reference_incremental_context() -> None:
    temps = (1.0, 0.5, 2.0, 1.5)
    drafter = make_drafter(make_config(temps=temps))
    w = full_weights(drafter)
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 11, 2]
    feats = [torch.randn(n + 10, M * D, generator=gen) for n in lengths]  # rows for later rounds
    pool = Pool(drafter)
    for _ in lengths:
        pool.new_request()
    # context added in 3 calls, each mixing rows of several requests (like prefill chunks + verify)
    cuts = [[0, 2, 3, n] for n in lengths]
    for c in range(3):
        rows = [(r, p) for r, n in enumerate(lengths) for p in range(cuts[r][c], min(cuts[r][c + 1], n))]
        pool.add(rows, [feats[r][p] for r, p in rows])
    anchors = [3, 50, 96]
    for _ in range(2):  # second round: accepted rows overwrite the slots the first block wrote
        h, out = pool.propose(anchors, lengths, [0.0] * 3)
        for r, n in enumerate(lengths):
            h_ref = ref_block(w, feats[r][:n], anchors[r])
            torch.testing.assert_close(h[r].double(), h_ref, atol=2e-5, rtol=1e-4)
            # greedy Markov reference: left to right with prev = argmax of the previous slot
            prev = [anchors[r]]
            for k in range(B - 1):
                _, Z, _ = ref_heads(w, h_ref, prev + [0] * (B - 1 - k), temps)
                prev.append(int(Z[k].argmax()))  # Z_k only depends on prev_k
            U, Z, conf = ref_heads(w, h_ref, prev, temps)
            torch.testing.assert_close(drafter.base_logits(h)[r].double(), U, atol=1e-4, rtol=1e-4)
            assert out.token_ids[r].tolist() == Z.argmax(-1).tolist()
            assert out.token_ids[r, :-1].tolist() == prev[1:]
            torch.testing.assert_close(out.confidences[r].double(), conf, atol=1e-5, rtol=1e-4)
            assert out.draft_probs is None  # all-greedy batch: q is the one-hot draft, never materialised
        accepted = [2, 0, 3]  # anchor + accepted drafts become context rows at start..start+a
        rows = [(r, lengths[r] + i) for r in range(3) for i in range(accepted[r] + 1)]
        pool.add(rows, [feats[r][p] for r, p in rows])
        anchors = [int(out.token_ids[r, accepted[r]]) for r in range(3)]
        lengths = [n + a + 1 for n, a in zip(lengths, accepted, strict=True)]


def test_markov_head_uses_sampled_prev_and_q_is_softmax_z_over_t() -> None:
    drafter = make_drafter(make_config())
    w = full_weights(drafter)
    pool = Pool(drafter)
    feats = [torch.randn(n, M * D) for n in (3, 6)]
    for r, f in enumerate(feats):
        pool.new_request()
        pool.add([(r, p) for p in range(len(f))], list(f))
    temps = [0.7, 1.3]
    h, out = pool.propose([10, 20], [3, 6], temps)
    for r, anchor in enumerate((10, 20)):
        prev = [anchor] + out.token_ids[r, :-1].tolist()
        _, Z, conf = ref_heads(full_weights(drafter), h[r].double(), prev, (1.0,) * B)
        q_ref = torch.softmax(Z / temps[r], -1)
        torch.testing.assert_close(out.draft_probs[r].double(), q_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.confidences[r].double(), conf, atol=1e-5, rtol=1e-4)
        assert (out.draft_probs[r].gather(-1, out.token_ids[r, :, None]) > 0).all()
    # the Markov bias depends on prev: a different prev changes Z
    assert not torch.allclose(ref_heads(w, h[0].double(), [0] * B, (1.0,) * B)[1],
                              ref_heads(w, h[0].double(), [1] * B, (1.0,) * B)[1])
    # keyed randomness makes the draft reproducible (same request keys, same positions)
    _, again = pool.propose([10, 20], [3, 6], temps)
    assert torch.equal(again.token_ids, out.token_ids)


def test_greedy_requests_get_their_own_calibration_temperatures() -> None:
    """confidence_temperatures_greedy applies to greedy rows, confidence_temperatures to sampled rows of
    the same batch; the raw head is the same (checked against the uncalibrated drafter)."""
    sampled_t, greedy_t = (1.0, 0.5, 2.0, 1.5), (0.8, 3.0, 0.6, 1.1)
    drafter = make_drafter(make_config(temps=sampled_t))
    raw = make_drafter(make_config())
    raw.load_state_dict(drafter.state_dict())
    drafter.config = dataclasses.replace(drafter.config, confidence_temperatures_greedy=greedy_t)
    pools = [Pool(d) for d in (drafter, raw)]
    feats = [torch.randn(n, M * D, generator=torch.Generator().manual_seed(n)) for n in (4, 7)]
    for pool in pools:
        for r, f in enumerate(feats):
            pool.new_request()
            pool.add([(r, p) for p in range(len(f))], list(f))
    _, out = pools[0].propose([10, 20], [4, 7], [0.0, 1.0], [None, 3])
    _, ref = pools[1].propose([10, 20], [4, 7], [0.0, 1.0], [None, 3])
    assert torch.equal(out.token_ids, ref.token_ids)
    logit = torch.logit(ref.confidences.double())  # [2, B] raw logits (all temperatures 1)
    for row, temps in ((0, greedy_t), (1, sampled_t)):
        expect = torch.sigmoid(logit[row] / torch.tensor(temps, dtype=torch.float64))
        torch.testing.assert_close(out.confidences[row].double(), expect, atol=1e-5, rtol=1e-4)
    # a checkpoint without the greedy vector uses the sampled one for every row
    drafter.config = dataclasses.replace(drafter.config, confidence_temperatures_greedy=None)
    assert torch.equal(drafter.confidence_temperature_matrix([True, False]),
                       torch.tensor([sampled_t, sampled_t], dtype=torch.float32))
    with pytest.raises(ValueError, match="confidence_temperatures_greedy needs 4 positive values"):
        dataclasses.replace(drafter.config, confidence_temperatures_greedy=(1.0, 0.0, 1.0, 1.0))


def test_sampling_follows_q() -> None:
    """Empirical frequency of the first slot's token matches q_0 (one request, many draws)."""
    drafter = make_drafter(make_config())
    pool = Pool(drafter)
    pool.new_request()
    pool.add([(0, p) for p in range(4)], list(torch.randn(4, M * D)))
    pool.ensure(0, 4 + B)
    h = drafter.block_hidden_states(torch.tensor([7]), [4], pool.tables, PAGE, pool.caches)
    U = drafter.base_logits(h).expand(4000, B, V).clone()
    # 2000 free rows (own keyed stream each) and 2000 coupled rows (Gumbel noise of distinct seeds)
    batch = draft_batch(torch.full((4000,), 7), [4] * 4000, [pool.tables[0]] * 4000, pool.caches, [1.0] * 4000,
                        [None] * 2000 + list(range(2000)))
    out = drafter.sample_block(h.expand(4000, B, D), U, batch)
    q0 = out.draft_probs[0, 0]  # q of slot 0 = softmax(U_0 + Markov bias of the anchor), the same for every row
    torch.testing.assert_close(out.draft_probs[1999, 0], q0)
    for rows in (slice(0, 2000), slice(2000, 4000)):
        freq = torch.bincount(out.token_ids[rows, 0], minlength=V).float() / 2000
        assert 0.5 * (freq - q0).abs().sum() < 0.08


def test_dflash_variant_has_no_head_terms() -> None:
    config = make_config(markov_rank=0, confidence=False)
    drafter = make_drafter(config)
    assert not any(k.startswith(("markov_head", "confidence_head")) for k in drafter.state_dict())
    pool = Pool(drafter)
    pool.new_request()
    f = torch.randn(5, M * D)
    pool.add([(0, p) for p in range(5)], list(f))
    h, out = pool.propose([4], [5], [0.0])
    h_ref = ref_block(full_weights(drafter), f, 4)
    U, Z, conf = ref_heads(full_weights(drafter), h_ref, [0] * B, (1.0,) * B)
    assert conf is None and out.confidences is None
    assert out.token_ids[0].tolist() == U.argmax(-1).tolist()
    _, outs = pool.propose([4], [5], [0.9])
    torch.testing.assert_close(outs.draft_probs[0].double(), torch.softmax(U / 0.9, -1), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- checkpoint format (section 1)
def deepspec_names(n_layers: int, r: int) -> dict[str, list[int]]:
    """Names and shapes written out by hand from DEEPSPEC_FORMAT.md 1.3."""
    names = {"embed_tokens.weight": [V, D], "lm_head.weight": [V, D], "fc.weight": [D, M * D],
             "hidden_norm.weight": [D], "norm.weight": [D],
             "markov_head.markov_w1.weight": [V, r], "markov_head.markov_w2.weight": [V, r],
             "confidence_head.proj.weight": [1, D + r], "confidence_head.proj.bias": [1]}
    for i in range(L):
        names.update({f"layers.{i}.{k}": s for k, s in {
            "input_layernorm.weight": [D], "post_attention_layernorm.weight": [D],
            "self_attn.q_proj.weight": [H * HD, D], "self_attn.k_proj.weight": [HKV * HD, D],
            "self_attn.v_proj.weight": [HKV * HD, D], "self_attn.o_proj.weight": [D, H * HD],
            "self_attn.q_norm.weight": [HD], "self_attn.k_norm.weight": [HD],
            "mlp.gate_proj.weight": [INTER, D], "mlp.up_proj.weight": [INTER, D],
            "mlp.down_proj.weight": [D, INTER]}.items()})
    return names


def write_deepspec(folder: Path, drop: str | None = None, reshape: str | None = None,
                   shared: bool = True) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["Qwen3DSparkModel"], "model_type": "qwen3", "hidden_size": D,
              "intermediate_size": INTER, "num_hidden_layers": L, "num_attention_heads": H,
              "num_key_value_heads": HKV, "head_dim": HD, "hidden_act": "silu", "rms_norm_eps": 1e-6,
              "attention_bias": False, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
              "vocab_size": V, "num_target_layers": 6, "target_layer_ids": [0, 2, 4], "block_size": B,
              "mask_token_id": V - 1, "num_anchors": 512, "markov_rank": R, "markov_head_type": "vanilla",
              "enable_confidence_head": True, "confidence_head_with_markov": True,
              "layer_types": ["full_attention"] * L, "tie_word_embeddings": False, "dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(3)
    tensors = {n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in deepspec_names(L, R).items()}
    if not shared:
        del tensors["embed_tokens.weight"], tensors["lm_head.weight"]
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = torch.zeros(3, 5, dtype=torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return tensors


def test_deepspec_checkpoint_round_trip(tmp_path: Path) -> None:
    tensors = write_deepspec(tmp_path / "ck")
    drafter = load_drafter(tmp_path / "ck", None, None, torch.float32)
    state = full_weights(drafter)
    assert set(state) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(state[name], t.float()), name
    assert drafter.config.markov_rank == R and drafter.config.rope_theta == 10000.0
    pool = Pool(drafter)
    pool.new_request()
    pool.add([(0, p) for p in range(3)], list(torch.randn(3, M * D)))
    _, out = pool.propose([1], [3], [1.0])
    assert out.token_ids.shape == (1, B) and out.draft_probs.shape == (1, B, V)
    save_drafter(drafter, tmp_path / "out", include_shared=True)
    again = load_drafter(tmp_path / "out", None, None, torch.float32)
    for name, t in full_weights(again).items():
        assert torch.equal(t, state[name]), name
    assert again.config == drafter.config


def test_shared_weights_from_target_when_absent(tmp_path: Path) -> None:
    write_deepspec(tmp_path / "ck", shared=False)
    embed, head = torch.randn(V, D), torch.randn(V, D)
    drafter = load_drafter(tmp_path / "ck", embed, head, torch.float32)
    assert torch.equal(drafter.embed_weight, embed) and torch.equal(drafter.lm_head_weight, head)
    with pytest.raises(ValueError, match="embed_tokens.weight"):
        load_drafter(tmp_path / "ck", None, head, torch.float32)
    with pytest.raises(ValueError, match="hidden size"):
        load_drafter(tmp_path / "ck", torch.randn(V, 32), torch.randn(V, 32), torch.float32)


@pytest.mark.parametrize(
    "name", ["layers.1.self_attn.k_norm.weight", "fc.weight", "markov_head.markov_w2.weight"]
)
def test_missing_or_misshaped_tensor_is_a_clear_error(tmp_path: Path, name: str) -> None:
    shape = deepspec_names(L, R)[name]
    write_deepspec(tmp_path / "missing", drop=name)
    with pytest.raises(ValueError, match=re.escape(f"missing tensor '{name}' (expected shape {shape})")):
        load_drafter(tmp_path / "missing", None, None, torch.float32)
    write_deepspec(tmp_path / "bad", reshape=name)
    with pytest.raises(ValueError, match=re.escape(f"'{name}' has shape [3, 5], expected {shape}")):
        load_drafter(tmp_path / "bad", None, None, torch.float32)


def test_config_json_round_trip_and_random_config(tmp_path: Path) -> None:
    config = dataclasses.replace(make_config(temps=(1.0, 0.9, 0.8, 0.7)),
                                 confidence_temperatures_greedy=(0.5, 0.6, 0.7, 0.8))
    config.to_json(tmp_path / "c.json")
    assert DSparkConfig.from_json(tmp_path / "c.json") == config
    raw = json.loads((tmp_path / "c.json").read_text())
    raw.pop("rope_parameters")
    raw["rope_theta"] = 5.0
    assert DSparkConfig.from_dict(raw).rope_theta == 5.0
    with pytest.raises(ValueError, match="Gemma4"):
        DSparkConfig.from_dict({**raw, "architectures": ["Gemma4DSparkModel"]})
    target = {"hidden_size": D, "intermediate_size": INTER, "num_attention_heads": H,
              "num_key_value_heads": HKV,
              "vocab_size": V, "num_hidden_layers": 6, "rope_theta": 1e5, "rms_norm_eps": 1e-5}
    rnd = random_drafter_config(target, [1, 3], block_size=5, markov_rank=0, confidence=False)
    assert rnd.head_dim == D // H and rnd.mask_token_id == V - 1 and rnd.rope_theta == 1e5
    with pytest.raises(ValueError, match="final target layer"):
        random_drafter_config(target, [1, 5])
    with pytest.raises(ValueError, match="hidden size"):
        DSparkDrafter(rnd, torch.zeros(V, 32), torch.zeros(V, 32))
