"""DSpark / DFlash drafter, Qwen3 variant, over the paged KV cache (DEEPSPEC_FORMAT.md section 2).

Terms: *context rows* are target tokens whose features (concatenated hidden states of the target
layers ``target_layer_ids``) have been projected into the drafter's KV cache; they have no queries.
The *block* is ``[anchor, mask x (B-1)]`` at positions ``start..start+B-1`` where ``start`` (the
anchor's position) equals the number of context rows. Block slot k proposes the token at position
``start+k+1``.

Paging: the drafter owns one paged pool per layer with the SAME block tables / slot mapping as the
target; the context row of position p lives in the slot of position p. A block writes its own K/V into
the slots of positions ``start..start+B-1`` (no context row exists there yet; later context rows
overwrite them) and attends bidirectionally over ``kv_len = start + B`` keys, which is exactly section 2
step 5 (block sees every context row and every block key). The caller allocates blocks for ``start + B``
positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparkserve.engine.attention import (
    AttentionMetadata,
    build_attention_metadata,
    new_kv_cache,
    paged_attention,
    store_kv,
)
from sparkserve.engine.models.llama import apply_rope, rms_norm
from sparkserve.engine.spec_decode.draft_sampling import SlotSampler
from sparkserve.engine.spec_decode.drafter import DraftBatch, DraftOutput, KVCache
from sparkserve.engine.spec_decode.dspark_config import DSparkConfig

__all__ = ["DSparkConfig", "DSparkDrafter", "rope_at"]


def _temperature_table(config: DSparkConfig) -> Tensor:
    """``[2, B]`` fp32 the confidence calibration temperatures: row 0 for sampled requests, row 1 for greedy
    ones (``confidence_temperatures_greedy``, else the sampled row; all 1 when the checkpoint has none)."""
    sampled = config.confidence_temperatures or (1.0,) * config.block_size
    greedy = config.confidence_temperatures_greedy or sampled
    return torch.tensor([sampled, greedy], dtype=torch.float32, device="cpu")  # also under a meta device context

AttendFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (q [T,H,hd], k [T,Hkv,hd], v) -> [T,H,hd]


def rope_at(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Default (rotate-half) RoPE at ``positions``, computed in fp32 (``models.llama.apply_rope``).
    x: [T, heads, hd]; positions: [T] int64. Returns [T, heads, hd] in x's dtype."""
    head_dim = x.shape[-1]
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=x.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # [hd/2]
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, hd/2]
    return apply_rope(x.float(), angles.cos()[:, None, :], angles.sin()[:, None, :]).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class DSparkAttention(nn.Module):
    """Qwen3 attention whose keys/values also come from context rows (KV injection)."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = hd
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=bias)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def project_kv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (k_norm, RoPE at ``positions``) and values of rows x: [T, d] -> 2 x [T, Hkv, hd].
        Used for context rows (x = Hctx) and block rows (x = input_layernorm(block))."""
        shape = (x.shape[0], self.num_kv_heads, self.head_dim)
        k = rope_at(self.k_norm(self.k_proj(x).view(shape)), positions, self.rope_theta)
        return k, self.v_proj(x).view(shape)

    def forward(self, x: Tensor, positions: Tensor, attend: AttendFn) -> Tensor:
        """x: [T, d] block rows (already input-normed) -> [T, d]; ``attend`` supplies the context."""
        q = self.q_proj(x).view(x.shape[0], self.num_heads, self.head_dim)
        q = rope_at(self.q_norm(q), positions, self.rope_theta)  # [T, H, hd]
        k, v = self.project_kv(x, positions)
        return self.o_proj(attend(q, k, v).reshape(x.shape[0], -1))


