"""Llama-family decoder in plain torch: Llama, SmolLM2, Qwen2/Qwen2.5 (q/k/v bias), Qwen3 (q/k norm).

The model runs a *flat ragged batch*: every scheduled sequence's new tokens are concatenated into
``[T]`` ids with their absolute positions; attention goes through the paged KV cache via
``sparkserve.engine.attention.paged_attention``, so prefill, chunked prefill, decode and verify blocks all take
the same path.

Numerics follow transformers: RMSNorm in fp32 (weight applied after the cast back), RoPE with the
rotate-half convention (pairs ``i`` and ``i + hd/2``), SwiGLU MLP, GQA. For speed the q/k/v
projections are fused into one ``qkv_proj`` and gate/up into one ``gate_up_proj``;
:meth:`LlamaForCausalLM.load_weights` accepts the unfused Hugging Face names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sparkserve.engine import batch_invariant
from sparkserve.engine.attention import AttentionMetadata, paged_attention
from sparkserve.engine.models.config import ModelConfig
from sparkserve.engine.parallel.group import TensorParallelGroup
from sparkserve.engine.quant import (
    DEFAULT_GEMV_MAX_TOKENS,
    BlockQuant,
    QuantWeight,
    Routing,
    quant_linear,
    quantize_int4,
    quantize_int8,
)
from sparkserve.kernels import fused_cpu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / rms(x))`` with the normalisation in fp32. x: [..., n], weight: [n]."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/hd)``, rescaled for linear / llama3 RoPE scaling. Returns [hd/2] fp32."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: low frequencies (long wavelengths) are divided by `factor`, high ones kept, the band
    # between interpolated smoothly.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [T, heads, hd]; cos, sin: [T, 1, hd/2]. Returns [T, heads, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    Under tensor parallelism (``tp``; ``config`` is then the shard's, ``engine/parallel/shard.py``) the
    layer holds its rank's heads and MLP columns, and the row-parallel ``o_proj`` / ``down_proj`` outputs are
    summed over the ranks (one all-reduce each).
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        self.tp = tp
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_size, self.kv_size = self.num_heads * hd, self.num_kv_heads * hd
        self.eps = config.rms_norm_eps
        self.scale = hd**-0.5

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        self.input_layernorm = param(d)
        self.post_attention_layernorm = param(d)
        self.qkv_proj = param(self.q_size + 2 * self.kv_size, d)  # rows: q | k | v
        self.qkv_bias = param(self.q_size + 2 * self.kv_size) if config.attention_bias else None
        self.o_proj = param(d, self.q_size)
        self.o_bias = param(d) if config.o_proj_bias else None
        self.q_norm = param(hd) if config.qk_norm else None
        self.k_norm = param(hd) if config.qk_norm else None
        self.gate_up_proj = param(2 * config.intermediate_size, d)  # rows: gate | up
        self.down_proj = param(d, config.intermediate_size)
        # weight-only quantised copies of the linears (engine/quant.py), by parameter name; empty = dense
        self.quant: dict[str, QuantWeight] = {}

    def forward(
        self,
        x: torch.Tensor,  # [T, d] residual stream
        cos: torch.Tensor,  # [T, 1, hd/2]
        sin: torch.Tensor,  # [T, 1, hd/2]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # each [Hkv, num_blocks, block_size, hd] (engine.attention.new_kv_cache)
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, d]
        """One layer over the flat batch; stores this step's keys / values into ``kv_cache``."""
        q, k, v = self._pre(x, cos, sin)
        attn = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)  # [T, H, hd]
        return self._post(x, attn)

    def pre_attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Norm, q/k/v projection, q/k norm and RoPE. x: [T, d] -> q [T, H, hd], k and v [T, Hkv, hd]."""
        num_tokens = x.shape[0]
        h = rms_norm(x, self.input_layernorm, self.eps)
        quant = self.quant
        qkv = quant_linear(h, self.qkv_proj, self.qkv_bias, quant.get("qkv_proj"))  # [T, (H + 2 Hkv) hd]
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, norm, SwiGLU MLP, residual. x: [T, d], attn: [T, H, hd] -> [T, d]."""
        quant = self.quant
        attn_out = quant_linear(attn.reshape(x.shape[0], self.q_size), self.o_proj, self.o_bias, quant.get("o_proj"))
        x = x + self._reduce(attn_out)
        h = rms_norm(x, self.post_attention_layernorm, self.eps)
        gate, up = quant_linear(h, self.gate_up_proj, None, quant.get("gate_up_proj")).chunk(2, dim=-1)  # [T, I] each
        return x + self._reduce(quant_linear(F.silu(gate) * up, self.down_proj, None, quant.get("down_proj")))

    def forward_fused(
        self,
        x: torch.Tensor,  # [T, d] residual stream, without the previous layer's last residual
        delta: torch.Tensor | None,  # [T, d] the previous layer's MLP output, still to be added to x
        cos: torch.Tensor,  # [T, 1, hd/2]
        sin: torch.Tensor,  # [T, 1, hd/2]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # each [Hkv, num_blocks, block_size, hd]
        meta: AttentionMetadata,  # a step whose sequences are all short (meta.prefills empty)
        positions: torch.Tensor,  # [T] int64
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (x [T, d], delta [T, d]): the layer's output is x + delta
        """:meth:`forward` with everything between the linears in three fused CPU ops (kernels/fused_cpu.py);
        the residual add closing the layer is left to the next layer's fused norm."""
        quant = self.quant
        # parameters read from their dict (optional ones absent when None): nn.Module.__getattr__ costs ~1.5 us a
        # read, ~200 reads a step
        p = self._parameters
        x, h = fused_cpu.add_rms_norm(x, delta, p["input_layernorm"], self.eps)
        qkv = quant_linear(h, p["qkv_proj"], p.get("qkv_bias"), quant.get("qkv_proj"))  # [T, (H + 2 Hkv) hd]
        attn = fused_cpu.rope_store_attend(
            qkv, cos, sin, p.get("q_norm"), p.get("k_norm"), self.eps, kv_cache[0], kv_cache[1], meta.slot_mapping,
            positions, meta.short_q_index, meta.short_q_valid, meta.short_block_tables, self.num_heads,
            self.num_kv_heads, self.scale)  # [T, H, hd]
        attn_out = quant_linear(attn.view(x.shape[0], self.q_size), p["o_proj"], p.get("o_bias"), quant.get("o_proj"))
        x, h = fused_cpu.add_rms_norm(x, self._reduce(attn_out), p["post_attention_layernorm"], self.eps)
        gate_up = quant_linear(h, p["gate_up_proj"], None, quant.get("gate_up_proj"))  # [T, 2 I]
        return x, self._reduce(quant_linear(fused_cpu.silu_mul(gate_up), p["down_proj"], None, quant.get("down_proj")))

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-parallel linear's partial sums [T, d] -> the full output (the identity without TP)."""
        return partial if self.tp is None else self.tp.all_reduce(partial)

    def _pre(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.pre_attention(x, cos, sin)  # replaced per instance by engine.compile_step

    def _post(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return self.post_attention(x, attn)


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM over a flat ragged batch with a paged KV cache.

    Args:
        config: model shape.
        dtype: parameter / activation dtype (float32 or bfloat16).
        max_positions: RoPE table length (default ``config.max_position_embeddings``); positions
            must stay below it.
        tp: the tensor-parallel group when this is one rank's shard (``engine/parallel/shard.py`` builds
            it: ``config`` is the shard's, the LM head holds the rank's ``ceil(V / tp)`` vocab rows, tied or
            not, and :meth:`compute_logits` gathers the full vocab).
        fused_step: run CPU steps of short sequences (decode, verify) through the fused layer ops
            (kernels/fused_cpu.py) where :meth:`_fused` allows; False keeps the eager layers always.
    Parameters are allocated uninitialised: fill them with :meth:`load_weights`.
    """

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype = torch.float32,
                 max_positions: int | None = None, tp: TensorParallelGroup | None = None,
                 fused_step: bool = True) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        d, vocab = config.hidden_size, config.vocab_size
        self.embed_tokens = nn.Embedding(vocab, d, _weight=torch.empty(vocab, d, dtype=dtype), _freeze=True)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype, tp) for _ in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.empty(d, dtype=dtype), requires_grad=False)
        head_rows = vocab if tp is None else -(-vocab // tp.world_size)
        self.lm_head = None if config.tie_word_embeddings and tp is None else nn.Parameter(
            torch.empty(head_rows, d, dtype=dtype), requires_grad=False)
        num_pos = max_positions or config.max_position_embeddings
        freqs = torch.outer(torch.arange(num_pos, dtype=torch.float32), rope_inv_freq(config))  # [P, hd/2]
        # cos/sin are rounded to the model dtype once, as transformers does per call.
        self.register_buffer("rope_cos", freqs.cos().to(dtype), persistent=False)  # [P, hd/2]
        self.register_buffer("rope_sin", freqs.sin().to(dtype), persistent=False)  # [P, hd/2]
        self.lm_head_quant: QuantWeight | None = None  # quantised LM head for small M (engine/quant.py)
        self.quantization = "none"  # what load_weights kept quantised: none | gguf | int8 | int4
        self.fused_step = fused_step

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output embedding [V, d] (the token embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64, flat ragged batch
        positions: torch.Tensor,  # [T] int64 absolute positions
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer, each [Hkv, num_blocks, block_size, hd]
        meta: AttentionMetadata,
        aux_layer_ids: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run all layers; returns (final-normed hidden [T, d], aux [T, len(aux_layer_ids) * d] or None).

        ``aux`` concatenates, in ``aux_layer_ids`` order, the raw residual-stream output of each listed
        decoder layer (before the final norm; -1 = the embedding output): the DSpark drafter's
        context features (transformers' ``hidden_states[l + 1]``).
        """
        num_layers = len(self.layers)
        for layer_id in aux_layer_ids:
            if not -1 <= layer_id < num_layers:
                raise ValueError(f"aux layer id {layer_id} outside [-1, {num_layers})")
        x = self.embed_tokens(input_ids)  # [T, d]
        cos = self.rope_cos[positions].unsqueeze(1)  # [T, 1, hd/2]
        sin = self.rope_sin[positions].unsqueeze(1)  # [T, 1, hd/2]
        captured: dict[int, torch.Tensor] = {}
        if -1 in aux_layer_ids:
            captured[-1] = x
        if self._fused(x, meta, kv_caches[0][0].dtype if kv_caches else None):
            if meta.prefills:  # batch-invariant mode only: prefill chunks through the fused ops too
                meta = batch_invariant.fused_rows_metadata(meta)
            return self._forward_fused(x, cos, sin, positions, kv_caches, meta, aux_layer_ids, captured)
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_caches[layer_id], meta)
            if layer_id in aux_layer_ids:
                captured[layer_id] = x
        aux = torch.cat([captured[i] for i in aux_layer_ids], dim=-1) if aux_layer_ids else None
        return rms_norm(x, self.norm, self.config.rms_norm_eps), aux

    def _fused(self, x: torch.Tensor, meta: AttentionMetadata, cache_dtype: torch.dtype | None) -> bool:
        """Whether this step runs the fused layers (``fused_step``): a CPU step on the torch attention path, the
        cache in the model dtype, extension built; and either a step of short sequences only (decode, verify
        blocks: no prefill chunk) or any step in batch-invariant mode, where every step runs them (prefill
        chunks included: ``batch_invariant.fused_rows_metadata``), so the choice never depends on the step and a
        position gets the same bits prefilled, recomputed after preemption or decoded."""
        if not (self.fused_step and x.device.type == "cpu" and meta.kernel is None
                and x.dtype in (torch.float32, torch.bfloat16) and cache_dtype == x.dtype and fused_cpu.load()):
            return False
        return batch_invariant.is_enabled() if meta.prefills else meta.short_q_index is not None

    def _forward_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                       kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                       aux_layer_ids: tuple[int, ...], captured: dict[int, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` through ``DecoderLayer.forward_fused``; each layer's output is carried as x + delta."""
        delta: torch.Tensor | None = None
        cos, sin = cos.contiguous(), sin.contiguous()
        for layer_id, layer in enumerate(self.layers):
            x, delta = layer.forward_fused(x, delta, cos, sin, kv_caches[layer_id], meta, positions)
            if layer_id in aux_layer_ids:
                x, delta = x + delta, None
                captured[layer_id] = x
        aux = torch.cat([captured[i] for i in aux_layer_ids], dim=-1) if aux_layer_ids else None
        return fused_cpu.add_rms_norm(x, delta, self.norm, self.config.rms_norm_eps)[1], aux

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: [N, d] -> [N, V] float32 logits (vocab-parallel under TP: each rank's shard, gathered)."""
        logits = quant_linear(hidden, self.lm_head_weight, None, self.lm_head_quant).float()
        return logits if self.tp is None else self.tp.gather_vocab(logits, self.config.vocab_size)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | BlockQuant]], quantization: str = "none",
                     gemv_max_tokens: Routing | int = DEFAULT_GEMV_MAX_TOKENS,
                     lm_head_routing: Routing | None = None) -> None:
        """Copy Hugging Face-named tensors (``model.layers.3.self_attn.q_proj.weight`` ...) into the
        fused parameters, casting to the model dtype. Raises ValueError on an unknown name or when a
        parameter is left unfilled.

        Quantisation (engine/quant.py): a ``BlockQuant`` value (GGUF Q4_0 / Q4_1 / Q8_0 blocks) fills
        its parameter with the canonical dequantised values and, when every row of the (fused) parameter
        came quantised, keeps the packed int4 copy, routed per call by ``gemv_max_tokens`` (a ``Routing``, or
        an int n: the quantised kernel for at most n rows); a quantised LM head by ``lm_head_routing`` when
        given (the CPU plan's entry for it).
        ``quantization`` "int8" / "int4" then quantises the dense decoder-layer linears
        (:meth:`quantize_`); "none" / "auto" keep dense tensors dense.
        """
        if quantization not in ("none", "auto", "int8", "int4"):
            raise ValueError(f"quantization must be none, auto, int8 or int4, got {quantization!r}")
        filled: set[str] = set()
        staged: dict[str, list[tuple[int, BlockQuant]]] = {}
        for name, tensor in weights:
            target = self._resolve(name)
            if target is None:
                continue
            param_name, rows = target
            param = self._param(param_name, name)
            dest = param if rows is None else param[rows[0]:rows[1]]
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit {param_name} {tuple(dest.shape)}")
            if isinstance(tensor, BlockQuant):
                dest.copy_(tensor.canonical(param.dtype))
                staged.setdefault(param_name, []).append((0 if rows is None else rows[0], tensor))
            else:
                dest.copy_(tensor)
            filled.add(param_name if rows is None else f"{param_name}[{rows[0]}]")
        expected = {n for n, _ in self.named_parameters()}
        for i, layer in enumerate(self.layers):
            expected -= {f"layers.{i}.qkv_proj", f"layers.{i}.qkv_bias", f"layers.{i}.gate_up_proj"}
            for fused, starts in (("qkv_proj", (0, layer.q_size, layer.q_size + layer.kv_size)),
                                  ("qkv_bias", (0, layer.q_size, layer.q_size + layer.kv_size)),
                                  ("gate_up_proj", (0, self.config.intermediate_size))):
                if getattr(layer, fused) is not None:
                    expected |= {f"layers.{i}.{fused}[{s}]" for s in starts}
        missing = expected - filled
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:5]}")
        self._attach_quant(staged, gemv_max_tokens, lm_head_routing)
        if staged:
            self.quantization = "gguf"
        if quantization in ("int8", "int4"):
            self.quantize_(quantization, gemv_max_tokens)

    @torch.no_grad()
    def quantize_(self, mode: str, gemv_max_tokens: Routing | int = DEFAULT_GEMV_MAX_TOKENS) -> None:
        """Quantise every dense decoder-layer linear in place (engine/quant.py): "int8" (per output
        channel) or "int4" (group 32). Each parameter is overwritten with the canonical dequantised
        values the kernel computes with; the embedding and LM head stay dense. Linears that already
        have a quantised copy (GGUF blocks) are left alone."""
        if mode not in ("int8", "int4"):
            raise ValueError(f"quantize_ mode must be int8 or int4, got {mode!r}")
        dtype = self.norm.dtype
        for layer in self.layers:
            for leaf in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                if leaf in layer.quant:
                    continue
                param = getattr(layer, leaf)
                if mode == "int4":
                    block = quantize_int4(param, dtype)
                    param.copy_(block.canonical(dtype))
                    layer.quant[leaf] = block.pack(dtype, gemv_max_tokens)
                else:
                    q8, canonical = quantize_int8(param, dtype, gemv_max_tokens)
                    param.copy_(canonical)
                    layer.quant[leaf] = q8
        self.quantization = mode if self.quantization == "none" else f"{self.quantization}+{mode}"

    def _attach_quant(self, staged: dict[str, list[tuple[int, BlockQuant]]], max_tokens: Routing | int,
                      lm_head_routing: Routing | None = None) -> None:
        """Pack the staged blocks of every parameter whose rows all came quantised (same plane layout); the
        LM head by ``lm_head_routing`` when given."""
        for param_name, pieces in staged.items():
            pieces.sort(key=lambda p: p[0])
            if sum(p.shape[0] for _, p in pieces) != self.get_parameter(param_name).shape[0]:
                continue  # part of a fused parameter is dense (mixed GGUF types): serve it dense
            first = pieces[0][1]
            if len({len(p.codes) for _, p in pieces}) != 1:
                continue
            merged = BlockQuant(*(tuple(torch.cat([getattr(p, f)[i] for _, p in pieces]) for i in range(len(first.codes)))
                                  for f in ("codes", "scales", "zeros")))
            if param_name in ("embed_tokens.weight", "lm_head"):
                if (param_name == "lm_head") == (self.lm_head is not None):  # the LM head (tied: the embedding)
                    self.lm_head_quant = merged.pack(self.norm.dtype, lm_head_routing or max_tokens)
                continue
            quant = merged.pack(self.norm.dtype, max_tokens)
            layer_name, leaf = param_name.rsplit(".", 1)
            self.get_submodule(layer_name).quant[leaf] = quant

    def _param(self, param_name: str, tensor_name: str) -> torch.Tensor:
        try:
            return self.get_parameter(param_name)
        except AttributeError:
            raise ValueError(f"{tensor_name}: the config has no parameter {param_name}") from None

    def _resolve(self, name: str) -> tuple[str, tuple[int, int] | None] | None:
        """HF tensor name -> (parameter name, row range of a fused parameter or None); None = skip."""
        name = name.removeprefix("model.")
        if name == "lm_head.weight":
            return None if self.lm_head is None else ("lm_head", None)
        if name == "embed_tokens.weight":
            return name, None
        if name == "norm.weight":
            return "norm", None
        if name.endswith("rotary_emb.inv_freq"):
            return None
        parts = name.split(".")  # layers.{i}.{self_attn|mlp}.{proj}.{weight|bias} or layers.{i}.{norm}.weight
        if parts[0] != "layers" or len(parts) < 4:
            raise ValueError(f"unexpected tensor {name!r}")
        i, layer = int(parts[1]), self.layers[int(parts[1])]
        prefix, leaf, kind = f"layers.{i}", parts[-2], parts[-1]
        if leaf in ("input_layernorm", "post_attention_layernorm", "q_norm", "k_norm"):
            return f"{prefix}.{leaf}", None
        q, kv, inter = layer.q_size, layer.kv_size, self.config.intermediate_size
        fused_rows = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv),
                      "gate_proj": (0, inter), "up_proj": (inter, 2 * inter)}
        if leaf in ("q_proj", "k_proj", "v_proj"):
            return f"{prefix}.{'qkv_proj' if kind == 'weight' else 'qkv_bias'}", fused_rows[leaf]
        if leaf in ("gate_proj", "up_proj"):
            return f"{prefix}.gate_up_proj", fused_rows[leaf]
        if leaf == "o_proj":
            return f"{prefix}.{'o_proj' if kind == 'weight' else 'o_bias'}", None
        if leaf == "down_proj":
            return f"{prefix}.down_proj", None
        raise ValueError(f"unexpected tensor {name!r}")
