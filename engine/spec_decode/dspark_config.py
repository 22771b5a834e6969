"""DSpark / DFlash drafter hyper-parameters (DEEPSPEC_FORMAT.md 1.2) and their ``config.json`` form.

Its own module so the drafter (``dspark.py``) and the checkpoint I/O (``dspark_loader.py``) both import it
and neither imports the other's importer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DSparkConfig:
    """Drafter hyper-parameters (DEEPSPEC_FORMAT.md 1.2). ``markov_rank == 0`` and no confidence head
    is the DFlash drafter.

    Attributes:
        target_layer_ids: target decoder layers whose raw outputs are concatenated into the context
            features (-1 = embedding output), strictly increasing.
        block_size: B, input slots per block = draft tokens per round.
        mask_token_id: token embedded at block slots 1..B-1.
        confidence_temperatures: per block slot calibration temperature of the confidence logit
            (sequential temperature scaling, DESIGN.md section 1), fitted at sampling temperature 1 and
            applied to sampled requests; None = all 1.0.
        confidence_temperatures_greedy: the same, fitted on greedy (T = 0) verification and applied to
            greedy requests, whose survival differs (exact match instead of min(1, p/q)); None = use
            ``confidence_temperatures``. A sparkserve extension: other DeepSpec readers ignore it.
        num_target_layers: the target's layer count (informational, validates target_layer_ids).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    target_layer_ids: tuple[int, ...]
    block_size: int
    mask_token_id: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    markov_rank: int = 0
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = True
    attention_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    num_target_layers: int | None = None
    confidence_temperatures: tuple[float, ...] | None = None
    confidence_temperatures_greedy: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        dims = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "block_size")
        for name in dims:
            if getattr(self, name) < 1:
                raise ValueError(f"DSparkConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        ids = self.target_layer_ids
        if not ids or ids[0] < -1 or any(b <= a for a, b in zip(ids, ids[1:], strict=False)):
            raise ValueError(f"target_layer_ids must be non-empty, >= -1, strictly increasing: {ids}")
        if self.num_target_layers is not None and ids[-1] >= self.num_target_layers - 1:
            raise ValueError(f"target_layer_ids {ids} must not include the final target layer")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} outside vocab [0, {self.vocab_size})")
        if self.markov_rank < 0:
            raise ValueError("markov_rank must be >= 0")
        if self.markov_rank > 0 and self.markov_head_type != "vanilla":
            raise ValueError(f"markov_head_type {self.markov_head_type!r} not supported (only 'vanilla')")
        if self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank == 0:
            raise ValueError("confidence_head_with_markov needs markov_rank > 0")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported (Qwen3 variant: silu)")
        for name in ("confidence_temperatures", "confidence_temperatures_greedy"):
            temps = getattr(self, name)
            if temps is not None and (len(temps) != self.block_size or min(temps) <= 0):
                raise ValueError(f"{name} needs {self.block_size} positive values, got {temps}")

    @property
    def num_features(self) -> int:
        """m, number of concatenated target layers."""
        return len(self.target_layer_ids)

    @property
    def confidence_in_features(self) -> int:
        """Input width of the confidence head: d + r with the Markov feature, d without."""
        return self.hidden_size + (self.markov_rank if self.confidence_head_with_markov else 0)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DSparkConfig:
        """Parse a DeepSpec ``config.json`` dict (Qwen3 variant); rejects Gemma4 and non-default RoPE."""
        arch = (raw.get("architectures") or [""])[0]
        if "Gemma" in arch or str(raw.get("model_type", "")).startswith("gemma"):
            raise ValueError(f"Gemma4 DSpark drafters are not supported yet (architectures={arch!r})")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"only default RoPE is supported, got {rope}")
        theta = rope.get("rope_theta", raw.get("rope_theta", 1e6))
        heads = raw["num_attention_heads"]
        def _temps(key: str) -> tuple[float, ...] | None:
            vals = raw.get(key)
            return tuple(float(t) for t in vals) if vals is not None else None

        r = int(raw.get("markov_rank", 0))
        return cls(
            hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads, vocab_size=raw["vocab_size"],
            target_layer_ids=tuple(int(i) for i in raw["target_layer_ids"]),
            block_size=raw["block_size"], mask_token_id=raw["mask_token_id"],
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            markov_rank=r, markov_head_type=raw.get("markov_head_type") or "vanilla",
            enable_confidence_head=bool(raw.get("enable_confidence_head", False)),
            confidence_head_with_markov=bool(raw.get("confidence_head_with_markov", r > 0)),
            attention_bias=bool(raw.get("attention_bias", False)),
            hidden_act=raw.get("hidden_act", "silu"),
            initializer_range=float(raw.get("initializer_range", 0.02)),
            num_target_layers=raw.get("num_target_layers"),
            confidence_temperatures=_temps("confidence_temperatures"),
            confidence_temperatures_greedy=_temps("confidence_temperatures_greedy"),
        )

    def to_dict(self) -> dict[str, Any]:
        """DeepSpec-style ``config.json`` content (loadable by DeepSpec and by ``from_dict``)."""
        out: dict[str, Any] = {"architectures": ["Qwen3DSparkModel"], "model_type": "qwen3"}
        out.update(asdict(self))
        out["target_layer_ids"] = list(self.target_layer_ids)
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        out["layer_types"] = ["full_attention"] * self.num_hidden_layers
        out["tie_word_embeddings"] = False
        out["dtype"] = "bfloat16"
        for key, keep in (("markov_head_type", self.markov_rank > 0),
                          ("confidence_head_with_markov", self.enable_confidence_head),
                          ("confidence_temperatures", self.confidence_temperatures is not None),
                          ("confidence_temperatures_greedy", self.confidence_temperatures_greedy is not None),
                          ("num_target_layers", self.num_target_layers is not None)):
            if not keep:
                out.pop(key)
        for key in ("confidence_temperatures", "confidence_temperatures_greedy"):
            if out.get(key) is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> DSparkConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _field(target: Mapping[str, Any] | object, name: str, default: Any = None) -> Any:
    value = target.get(name) if isinstance(target, Mapping) else getattr(target, name, None)
    return default if value is None else value


