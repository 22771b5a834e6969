"""Read llama.cpp GGUF files: metadata, model config and dequantised weights (numpy; no torch).

Weights are dequantised to float32 at load time with the ``gguf`` library's vectorised numpy
kernels and renamed to Hugging Face names, so ``LlamaForCausalLM.load_weights`` consumes them
like a safetensors checkpoint. llama.cpp's converter permutes the rows of the Q and K projections
of llama-arch models (interleaved RoPE pairs); :func:`unpermute_qk` undoes it so the model can use
the rotate-half convention.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from sparkserve.engine.models.config import ModelConfig

if TYPE_CHECKING:  # torch stays out of the tokenizer's import path (engine.tokenizer reads GGUF metadata)
    from sparkserve.engine.quant import BlockQuant

SUPPORTED_TYPES = frozenset(getattr(GGMLQuantizationType, n) for n in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """Memory-map a GGUF file (tensor data is read lazily)."""
    return GGUFReader(os.fspath(path))


def gguf_field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """Value of a metadata key: str, int, float, bool, or a list of them; ``default`` when absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    if field.types[0] == GGUFValueType.ARRAY:
        if field.types[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def gguf_model_config(reader: GGUFReader) -> ModelConfig:
    """Build the ModelConfig from ``general.architecture`` and the ``{arch}.*`` metadata keys."""
    arch = gguf_field(reader, "general.architecture")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ValueError("GGUF rope_freqs (llama3-style frequency factors) is not supported")

    def key(name: str, default: Any = None) -> Any:
        value = gguf_field(reader, f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF file lacks metadata key {arch}.{name}")
        return value

    hidden, heads = key("embedding_length"), key("attention.head_count")
    scaling = None
    if gguf_field(reader, f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
    elif gguf_field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ValueError(f"unsupported GGUF rope scaling {gguf_field(reader, f'{arch}.rope.scaling.type')!r}")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(tensors["token_embd.weight"].shape[1]),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=key("attention.head_count_kv", heads),
        head_dim=key("attention.key_length", hidden // heads),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=key("context_length"),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    )


def hf_tensor_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> Hugging Face name (None = not a model weight, e.g. rope tables)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    layer, leaf, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[leaf]}.{kind}"


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation. weight: [num_heads * hd, ...] -> same shape.

    The converter maps HF row ``(head, half, i)`` (rotate-half pairs ``i`` and ``i + hd/2``) to
    GGUF row ``(head, i, half)`` (interleaved pairs); this is the inverse.
    """
    rest = weight.shape[1:]
    w = weight.reshape(num_heads, weight.shape[0] // num_heads // 2, 2, *rest)
    return w.swapaxes(1, 2).reshape(weight.shape)


def dequantize_tensor(tensor: Any) -> np.ndarray:
    """A reader tensor as float32 numpy in row-major (HF) shape; ValueError for unsupported types."""
    qtype = tensor.tensor_type
    if qtype not in SUPPORTED_TYPES:
        name = getattr(qtype, "name", str(qtype))
        raise ValueError(
            f"GGUF tensor {tensor.name!r} has quantisation type {name}, which sparkserve cannot "
            f"dequantise; supported: {sorted(t.name for t in SUPPORTED_TYPES)}"
        )
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # ggml lists dims fastest-first
    array = np.asarray(dequantize(tensor.data, qtype), dtype=np.float32).reshape(shape)
    return array if array.flags.writeable else array.copy()  # F32 comes back as a read-only memmap view


def iter_gguf_weights(reader: GGUFReader, config: ModelConfig,
                      keep_quantized: bool = False) -> Iterator[tuple[str, np.ndarray | BlockQuant]]:
    """Yield (Hugging Face name, float32 array) for every model tensor, Q/K rows unpermuted (llama).

    ``keep_quantized``: Q4_0 / Q4_1 / Q8_0 tensors come as ``sparkserve.engine.quant.BlockQuant`` (their codes,
    scales and zeros, rows unpermuted the same way) instead of dequantised arrays.
    """
    if keep_quantized:
        import torch

        from sparkserve.engine.quant import gguf_block_quant
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        unpermute = config.architecture == "llama" and tensor.name.endswith((".attn_q.weight", ".attn_k.weight"))
        heads = config.num_attention_heads if ".attn_q." in tensor.name else config.num_key_value_heads
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        block = None
        if keep_quantized and len(shape) == 2:
            block = gguf_block_quant(np.asarray(tensor.data), tensor.tensor_type.name, shape)  # type: ignore[arg-type]
        if block is not None:
            if unpermute:
                order = unpermute_qk(np.arange(shape[0]), heads)
                block = block.permute_rows(torch.from_numpy(np.ascontiguousarray(order)))
            yield name, block
            continue
        array = dequantize_tensor(tensor)
        if unpermute:
            array = unpermute_qk(array, heads)
        yield name, array
