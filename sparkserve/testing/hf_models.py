"""Tiny random transformers models and a 96-token byte-level tokenizer, for comparing our model code
against the reference implementation (tests of the model definitions, the loaders and the quantised path).

transformers is imported on first use (it is a test extra, not a dependency of the server).
"""

from __future__ import annotations

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CASES = {
    "llama-tied": ("llama", True, None),
    "llama-untied-llama3rope": ("llama", False, LLAMA3_ROPE),
    "llama-linear-rope": ("llama", True, {"rope_type": "linear", "factor": 2.0}),
    "qwen2-bias": ("qwen2", False, None),
    "qwen3-qknorm": ("qwen3", True, None),
}


def make_hf_model(arch: str, tied: bool, rope_scaling: dict | None) -> torch.nn.Module:
    """A tiny random transformers model with weights large enough for distinct logits."""
    import transformers

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    rope = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": 10000.0}
    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
    extra = {"head_dim": 24} if arch == "qwen3" else {}  # H * hd != d
    config = getattr(transformers, classes[arch][0])(**common, **extra, rope_parameters=rope)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, classes[arch][1])(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "embed" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.1)
    return model



TINY_TOKENS = [chr(i) for i in range(33, 127)] + ["\u00a1", "\u00a2"]  # byte-level alphabet, 96 tokens


def write_tiny_tokenizer(folder) -> None:
    """A 96-token byte-level BPE (no merges) as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(TINY_TOKENS)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
