"""Cut a loaded (full) Llama into one rank's tensor-parallel shard, Megatron-style.

Column-parallel (output rows split, no communication): ``qkv_proj`` (this rank's query heads, then its KV
heads, then their values) and ``gate_up_proj`` (its gate columns, then the same up columns), with their
biases. Row-parallel (input columns split, partial sums all-reduced by ``DecoderLayer``): ``o_proj`` and
``down_proj``; the ``o_proj`` bias is kept on rank 0 only, so the sum adds it once. The LM head is
vocab-parallel (rows ``TensorParallelGroup.vocab_shard``); the embedding and norms are replicated. The KV
cache follows from the shard's config (``num_key_value_heads / tp`` heads per rank).

Source: Shoeybi et al., "Megatron-LM" (2019), section 3 (MLP and self-attention partitioning).
"""

from __future__ import annotations

import dataclasses

import torch

from sparkserve.engine.models.config import ModelConfig
from sparkserve.engine.models.llama import DecoderLayer, LlamaForCausalLM
from sparkserve.engine.parallel.group import TensorParallelGroup, check_tensor_parallel_size


def shard_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """The config one rank's layers are built from: heads and MLP width divided by ``world_size`` (the
    vocabulary stays whole: sampling sees the gathered logits). Raises ValueError when they do not divide."""
    check_tensor_parallel_size(config, world_size)
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // world_size,
                               num_key_value_heads=config.num_key_value_heads // world_size,
                               intermediate_size=config.intermediate_size // world_size)


@torch.no_grad()
def shard_model(full: LlamaForCausalLM, tp: TensorParallelGroup) -> LlamaForCausalLM:
    """A new model holding rank ``tp.rank``'s shard of ``full`` (same dtype and device; ``full`` untouched).

    Raises:
        ValueError: the head counts or MLP width do not divide by ``tp.world_size``, or ``full`` serves
            quantised linears (sharding them is not supported).
    """
    if full.quantization != "none":
        raise ValueError(f"tensor parallelism serves dense weights only; the model is quantised "
                         f"({full.quantization}): pass --quantization none")
    config = shard_config(full.config, tp.world_size)
    dtype, device = full.norm.dtype, full.norm.device
    with torch.device(device):
        shard = LlamaForCausalLM(config, dtype=dtype, max_positions=full.rope_cos.shape[0], tp=tp)
    shard.embed_tokens.weight.copy_(full.embed_tokens.weight)
    shard.norm.copy_(full.norm)
    start, end = tp.vocab_shard(full.config.vocab_size)
    shard.lm_head.zero_()
    shard.lm_head[: end - start].copy_(full.lm_head_weight[start:end])
    for mine, whole in zip(shard.layers, full.layers, strict=True):
        _shard_layer(mine, whole, tp)
    return shard.eval()


def _shard_layer(mine: DecoderLayer, whole: DecoderLayer, tp: TensorParallelGroup) -> None:
    """Copy rank ``tp.rank``'s rows / columns of ``whole``'s parameters into ``mine``."""
    r = tp.rank
    q, kv = mine.q_size, mine.kv_size  # this rank's widths
    q_rows = slice(r * q, (r + 1) * q)
    k_rows = slice(whole.q_size + r * kv, whole.q_size + (r + 1) * kv)
    v_rows = slice(whole.q_size + whole.kv_size + r * kv, whole.q_size + whole.kv_size + (r + 1) * kv)
    mine.qkv_proj.copy_(torch.cat([whole.qkv_proj[q_rows], whole.qkv_proj[k_rows], whole.qkv_proj[v_rows]]))
    if whole.qkv_bias is not None:
        mine.qkv_bias.copy_(torch.cat([whole.qkv_bias[q_rows], whole.qkv_bias[k_rows], whole.qkv_bias[v_rows]]))
    mine.o_proj.copy_(whole.o_proj[:, q_rows])
    if whole.o_bias is not None:
        mine.o_bias.copy_(whole.o_bias if r == 0 else torch.zeros_like(whole.o_bias))
    inter = mine.down_proj.shape[1]  # this rank's MLP columns
    full_inter = whole.down_proj.shape[1]
    cols = slice(r * inter, (r + 1) * inter)
    gate, up = whole.gate_up_proj[:full_inter], whole.gate_up_proj[full_inter:]
    mine.gate_up_proj.copy_(torch.cat([gate[cols], up[cols]]))
    mine.down_proj.copy_(whole.down_proj[:, cols])
    for name in ("input_layernorm", "post_attention_layernorm", "q_norm", "k_norm"):
        param = getattr(whole, name)
        if param is not None:
            getattr(mine, name).copy_(param)
