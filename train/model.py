"""Drafters for training: construction, initialisation from the target, and the dense training forward.

Three kinds share one backbone (``sparkserve.engine.spec_decode.dspark.DSparkLayer`` with KV injection of the projected
target features, DEEPSPEC_FORMAT.md section 2):
- ``dspark``: block [anchor, mask x (B-1)], bidirectional inside the block, Markov head + confidence head;
- ``dflash``: the same block, no Markov head (markov_rank 0), no confidence head;
- ``ar``: an autoregressive drafter (EAGLE-style, one token per forward): block [anchor, x_0 .. x_{B-2}]
  with CAUSAL attention inside the block, trained teacher-forced; its MLP is widened so its trainable
  parameter count equals the DSpark drafter's (frozen embedding / LM head not counted).
The training forward for an anchor at position s equals the inference forward with context rows
0..s-1 (DEEPSPEC_FORMAT.md section 2, "Equivalence"): one dense SDPA call per layer over
[context rows ; all blocks] with the section 4 mask.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparkserve.engine.models.llama import LlamaForCausalLM
from sparkserve.engine.spec_decode.dspark import DSparkDrafter
from sparkserve.engine.spec_decode.dspark_loader import DSparkConfig, random_drafter_config
from sparkserve.train.drafters import ARDrafter

KINDS = ("dspark", "dflash", "ar")
# Backends for the masked training attention: cuDNN is left out on purpose. On H100 / H200 with torch
# 2.11+ it is the default for masked SDPA, and its backward returns NaN grad_q when an explicit mask meets
# a key length = 64 (mod 128) (pytorch/pytorch#196678); here keys = S + A*B, e.g. 640 + 448 = 1088.
TRAIN_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def trainable_parameters(drafter: DSparkDrafter) -> int:
    """Trainable parameter count (the frozen shared embedding / LM head are buffers, not counted)."""
    return sum(p.numel() for p in drafter.parameters())


def make_config(kind: str, target: LlamaForCausalLM, target_layer_ids: tuple[int, ...], block_size: int,
                num_layers: int, markov_rank: int, mask_token_id: int | None = None) -> DSparkConfig:
    """Drafter config of one kind. ``ar`` gets the intermediate size that matches DSpark's parameter count."""
    if kind not in KINDS:
        raise ValueError(f"unknown drafter kind {kind!r}; expected one of {KINDS}")
    tc = target.config
    base = {"num_attention_heads": tc.num_attention_heads, "num_key_value_heads": tc.num_key_value_heads,
            "hidden_size": tc.hidden_size, "intermediate_size": tc.intermediate_size,
            "head_dim": tc.head_dim, "vocab_size": tc.vocab_size, "rms_norm_eps": tc.rms_norm_eps,
            "rope_theta": tc.rope_theta, "num_hidden_layers": tc.num_hidden_layers}
    dspark = random_drafter_config(base, target_layer_ids, block_size, num_layers, markov_rank, True, mask_token_id)
    if kind == "dspark":
        return dspark
    plain = dataclasses.replace(dspark, markov_rank=0, enable_confidence_head=False,
                                confidence_head_with_markov=False)
    if kind == "dflash":
        return plain
    d, r = tc.hidden_size, markov_rank
    extra = 2 * tc.vocab_size * r + (d + r + 1)  # Markov W1, W2 and the confidence head
    wider = tc.intermediate_size + round(extra / (3 * d * num_layers))  # SwiGLU: 3 * d params per unit
    return dataclasses.replace(plain, intermediate_size=wider)


@torch.no_grad()
def init_from_target(drafter: DSparkDrafter, target: LlamaForCausalLM, layer_id: int | None = None) -> int:
    """Warm start (instead of random init): every draft layer copies target layer ``layer_id``
    (default: the layer right after the last feature layer, i.e. the one whose input the last feature
    is); ``fc`` starts as the selector of the last feature layer and ``hidden_norm`` as that layer's
    input norm, so context K/V start as the target layer's own K/V; the final norm is the target's.
    q_norm / k_norm (absent in Llama) start at 1. Extra MLP units of a wider drafter get zero
    ``down_proj`` columns, so the initial function is the same. Returns the copied layer id."""
    cfg, tcfg = drafter.config, target.config
    if layer_id is None:
        layer_id = min(cfg.target_layer_ids[-1] + 1, tcfg.num_hidden_layers - 1)
    src = target.layers[layer_id]
    d, inter = cfg.hidden_size, tcfg.intermediate_size
    q, kv = src.q_size, src.kv_size
    for layer in drafter.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layer.input_layernorm.weight.copy_(src.input_layernorm)
        layer.post_attention_layernorm.weight.copy_(src.post_attention_layernorm)
        attn.q_proj.weight.copy_(src.qkv_proj[:q])
        attn.k_proj.weight.copy_(src.qkv_proj[q:q + kv])
        attn.v_proj.weight.copy_(src.qkv_proj[q + kv:])
        attn.o_proj.weight.copy_(src.o_proj)
        mlp.gate_proj.weight[:inter].copy_(src.gate_up_proj[:inter])
        mlp.up_proj.weight[:inter].copy_(src.gate_up_proj[inter:])
        mlp.down_proj.weight.zero_()
        mlp.down_proj.weight[:, :inter].copy_(src.down_proj)
    drafter.fc.weight.zero_()
    drafter.fc.weight[:, -d:].copy_(torch.eye(d))
    drafter.hidden_norm.weight.copy_(src.input_layernorm)
    drafter.norm.weight.copy_(target.norm)
    return layer_id


