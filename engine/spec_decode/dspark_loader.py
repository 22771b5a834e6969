"""DeepSpec checkpoint I/O of DSpark / DFlash drafters (Qwen3 variant); the config is ``dspark_config.py``.

Checkpoint layout (DEEPSPEC_FORMAT.md section 1): a folder with ``config.json`` (the target's HF config
with the drafter keys of section 1.2 overridden) and one ``model.safetensors`` whose tensor names have
no prefix and whose shapes are those of section 1.3. ``embed_tokens.weight`` / ``lm_head.weight`` are
frozen copies of the target's and are optional here: when absent the target's are used.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sparkserve.engine.spec_decode.dspark import DSparkDrafter
from sparkserve.engine.spec_decode.dspark_config import DSparkConfig, random_drafter_config

__all__ = ["DSparkConfig", "expected_tensor_shapes", "load_drafter", "random_drafter_config", "save_drafter"]

SHARED_TENSORS = ("embed_tokens.weight", "lm_head.weight")


def expected_tensor_shapes(config: DSparkConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every drafter-owned tensor (DEEPSPEC_FORMAT.md 1.3, without the shared ones)."""
    d, hd, r, inter = config.hidden_size, config.head_dim, config.markov_rank, config.intermediate_size
    q_dim, kv_dim = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "fc.weight": (d, config.num_features * d), "hidden_norm.weight": (d,), "norm.weight": (d,),
    }
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        layer = {
            "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (q_dim, d), "self_attn.k_proj.weight": (kv_dim, d),
            "self_attn.v_proj.weight": (kv_dim, d), "self_attn.o_proj.weight": (d, q_dim),
            "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
            "mlp.gate_proj.weight": (inter, d), "mlp.up_proj.weight": (inter, d),
            "mlp.down_proj.weight": (d, inter),
        }
        if config.attention_bias:
            layer.update({"self_attn.q_proj.bias": (q_dim,), "self_attn.k_proj.bias": (kv_dim,),
                          "self_attn.v_proj.bias": (kv_dim,), "self_attn.o_proj.bias": (d,)})
        shapes.update({p + name: shape for name, shape in layer.items()})
    if r > 0:
        shapes["markov_head.markov_w1.weight"] = (config.vocab_size, r)
        shapes["markov_head.markov_w2.weight"] = (config.vocab_size, r)
    if config.enable_confidence_head:
        shapes["confidence_head.proj.weight"] = (1, config.confidence_in_features)
        shapes["confidence_head.proj.bias"] = (1,)
    return shapes


def _read_checkpoint(file: Path, config: DSparkConfig, device: str) -> dict[str, torch.Tensor]:
    """Read and validate every tensor: missing, mis-shaped or unknown names raise ValueError."""
    expected = expected_tensor_shapes(config)
    shared_shape = (config.vocab_size, config.hidden_size)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(file), framework="pt", device=device) as f:
        names = set(f.keys())
        for name in sorted(names - set(expected)):
            if name not in SHARED_TENSORS:
                raise ValueError(f"{file}: unexpected tensor {name!r} (not in DEEPSPEC_FORMAT.md 1.3 for "
                                 f"this config)")
        for name, shape in expected.items():
            if name not in names:
                raise ValueError(f"{file}: missing tensor {name!r} (expected shape {list(shape)})")
        for name in sorted(names):
            shape = expected.get(name, shared_shape)
            got = tuple(f.get_slice(name).get_shape())
            if got != shape:
                raise ValueError(f"{file}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")
            tensors[name] = f.get_tensor(name)
    return tensors


def load_drafter(
    path: str | Path,
    embed_weight: torch.Tensor | None,  # [V, d] target input embedding (None: must be in the checkpoint)
    lm_head_weight: torch.Tensor | None,  # [V, d] target output head (None: must be in the checkpoint)
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> DSparkDrafter:
    """Load a DeepSpec DSpark / DFlash checkpoint folder (config.json + model.safetensors).

    ``embed_tokens.weight`` / ``lm_head.weight`` are taken from the checkpoint when present (frozen
    copies of the target's, DEEPSPEC_FORMAT.md 1.1), else from the given target weights.
    """
    folder = Path(path)
    config = DSparkConfig.from_json(folder / "config.json")
    tensors = _read_checkpoint(folder / "model.safetensors", config, str(device))
    shared = {}
    for name, given in zip(SHARED_TENSORS, (embed_weight, lm_head_weight), strict=True):
        found = tensors.pop(name, None)
        if found is None and given is None:
            raise ValueError(f"{folder}: {name!r} is neither in the checkpoint nor given by the target")
        shared[name] = (found if found is not None else given).to(device=device, dtype=dtype)
    with torch.device("meta"):
        drafter = DSparkDrafter(config, shared["embed_tokens.weight"], shared["lm_head.weight"])
    drafter.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True, assign=True)
    return drafter.eval().requires_grad_(False)


def save_drafter(
    drafter: DSparkDrafter,
    path: str | Path,
    include_shared: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Write ``config.json`` + ``model.safetensors`` with DeepSpec names (bf16 by default).

    ``include_shared`` also writes ``embed_tokens.weight`` / ``lm_head.weight`` like DeepSpec does.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    drafter.config.to_json(folder / "config.json")
    tensors = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in drafter.state_dict().items()}
    if include_shared:
        for name, t in zip(SHARED_TENSORS, (drafter.embed_weight, drafter.lm_head_weight), strict=True):
            tensors[name] = t.detach().to("cpu", dtype).contiguous().clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
