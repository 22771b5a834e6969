"""Frozen target on the fly: a dense, right-padded batched forward that returns the drafter's context
features and the target's next-token distribution as top-k + rest mass.

Why dense: training needs one causal forward per packed batch of N sequences, with no KV cache; a
right-padded ``[N, S]`` batch with ``is_causal`` SDPA is exact for every real row (padding sits after
the real tokens, so causal attention never looks at it) and is a single flash-attention call per layer
on a GPU. It reads the weights of :class:`sparkserve.engine.models.llama.LlamaForCausalLM` (fused ``qkv_proj`` /
``gate_up_proj``) and is tested against the model's own paged forward (tests/train/test_train.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sparkserve.engine.models.llama import LlamaForCausalLM, apply_rope, rms_norm


class TargetOutputs(NamedTuple):
    """Per-position target quantities of a padded batch.

    Attributes:
        features: [N, S, m*d] concatenated raw outputs of ``target_layer_ids`` (drafter context rows).
        topk_ids: [N, S, K] int64, the target's K most likely next tokens at each position.
        topk_probs: [N, S, K] fp32 p_t of those tokens (softmax over the FULL vocabulary, T = 1).
        rest_mass: [N, S] fp32, 1 - sum(topk_probs): target mass outside the top-k support.
    """

    features: Tensor
    topk_ids: Tensor
    topk_probs: Tensor
    rest_mass: Tensor


@torch.no_grad()
def dense_forward(model: LlamaForCausalLM, input_ids: Tensor, aux_layer_ids: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Causal forward of a right-padded batch.

    Args:
        input_ids: [N, S] int64 (padding after each sequence's real tokens; any id).
        aux_layer_ids: target layers whose raw output is captured (-1 = embedding output).
    Returns:
        (final-normed hidden [N, S, d], aux features [N, S, m*d]), in the model's dtype.
    """
    n, s = input_ids.shape
    cfg = model.config
    x = model.embed_tokens(input_ids)  # [N, S, d]
    cos = model.rope_cos[:s].unsqueeze(1)  # [S, 1, hd/2]
    sin = model.rope_sin[:s].unsqueeze(1)
    captured = {-1: x} if -1 in aux_layer_ids else {}
    for layer_id, layer in enumerate(model.layers):
        h = rms_norm(x, layer.input_layernorm, layer.eps)
        qkv = F.linear(h, layer.qkv_proj, layer.qkv_bias)  # [N, S, (H + 2 Hkv) hd]
        q, k, v = qkv.split((layer.q_size, layer.kv_size, layer.kv_size), dim=-1)
        q = q.view(n, s, layer.num_heads, layer.head_dim)
        k = k.view(n, s, layer.num_kv_heads, layer.head_dim)
        v = v.view(n, s, layer.num_kv_heads, layer.head_dim)
        if layer.q_norm is not None:
            q, k = rms_norm(q, layer.q_norm, layer.eps), rms_norm(k, layer.k_norm, layer.eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=layer.scale,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        ).transpose(1, 2)  # [N, S, H, hd]
        x = x + F.linear(attn.reshape(n, s, layer.q_size), layer.o_proj, layer.o_bias)
        h = rms_norm(x, layer.post_attention_layernorm, layer.eps)
        gate, up = F.linear(h, layer.gate_up_proj).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, layer.down_proj)
        if layer_id in aux_layer_ids:
            captured[layer_id] = x
    aux = torch.cat([captured[i] for i in aux_layer_ids], dim=-1)
    return rms_norm(x, model.norm, cfg.rms_norm_eps), aux


@torch.no_grad()
def target_outputs(model: LlamaForCausalLM, input_ids: Tensor, aux_layer_ids: tuple[int, ...],
                   top_k: int, chunk_rows: int = 4096) -> TargetOutputs:
    """Features plus the target distribution p_t = softmax(lm_head(final hidden)) stored as top-k + rest.

    The full-vocabulary logits are formed chunk by chunk (``chunk_rows`` positions at a time) and
    reduced at once to K probabilities, so the [N*S, V] tensor never lives long. input_ids: [N, S].
    """
    final, aux = dense_forward(model, input_ids, aux_layer_ids)
    n, s, d = final.shape
    flat = final.reshape(n * s, d)
    ids, probs = [], []
    for start in range(0, n * s, chunk_rows):
        logits = model.compute_logits(flat[start:start + chunk_rows])  # [rows, V] fp32
        vals, idx = logits.topk(top_k, dim=-1)
        probs.append((vals - logits.logsumexp(-1, keepdim=True)).exp())  # [rows, K]
        ids.append(idx)
    topk_probs = torch.cat(probs).view(n, s, top_k)
    rest = (1.0 - topk_probs.sum(-1)).clamp_min(0.0)
    return TargetOutputs(aux, torch.cat(ids).view(n, s, top_k), topk_probs, rest)