def build_drafter(kind: str, config: DSparkConfig, target: LlamaForCausalLM, seed: int,
                  init_layer: int | None = None, device: torch.device | str = "cpu") -> DSparkDrafter:
    """fp32 trainable drafter sharing the target's (frozen) embedding and LM head; deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    cls = ARDrafter if kind == "ar" else DSparkDrafter
    drafter = cls(config, target.embed_tokens.weight, target.lm_head_weight)
    drafter.reset_parameters(gen)
    init_from_target(drafter, target, init_layer)
    return drafter.to(device).float().train()


def block_attention_mask(anchors: Tensor, seq_len: int, block_size: int, causal: bool) -> Tensor:
    """Section 4 mask. anchors: [N, A] -> [N, 1, A*B, S + A*B] bool (True = may attend).

    A block query sees context row j iff j < s (its anchor's position) and every key of its own block
    (``causal``: only keys of its own block at slots <= its slot, for the autoregressive drafter).
    Dummy anchors still see their own block, so no row is fully masked."""
    n, a = anchors.shape
    device = anchors.device
    ctx = torch.arange(seq_len, device=device)[None, None, :] < anchors[:, :, None]  # [N, A, S]
    ctx = ctx[:, :, None, :].expand(n, a, block_size, seq_len).reshape(n, a * block_size, seq_len)
    slot = torch.arange(a * block_size, device=device)
    same = (slot[:, None] // block_size) == (slot[None, :] // block_size)  # [A*B, A*B]
    if causal:
        same = same & (slot[None, :] <= slot[:, None])
    blk = same[None].expand(n, -1, -1)
    return torch.cat((ctx, blk), dim=-1)[:, None]


def block_hidden_states(drafter: DSparkDrafter, features: Tensor, anchors: Tensor, block_ids: Tensor,
                        causal: bool) -> Tensor:
    """Dense training forward of every block of every sequence.

    Args:
        features: [N, S, m*d] target features of every position (context rows).
        anchors: [N, A] int64 anchor positions s (block slot k sits at position s + k).
        block_ids: [N, A, B] int64 block input tokens.
        causal: causal attention inside blocks (``ar``) instead of bidirectional.
    Returns:
        h = norm(x): [N, A, B, d].
    """
    n, s, _ = features.shape
    a, b = block_ids.shape[1], block_ids.shape[2]
    cfg = drafter.config
    hctx = drafter.hidden_norm(drafter.fc(features)).flatten(0, 1)  # [N*S, d]
    ctx_pos = torch.arange(s, device=features.device).repeat(n)  # [N*S]
    positions = (anchors[:, :, None] + torch.arange(b, device=anchors.device)).flatten()  # [N*A*B]
    mask = block_attention_mask(anchors, s, b, causal)
    x = F.embedding(block_ids.flatten(), drafter.embed_weight)  # [N*A*B, d]
    scale, hkv, hd = cfg.head_dim**-0.5, cfg.num_key_value_heads, cfg.head_dim
    for layer in drafter.layers:
        ck, cv = layer.self_attn.project_kv(hctx, ctx_pos)  # [N*S, Hkv, hd]

        def attend(q: Tensor, k: Tensor, v: Tensor, ck: Tensor = ck, cv: Tensor = cv) -> Tensor:
            keys = torch.cat((ck.view(n, s, hkv, hd), k.view(n, a * b, hkv, hd)), 1).transpose(1, 2)
            vals = torch.cat((cv.view(n, s, hkv, hd), v.view(n, a * b, hkv, hd)), 1).transpose(1, 2)
            qs = q.view(n, a * b, -1, hd).transpose(1, 2)  # [N, H, A*B, hd]
            with sdpa_kernel(TRAIN_SDPA_BACKENDS):
                out = F.scaled_dot_product_attention(qs, keys.to(qs.dtype), vals.to(qs.dtype), attn_mask=mask,
                                                     scale=scale, enable_gqa=qs.shape[1] != hkv)
            return out.transpose(1, 2).reshape(n * a * b, -1, hd)

        x = layer(x, positions, attend)
    return drafter.norm(x).view(n, a, b, -1)
