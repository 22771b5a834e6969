"""Inference side of the trained drafters: the autoregressive baseline's proposer and checkpoint I/O.

``ARDrafter`` is a ``DSparkDrafter`` without heads whose block is causal and fed its own drafts: step k
runs [anchor, x_0 .. x_{k-1}] at positions start..start+k over the same paged context cache (KV
injection) and samples x_k from softmax(lm_head(h_k) / T). It plugs into the same batched
spec-decoding loop as DSpark / DFlash (``propose`` has the same signature and result).

Checkpoints are the DeepSpec layout (config.json + model.safetensors, bf16, no embedding / LM head);
an autoregressive checkpoint is marked by ``"drafter_type": "autoregressive"`` in config.json.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sparkserve.engine.attention import build_attention_metadata, paged_attention
from sparkserve.engine.spec_decode.draft_sampling import SlotSampler
from sparkserve.engine.spec_decode.drafter import DraftBatch, DraftOutput
from sparkserve.engine.spec_decode.dspark import DSparkDrafter
from sparkserve.engine.spec_decode.dspark_loader import load_drafter, save_drafter

AR_TYPE = "autoregressive"


class ARDrafter(DSparkDrafter):
    """Autoregressive drafter with DSpark's context path (see module docstring)."""

    @property
    def name(self) -> str:
        return "autoregressive"

    @torch.no_grad()
    def propose(self, batch: DraftBatch) -> DraftOutput:
        """B sequential steps for R requests (``Drafter`` Protocol). Overwrites the cache slots of
        positions start..start+B-1 like the block drafters."""
        num_reqs, device = batch.num_rows, self.embed_weight.device
        starts = batch.starts.to(device)  # [R]
        sampler = SlotSampler(batch, self.config.block_size, device)
        ids = batch.anchor_ids[:, None]  # [R, 1]
        scale = self.config.head_dim**-0.5
        for k in range(self.config.block_size):
            q_len = k + 1
            positions = starts[:, None] + torch.arange(q_len, device=device)
            meta = build_attention_metadata(
                q_lens=[q_len] * num_reqs, start_positions=starts, kv_lens=starts + q_len,
                block_tables=[list(t) for t in batch.block_tables], block_size=batch.block_size,
                causal=[True] * num_reqs, device=device, max_kv_len=batch.max_start + q_len)
            x = F.embedding(ids.flatten(), self.embed_weight).to(self.fc.weight.dtype)  # [R*q_len, d]
            for layer, (k_cache, v_cache) in zip(self.layers, batch.kv_caches, strict=True):
                attend = partial(paged_attention, k_cache=k_cache, v_cache=v_cache, meta=meta, scale=scale)
                x = layer(x, positions.flatten(), attend)
            h = self.norm(x).view(num_reqs, q_len, -1)[:, -1:]  # [R, 1, d]
            tok = sampler.draw(self.base_logits(h)[:, 0])  # [R]
            ids = torch.cat((ids, tok[:, None]), dim=1)
        tokens, probs, num_tokens = sampler.result()
        return DraftOutput(tokens, probs, None, num_tokens)


def is_autoregressive(path: str | Path) -> bool:
    return json.loads((Path(path) / "config.json").read_text()).get("drafter_type") == AR_TYPE


def export_drafter(drafter: DSparkDrafter, path: str | Path, max_bytes: int | None = None) -> int:
    """Write the DeepSpec layout in bf16 without the shared embedding / LM head. Returns the
    safetensors size in bytes; ValueError when it exceeds ``max_bytes``."""
    folder = Path(path)
    save_drafter(drafter, folder, include_shared=False)
    if isinstance(drafter, ARDrafter):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update({"drafter_type": AR_TYPE, "architectures": ["SparkServeARDrafter"]})
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    size = (folder / "model.safetensors").stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{folder}: drafter file is {size} bytes, over the {max_bytes}-byte limit")
    return size


def load_any_drafter(path: str | Path, embed_weight: Tensor, lm_head_weight: Tensor,
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> DSparkDrafter:
    """Load a DSpark / DFlash (``load_drafter``) or autoregressive checkpoint, frozen, in eval mode."""
    drafter = load_drafter(path, embed_weight, lm_head_weight, dtype=dtype, device=device)
    if not is_autoregressive(path):
        return drafter
    with torch.device("meta"):
        ar = ARDrafter(drafter.config, drafter.embed_weight, drafter.lm_head_weight)
    ar.load_state_dict(drafter.state_dict(), strict=True, assign=True)
    ar.embed_weight, ar.lm_head_weight = drafter.embed_weight, drafter.lm_head_weight
    return ar.eval().requires_grad_(False)