class DSparkMLP(nn.Module):
    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DSparkLayer(nn.Module):
    """Qwen3 decoder layer (section 2 step 5); reusable by a training forward with a dense ``attend``."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DSparkAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DSparkMLP(config)

    def forward(self, x: Tensor, positions: Tensor, attend: AttendFn) -> Tensor:
        """x: [T, d] block rows at ``positions`` [T] -> [T, d]."""
        x = x + self.self_attn(self.input_layernorm(x), positions, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class MarkovHead(nn.Module):
    """Vanilla Markov head: bias_k = W2 @ W1[prev_k] (section 2 step 8)."""

    def __init__(self, vocab_size: int, rank: int) -> None:
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab_size, rank)  # W1 [V, r]
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)  # W2 [V, r]

    def forward(self, prev: Tensor) -> Tensor:
        """prev: [...] token ids -> [..., V] logit bias."""
        return self.markov_w2(self.markov_w1(prev))


class ConfidenceHead(nn.Module):
    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, 1)


class DSparkDrafter(nn.Module):
    """DSpark drafter (Markov + confidence heads) or DFlash drafter (markov_rank 0, no confidence head).

    The token embedding and LM head are the target's, frozen and shared (non-persistent buffers, not in
    ``state_dict``); every other tensor has its DeepSpec name (DEEPSPEC_FORMAT.md 1.3).
    """

    def __init__(self, config: DSparkConfig, embed_weight: Tensor, lm_head_weight: Tensor) -> None:
        super().__init__()
        expected = (config.vocab_size, config.hidden_size)
        for name, w in (("embed_tokens", embed_weight), ("lm_head", lm_head_weight)):
            if tuple(w.shape) != expected:
                raise ValueError(f"target {name} weight has shape {list(w.shape)}, the drafter needs "
                                 f"[vocab_size, hidden_size] = {list(expected)}: the drafter's hidden size "
                                 f"and vocabulary must equal the target's")
        self.config = config
        d = config.hidden_size
        self.fc = nn.Linear(config.num_features * d, d, bias=False)
        self.hidden_norm = RMSNorm(d, config.rms_norm_eps)
        self.layers = nn.ModuleList(DSparkLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.markov_head = MarkovHead(config.vocab_size, config.markov_rank) if config.markov_rank else None
        self.draft_vocab_size: int | None = None  # serving option, see ``base_logits``
        self.confidence_head = (
            ConfidenceHead(config.confidence_in_features) if config.enable_confidence_head else None
        )
        self.register_buffer("embed_weight", embed_weight.detach(), persistent=False)  # [V, d]
        self.register_buffer("lm_head_weight", lm_head_weight.detach(), persistent=False)  # [V, d]
        self.temperature_table = self.temperature_table.to(embed_weight.device)  # set with the config
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """HF default init: weights ~ N(0, initializer_range), zero biases, unit norms (section 4)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    needs_token_history = False

    @property
    def name(self) -> str:
        """``dspark`` with a Markov head, ``dflash`` without."""
        return "dspark" if self.markov_head is not None else "dflash"

    @property
    def num_speculative_tokens(self) -> int:
        """gamma = the checkpoint's ``block_size``."""
        return int(self.config.block_size)

    @property
    def target_layer_ids(self) -> tuple[int, ...]:
        return tuple(self.config.target_layer_ids)

    def release(self, request_id: str) -> None:
        """No per-request state (the context cache lives in the shared paged pools)."""

    def context_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block of the context cache (keys and values, every drafter layer)."""
        cfg = self.config
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * int(cfg.num_hidden_layers) * block_size * int(cfg.num_key_value_heads) * int(cfg.head_dim) * itemsize

    def make_kv_caches(self, num_blocks: int, block_size: int, dtype: torch.dtype) -> list[KVCache]:
        """One (K, V) paged pool per layer (``sparkserve.engine.attention.new_kv_cache`` layout), zero-filled."""
        cfg, device = self.config, self.fc.weight.device
        return [new_kv_cache(num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype, device)
                for _ in self.layers]

    @torch.no_grad()
    def add_context(self, target_features: Tensor, positions: Tensor, slot_mapping: Tensor,
                    kv_caches: list[KVCache]) -> None:
        """Project context rows and store their K/V in every layer (section 2 step 3; once per row).

        target_features: [N, m*d] concatenated target-layer outputs (rows of several requests);
        positions: [N] int64 absolute positions; slot_mapping: [N] int64 cache slots of those positions
        (all on the drafter's device).
        """
        hctx = self.hidden_norm(self.fc(target_features.to(self.fc.weight.dtype)))  # [N, d]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            k, v = layer.self_attn.project_kv(hctx, positions)  # [N, Hkv, hd]
            store_kv(k, v, k_cache, v_cache, slot_mapping)

    @torch.no_grad()
    def block_hidden_states(self, anchor_ids: Tensor, starts: Tensor | list[int], block_tables: list[Sequence[int]],
                            block_size: int, kv_caches: list[KVCache], max_start: int | None = None) -> Tensor:
        """Backbone over the block [anchor, mask x (B-1)] of each request -> h = norm(x): [R, B, d].

        anchor_ids: [R] int64; starts[r] = anchor position = number of context rows of request r ([R]
        int64 tensor or list); max_start: a host bound of the starts (no host sync when given).
        """
        num_reqs, B, d = anchor_ids.shape[0], self.config.block_size, self.config.hidden_size
        starts_t = torch.as_tensor(starts, dtype=torch.int64, device=self.embed_weight.device)  # [R]
        ids, positions = self.block_inputs(anchor_ids, starts_t)
        meta = build_attention_metadata(
            q_lens=[B] * num_reqs, start_positions=starts_t, kv_lens=starts_t + B,
            block_tables=[list(t) for t in block_tables], block_size=block_size,
            causal=[False] * num_reqs, device=starts_t.device, max_kv_len=None if max_start is None else max_start + B,
        )
        return self.backbone(ids, positions, kv_caches, meta)[0].view(num_reqs, B, d)

    def block_inputs(self, anchor_ids: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        """Input ids ``[R * B]`` (each block: its anchor, then B - 1 mask tokens) and positions ``[R * B]``
        (``start .. start + B - 1``) from the anchors ``[R]`` and their positions ``starts`` ``[R]`` int64, on
        the starts' device by device ops only (no host copy: ``engine/spec_decode/draft_graph.py``)."""
        num_reqs, B = anchor_ids.shape[0], self.config.block_size
        ids = torch.full((num_reqs, B), self.config.mask_token_id, dtype=torch.int64, device=starts.device)
        ids[:, 0] = anchor_ids
        positions = starts[:, None] + torch.arange(B, device=starts.device)  # [R, B]
        return ids.flatten(), positions.flatten()

    @torch.no_grad()
    def backbone(self, input_ids: Tensor, positions: Tensor, kv_caches: list[KVCache], meta: AttentionMetadata,
                 aux_layer_ids: tuple[int, ...] = ()) -> tuple[Tensor, None]:
        """The decoder layers over block rows: input ids ``[N]`` at ``positions`` ``[N]`` -> (``norm(x)``
        ``[N, d]``, None). The block writes its own K/V through ``meta``'s slot mapping and attends
        bidirectionally (``meta`` non-causal). The signature of the target's forward, so ``StepGraph`` serves
        both (``aux_layer_ids`` is unused: the drafter has no auxiliary outputs)."""
        x = F.embedding(input_ids, self.embed_weight).to(self.fc.weight.dtype)  # [N, d]
        scale = self.config.head_dim**-0.5
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            attend = partial(paged_attention, k_cache=k_cache, v_cache=v_cache, meta=meta, scale=scale)
            x = layer(x, positions, attend)
        return self.norm(x), None

    def base_logits(self, h: Tensor) -> Tensor:
        """U = lm_head(h) with the target's head: [R, B, d] -> [R, B, V'] fp32 (section 2 step 7).

        V' = ``draft_vocab_size`` when set (serving): drafts are then restricted to token ids
        ``[0, V')``, which for BPE vocabularies are the earliest merges, i.e. the most frequent
        tokens. Still lossless: q is 0 outside the draft vocabulary and the target's residual
        distribution max(p - q, 0) covers those tokens. The LM head is the drafter's largest cost.
        """
        weight = self.lm_head_weight if self.draft_vocab_size is None else self.lm_head_weight[: self.draft_vocab_size]
        return F.linear(h, weight.to(h.dtype)).float()

    def _markov_bias(self, prev: Tensor) -> Tensor:
        """B_k = W2 @ W1[prev_k] over the draft vocabulary: [R] -> [R, V'] fp32."""
        assert self.markov_head is not None
        w2 = self.markov_head.markov_w2.weight  # [V, r]
        if self.draft_vocab_size is not None:
            w2 = w2[: self.draft_vocab_size]
        return F.linear(self.markov_head.markov_w1(prev), w2).float()

    @torch.no_grad()
    def sample_block(self, h: Tensor, base_logits: Tensor, batch: DraftBatch) -> DraftOutput:
        """Markov head + sampling + confidence head (section 2 steps 8-9), slot by slot.

        h: [R, B, d]; base_logits: U [R, B, V'] fp32, turned into the step logits Z = U + B(prev) in
        place (no [R, B, V'] copy); rows sample as ``batch`` says (greedy / coupled / free,
        ``engine/spec_decode/draft_sampling.py``). q = softmax of the processed Z (temperature, top-k,
        top-p, min-p) is what the free rows' drafts were sampled from.
        """
        sampler = SlotSampler(batch, self.config.block_size, base_logits.device)
        prev = batch.anchor_ids
        prevs = []
        for k in range(self.config.block_size):
            z = base_logits[:, k]
            if self.markov_head is not None:
                z += self._markov_bias(prev)  # [R, V']
            prevs.append(prev)
            prev = sampler.draw(z)
        tokens, probs, num_tokens = sampler.result()
        markov_prev = torch.stack(prevs, 1) if self.markov_head is not None else None
        greedy = batch.sampling.temperature == 0  # [R] bool on the device (greedy rows have temperature 0)
        return DraftOutput(tokens, probs, self._confidence(h, markov_prev, greedy), num_tokens)

    def _confidence(self, h: Tensor, prev: Tensor | None, greedy: Tensor) -> Tensor | None:
        """c_k = sigmoid((w . [h_k ; W1[prev_k]] + b) / T_k) in fp32; h: [R, B, d], prev: [R, B].

        T_k: ``confidence_temperatures_greedy`` for rows whose request is greedy (``greedy`` ``[R]`` bool, on
        the device) when the checkpoint has them, else ``confidence_temperatures`` (sequential temperature
        scaling, section 5); read from ``temperature_table`` (no host copy per step).
        """
        if self.confidence_head is None:
            return None
        feats = h.float()
        if self.config.confidence_head_with_markov and self.markov_head is not None and prev is not None:
            feats = torch.cat((feats, self.markov_head.markov_w1(prev).float()), -1)  # [R, B, d+r]
        proj = self.confidence_head.proj
        logit = F.linear(feats, proj.weight.float(), proj.bias.float()).squeeze(-1)  # [R, B]
        temps = self.temperature_table.index_select(0, greedy.long())  # [R, B]
        return torch.sigmoid(logit / temps)

    def confidence_temperature_matrix(self, greedy: Sequence[bool]) -> Tensor:
        """Per row calibration temperatures [R, B] fp32 (CPU) for requests with the given greedy flags."""
        rows = torch.tensor([1 if g else 0 for g in greedy], dtype=torch.long)
        return _temperature_table(self.config)[rows]

    @property
    def config(self) -> DSparkConfig:
        return self._config

    @config.setter
    def config(self, config: DSparkConfig) -> None:
        """Setting the config refreshes ``temperature_table`` ``[2, B]`` fp32 (row 0 sampled, row 1 greedy
        temperatures), a non-persistent buffer on the drafter's device (one copy here, none per step)."""
        self._config = config
        old = self._buffers.get("temperature_table")
        table = _temperature_table(config)
        self.register_buffer("temperature_table", table if old is None else table.to(old.device), persistent=False)

    @torch.no_grad()
    def propose(self, batch: DraftBatch) -> DraftOutput:
        """One batched drafter forward for R requests (section 2 steps 2-9; ``Drafter`` Protocol).

        The block tables cover ``start + B`` positions; the cache slots of positions start..start+B-1
        are overwritten (no context rows exist there yet).
        """
        h = self.block_hidden_states(batch.anchor_ids, batch.starts, batch.block_tables, batch.block_size,
                                     batch.kv_caches, batch.max_start)
        return self.propose_from_hidden(h, batch)

    @torch.no_grad()
    def propose_from_hidden(self, h: Tensor, batch: DraftBatch) -> DraftOutput:
        """Steps 7-9 from the backbone's output ``h`` ``[R, B, d]`` (``block_hidden_states``, or a step graph's
        replay): LM head, Markov head, sampling, confidences."""
        return self.sample_block(h, self.base_logits(h), batch)
