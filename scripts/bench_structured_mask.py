"""Per-token cost of a grammar token mask (us / token) for llguidance and xgrammar on this machine.

Walks a valid JSON document for a few schemas token by token: at every token, compute the mask of
the whole vocabulary, then advance the matcher by the token. The wall time divided by the tokens is
the per-token mask cost (mask + advance; what constrained decoding adds per emitted token on the host).

    python scripts/bench_structured_mask.py --out bench_results/structured_mask_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from sparkserve.engine.loader import default_model_path
from sparkserve.engine.tokenizer import load_tokenizer

SCHEMAS = {
    "flat": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}, {"name": "Ada Lovelace", "age": 36}),
    "nested_array_enum": ({"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
                 "required": ["id", "tags"]},
        "status": {"enum": ["active", "inactive", "banned"]}}, "required": ["user", "status"]},
        {"user": {"id": 123456, "tags": ["alpha", "beta", "gamma delta"]}, "status": "inactive"}),
    "bounded": ({"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                  "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                                  "city": {"type": "string", "maxLength": 24}},
                 "required": ["name", "age", "city"], "additionalProperties": False},
                {"name": "Ada Lovelace", "age": 36, "city": "London"}),
}


def bench_llguidance(tok, tokens_of, repeats: int) -> dict[str, float]:
    import llguidance as llg
    t0 = time.perf_counter()
    lltok = llg.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=list(tok.stop_token_ids))
    out = {"tokenizer_init_s": time.perf_counter() - t0}
    for name, (schema, doc) in SCHEMAS.items():
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        t0 = time.perf_counter()
        matcher = llg.LLMatcher(lltok, grammar)
        out[f"{name}_compile_ms"] = (time.perf_counter() - t0) * 1e3
        ids = tokens_of(doc)
        t0 = time.perf_counter()
        for _ in range(repeats):
            matcher.reset()
            for t in ids:
                matcher.compute_bitmask()
                assert matcher.consume_token(t), matcher.get_error()
        out[f"{name}_us_per_token"] = (time.perf_counter() - t0) / (repeats * len(ids)) * 1e6
    return out


def bench_xgrammar(tok, tokens_of, repeats: int) -> dict[str, float]:
    import transformers
    import xgrammar as xgr
    t0 = time.perf_counter()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size, stop_token_ids=list(tok.stop_token_ids))
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    out = {"tokenizer_init_s": time.perf_counter() - t0}
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    for name, (schema, doc) in SCHEMAS.items():
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        out[f"{name}_compile_ms"] = (time.perf_counter() - t0) * 1e3
        matcher = xgr.GrammarMatcher(compiled)
        ids = tokens_of(doc)
        t0 = time.perf_counter()
        for _ in range(repeats):
            matcher.reset()
            for t in ids:
                matcher.fill_next_token_bitmask(bitmask)
                assert matcher.accept_token(t)
        out[f"{name}_us_per_token"] = (time.perf_counter() - t0) / (repeats * len(ids)) * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    tok = load_tokenizer(default_model_path())

    def tokens_of(doc: object) -> list[int]:
        return tok.encode_text(json.dumps(doc, separators=(",", ":")))

    result: dict[str, object] = {"machine": platform.processor() or platform.machine(), "vocab_size": tok.vocab_size,
                                 "threads": 1, "whitespace": "none (compact separators)"}
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        try:
            result[name] = fn(tok, tokens_of, args.repeats)
        except Exception as exc:  # noqa: BLE001 - a missing engine is reported, not fatal
            result[name] = {"error": repr(exc)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
