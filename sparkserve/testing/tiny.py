"""Tiny random targets and random DSpark drafters for tests (oracle drafters: sparkserve/testing/oracle.py)."""

from __future__ import annotations

import types

import torch

from sparkserve.engine.loader import LoadedModel
from sparkserve.engine.models.config import ModelConfig
from sparkserve.engine.models.llama import LlamaForCausalLM
from sparkserve.engine.spec_decode.dspark import DSparkDrafter
from sparkserve.engine.spec_decode.dspark_loader import random_drafter_config
from sparkserve.testing.oracle import LookupOracleDrafter, OracleDrafter  # noqa: F401 - re-exported for tests

EOS = 1


def tiny_target(vocab: int = 61, seed: int = 0, scale: float = 0.35, layers: int = 3, head_dim: int = 8) -> LoadedModel:
    """A random fp32 Llama with well-separated logits (weights ~ N(0, scale^2)); ``head_dim`` 16 fits the
    Triton kernels (a power of two >= 16)."""
    config = ModelConfig(
        architecture="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=None, max_position_embeddings=512, tie_word_embeddings=False, attention_bias=False,
        qk_norm=False, bos_token_id=None, eos_token_id=EOS,
    )
    model = random_llama(config, seed, scale)
    tokenizer = types.SimpleNamespace(eos_token_id=EOS, stop_token_ids=(EOS,), bos_token_id=None)
    return LoadedModel(model, config, tokenizer, "tiny")


def random_llama(config: ModelConfig, seed: int = 0, scale: float = 0.35) -> LlamaForCausalLM:
    """An fp32 Llama of ``config`` on the CPU with seeded weights ~ N(0, scale^2) and unit norms (the same
    numbers on every machine: the GPU windows compare a device's greedy tokens with the CPU's)."""
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
        model.embed_tokens.weight.copy_(torch.randn(model.embed_tokens.weight.shape, generator=gen) * scale)
        if model.lm_head is not None:
            model.lm_head.copy_(torch.randn(model.lm_head.shape, generator=gen) * scale)
    return model


def random_dspark(target: LoadedModel, block_size: int = 4, markov_rank: int = 16, confidence: bool = True,
                  seed: int = 1, markov_scale: float = 1.0) -> DSparkDrafter:
    """A randomly initialised DSpark (markov_rank > 0) or DFlash (0) drafter sharing the target's heads."""
    cfg = target.config
    config = random_drafter_config(
        cfg,  # ModelConfig has the attribute names random_drafter_config reads
        target_layer_ids=(0, 1), block_size=block_size, num_layers=1, markov_rank=markov_rank,
        confidence=confidence,
    )
    drafter = DSparkDrafter(config, target.model.embed_tokens.weight, target.model.lm_head_weight)
    drafter.reset_parameters(torch.Generator().manual_seed(seed))
    if markov_rank and markov_scale != 1.0:
        with torch.no_grad():
            for p in drafter.markov_head.parameters():
                p.mul_(markov_scale)
    return drafter