def random_drafter_config(
    target_config: Mapping[str, Any] | object,
    target_layer_ids: tuple[int, ...] | list[int],
    block_size: int = 7,
    num_layers: int = 1,
    markov_rank: int = 64,
    confidence: bool = True,
    mask_token_id: int | None = None,
) -> DSparkConfig:
    """Drafter config for a randomly initialised drafter of any target (HF config dict or an object with
    the same attribute names). ``markov_rank=0, confidence=False`` gives a DFlash drafter. The mask token
    defaults to the last vocabulary id.
    """
    heads = _field(target_config, "num_attention_heads")
    hidden = _field(target_config, "hidden_size")
    rope = _field(target_config, "rope_parameters", {}) or {}
    vocab = _field(target_config, "vocab_size")
    return DSparkConfig(
        hidden_size=hidden, intermediate_size=_field(target_config, "intermediate_size"),
        num_hidden_layers=num_layers, num_attention_heads=heads,
        num_key_value_heads=_field(target_config, "num_key_value_heads", heads),
        head_dim=_field(target_config, "head_dim", hidden // heads), vocab_size=vocab,
        target_layer_ids=tuple(target_layer_ids), block_size=block_size,
        mask_token_id=vocab - 1 if mask_token_id is None else mask_token_id,
        rms_norm_eps=float(_field(target_config, "rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", _field(target_config, "rope_theta", 1e6))),
        markov_rank=markov_rank, enable_confidence_head=confidence,
        confidence_head_with_markov=confidence and markov_rank > 0,
        num_target_layers=_field(target_config, "num_hidden_layers"),
    )
