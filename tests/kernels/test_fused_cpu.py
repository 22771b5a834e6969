"""The fused CPU step's ops (kernels/fused_cpu.py) against the eager decoder layer they replace: one layer over
decode and verify-shaped steps of ragged sequences, fp32 and bf16, with and without q / k norm; the KV cache
they write; and the refusal of inconsistent inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparkserve.engine.attention import build_attention_metadata, new_kv_cache
from sparkserve.engine.models.config import ModelConfig
from sparkserve.engine.models.llama import DecoderLayer, rms_norm, rope_inv_freq
from sparkserve.kernels import fused_cpu

pytestmark = pytest.mark.skipif(not fused_cpu.load(), reason="fused CPU extension not built (scripts/setup.sh)")

BLOCK_SIZE = 4
NUM_BLOCKS = 40
# fp32: only the order of fp32 sums differs; bf16: a rounding point may land on the other side (1 bf16 ulp
# of an intermediate, amplified a little by the layer)
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=6e-2, rtol=3e-2)}


def _config(qk_norm: bool) -> ModelConfig:
    return ModelConfig(
        architecture="qwen3" if qk_norm else "llama", vocab_size=50, hidden_size=64, intermediate_size=96,
        num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        rope_theta=10000.0, rope_scaling=None, max_position_embeddings=256, tie_word_embeddings=False,
        attention_bias=qk_norm, qk_norm=qk_norm, bos_token_id=None, eos_token_id=1)


def _layer(config: ModelConfig, dtype: torch.dtype) -> DecoderLayer:
    layer = DecoderLayer(config, dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 1.0 if "norm" in name else 0.25
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name
                    else scale * torch.randn(p.shape, generator=gen))
    return layer


def _step(config: ModelConfig, dtype: torch.dtype, q_lens: list[int], contexts: list[int]):
    """A step of sequences with ``contexts`` cached tokens and ``q_lens`` new ones, over a filled cache."""
    gen = torch.Generator().manual_seed(1)
    per_seq = NUM_BLOCKS // len(q_lens)
    tables = [list(range(i * per_seq, (i + 1) * per_seq))[::-1] for i in range(len(q_lens))]  # scattered blocks
    kv_lens = [c + q for c, q in zip(contexts, q_lens, strict=True)]
    meta = build_attention_metadata(q_lens, contexts, kv_lens, tables, BLOCK_SIZE)
    cache = new_kv_cache(NUM_BLOCKS, BLOCK_SIZE, config.num_key_value_heads, config.head_dim, dtype)
    for c in cache:
        c.copy_(torch.randn(c.shape, generator=gen).to(dtype))
    positions = torch.cat([torch.arange(c, c + q) for c, q in zip(contexts, q_lens, strict=True)])
    freqs = torch.outer(torch.arange(256, dtype=torch.float32), rope_inv_freq(config))
    cos, sin = freqs.cos().to(dtype)[positions].unsqueeze(1), freqs.sin().to(dtype)[positions].unsqueeze(1)
    x = torch.randn(len(positions), config.hidden_size, generator=gen).to(dtype)
    return x, cos, sin, cache, meta, positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("q_lens,contexts", [([1], [0]), ([1], [37]), ([1, 1, 1], [5, 0, 22]), ([4, 1, 8], [9, 30, 3])])
def test_fused_layer_matches_eager(dtype: torch.dtype, qk_norm: bool, q_lens: list[int], contexts: list[int]) -> None:
    config = _config(qk_norm)
    layer = _layer(config, dtype)
    x, cos, sin, cache, meta, positions = _step(config, dtype, q_lens, contexts)
    eager_cache = tuple(c.clone() for c in cache)
    expected = layer(x, cos, sin, eager_cache, meta)
    residual, delta = layer.forward_fused(x, None, cos.contiguous(), sin.contiguous(), cache, meta, positions)
    got = residual + delta
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])
    for fused_c, eager_c in zip(cache, eager_cache, strict=True):  # the new keys / values at their slots
        torch.testing.assert_close(fused_c.float(), eager_c.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_and_silu_mul(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    x, delta = (torch.randn(5, 72, generator=gen).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(72, generator=gen)).to(dtype)
    summed, normed = fused_cpu.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(summed, x + delta)  # the residual add rounds once, as eager does
    torch.testing.assert_close(normed, rms_norm(x + delta, weight, 1e-6), **TOLERANCE[dtype])
    copy, normed_x = fused_cpu.add_rms_norm(x, None, weight, 1e-6)
    assert torch.equal(copy, x) and copy.data_ptr() != x.data_ptr()
    torch.testing.assert_close(normed_x, rms_norm(x, weight, 1e-6), **TOLERANCE[dtype])
    gate_up = torch.randn(3, 2 * 40, generator=gen).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused_cpu.silu_mul(gate_up), F.silu(gate) * up, **TOLERANCE[dtype])


def test_bad_inputs_are_refused() -> None:
    config = _config(False)
    x, cos, sin, cache, meta, positions = _step(config, torch.float32, [1], [3])
    qkv = torch.zeros(1, (6 + 4) * 16)
    args = (cos.contiguous(), sin.contiguous(), None, None, 1e-6, cache[0], cache[1], meta.slot_mapping, positions,
            meta.short_q_index, meta.short_q_valid, meta.short_block_tables, 6, 2, 0.25)
    with pytest.raises(RuntimeError, match="qkv must be"):
        fused_cpu.rope_store_attend(qkv[:, :-16].contiguous(), *args)
    with pytest.raises(RuntimeError, match="caches must be"):
        fused_cpu.rope_store_attend(qkv, *args[:5], cache[0].bfloat16(), *args[6:])
    with pytest.raises(RuntimeError, match="delta must match"):
        fused_cpu.add_rms_norm(x, x[:, :-1].contiguous(), torch.ones(64), 1e-6)


def _available_isas(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The code paths this CPU can run (SPARKSERVE_FUSED_ISA refuses the others)."""
    found = []
    for isa in fused_cpu.ISAS:
        monkeypatch.setenv("SPARKSERVE_FUSED_ISA", isa)
        try:
            fused_cpu.silu_mul(torch.zeros(1, 2))
        except RuntimeError as err:
            assert "lacks it" in str(err)
            continue
        found.append(isa)
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_code_path_gives_the_same_bits(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """AVX-512, AVX2 and the baseline build of the hot loops (forced by SPARKSERVE_FUSED_ISA, read per call):
    the same bits for a ragged verify step with q / k norm, its KV cache writes, and SiLU * up at the extremes
    of the branch-free exp (underflow, overflow, inf, NaN)."""
    isas = _available_isas(monkeypatch)
    assert "baseline" in isas and (len(isas) > 1 or not fused_cpu.X86), isas
    config = _config(True)
    layer = _layer(config, dtype)
    gate = torch.tensor([-1000.0, -90.0, -87.0, -5.0, 0.0, 3.0, 88.0, 89.0, 1000.0, float("inf"), float("-inf"),
                         float("nan")])
    gate_up = torch.cat([gate, torch.linspace(-2, 2, len(gate))]).to(dtype)[None]
    results = {}
    for isa in isas:
        monkeypatch.setenv("SPARKSERVE_FUSED_ISA", isa)
        x, cos, sin, cache, meta, positions = _step(config, dtype, [4, 1, 8], [9, 30, 3])
        residual, delta = layer.forward_fused(x, None, cos.contiguous(), sin.contiguous(), cache, meta, positions)
        results[isa] = (residual + delta, *cache, fused_cpu.silu_mul(gate_up))
    for isa in isas[1:]:
        for got, first in zip(results[isa], results[isas[0]], strict=True):
            assert torch.equal(got.nan_to_num(), first.nan_to_num()), isa
    g, up = gate_up.float().chunk(2, dim=-1)
    torch.testing.assert_close(results[isas[0]][-1].float(), (F.silu(g) * up).to(dtype).float(), equal_nan=True,
                               **TOLERANCE[dtype])
    monkeypatch.setenv("SPARKSERVE_FUSED_ISA", "sse9")
    with pytest.raises(RuntimeError, match="SPARKSERVE_FUSED_ISA must be one of"):
        fused_cpu.add_rms_norm(x, None, torch.ones(64, dtype=dtype), 1e-6)
