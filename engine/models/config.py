"""Model configuration of the Llama-family decoders (Llama, SmolLM2, Qwen2/Qwen2.5, Qwen3).

One frozen dataclass that both loaders fill: the Hugging Face loader from ``config.json``
(:meth:`ModelConfig.from_hf_config`), the GGUF loader from the file's ``{arch}.*`` metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ARCHITECTURES = ("llama", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-style decoder.

    Attributes:
        architecture: "llama" (also SmolLM2) | "qwen2" (q/k/v bias) | "qwen3" (per-head q/k RMSNorm).
        vocab_size: V, rows of the token embedding and the LM head.
        hidden_size: d, width of the residual stream.
        intermediate_size: I, width of the SwiGLU MLP.
        num_hidden_layers: decoder layers.
        num_attention_heads: H query heads; num_key_value_heads: Hkv (GQA, H % Hkv == 0).
        head_dim: hd (Qwen3 may have H * hd != d).
        rms_norm_eps: epsilon inside every RMSNorm.
        rope_theta: RoPE base.
        rope_scaling: None, or a dict with "rope_type" in ("default", "linear", "llama3") plus that
            type's fields ("factor"; llama3 also "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings").
        max_position_embeddings: longest context the model was trained for (tokens).
        tie_word_embeddings: the LM head is the token embedding.
        attention_bias: q/k/v projections carry a bias (Qwen2 always; Llama/Qwen3 when configured).
        qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3).
        bos_token_id / eos_token_id: from the config (first id when the config lists several).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; expected one of {ARCHITECTURES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("rms_norm_eps and rope_theta must be positive")
        if self.rope_scaling is not None:
            _validate_rope_scaling(self.rope_scaling)

    @property
    def o_proj_bias(self) -> bool:
        """Whether the attention output projection has a bias (Llama/Qwen3 tie it to attention_bias)."""
        return self.attention_bias and self.architecture != "qwen2"

    @property
    def rope_type(self) -> str:
        """"default" when unscaled."""
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers v4 or v5 layout).

        v4 keeps ``rope_theta`` / ``rope_scaling`` at the top level; v5 nests both in ``rope_parameters``.
        """
        model_type = d.get("model_type", "")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"unsupported model_type {model_type!r}; expected one of {ARCHITECTURES}")
        rope_params = dict(d.get("rope_parameters") or {})
        rope_theta = rope_params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
        scaling = d.get("rope_scaling") or rope_params or None
        num_heads = d["num_attention_heads"]
        return cls(
            architecture=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=normalize_rope_scaling(scaling),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bool(d.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=_first_id(d.get("bos_token_id")),
            eos_token_id=_first_id(d.get("eos_token_id")),
        )


def normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Canonical rope-scaling dict: ``rope_type`` key (old configs say ``type``); None when unscaled."""
    if not scaling:
        return None
    out = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    out["rope_type"] = scaling.get("rope_type") or scaling.get("type") or "default"
    if out["rope_type"] == "default":
        return None
    _validate_rope_scaling(out)
    return out


def _validate_rope_scaling(scaling: dict[str, Any]) -> None:
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: {ROPE_TYPES}")
    required = {"linear": ("factor",), "llama3": (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    for key in required.get(rope_type, ()):
        if key not in scaling:
            raise ValueError(f"rope scaling {rope_type!r} needs field {key!r}")


def _first_id(value: int | list[int] | None) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value
