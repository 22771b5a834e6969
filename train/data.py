"""``gen-data``: regenerate the target's own responses to a fixed, seeded prompt subset (DEEPSPEC_FORMAT.md
section 4, data pipeline steps 2-3), and read them back for training.

Output folder ``data/<name>/`` (git-ignored): ``meta.json`` (sampling settings, source, seed) and
``samples.jsonl``, one line per prompt: ``{"id", "kind", "prompt_ids", "response_ids"}``. The prompt is
one user message rendered with the model's chat template (generation prompt added); the loss mask is
the response tokens, the end-of-turn token included. The job appends in chunks and skips ids already
written, so it resumes after an interruption.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from sparkserve.train.generate import generate_paged

if TYPE_CHECKING:  # engine.loader needs the gguf package, which the GPU machine lacks
    from sparkserve.engine.loader import LoadedModel

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "train" / "train_prompts.jsonl"
KINDS = ("chat", "code", "math")
MIN_LOSS_TOKENS = 14  # DeepSpec drops samples with fewer loss tokens


MAX_PROMPT_TOKENS = 384
"""Prompts longer than this (tokens, chat template included) are skipped by gen-data by default."""


@dataclass(frozen=True)
class GenSettings:
    """Sampling settings of the regeneration (DeepSpec's Qwen3 example: 0.7 / 0.8 / 20)."""

    num_prompts: int = 3000
    seed: int = 0
    max_prompt_tokens: int = MAX_PROMPT_TOKENS
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    chunk: int = 64


@dataclass(frozen=True)
class Sample:
    """One training sequence: ids = prompt + response; loss mask = positions >= loss_start."""

    id: str
    ids: list[int]
    loss_start: int


def select_prompts(path: str | Path, num: int, seed: int) -> list[dict]:
    """A seeded subset mixing chat / code / math equally (by the ``kind`` field), interleaved."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training prompts not found at {path}; pass --prompts PATH "
                                "(../shared/data/train/train_prompts.jsonl in this project)")
    by_kind: dict[str, list[dict]] = {k: [] for k in KINDS}
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            by_kind.setdefault(row["kind"], []).append(row)
    rng = random.Random(seed)
    picks = []
    for i, kind in enumerate(KINDS):
        rows = by_kind[kind]
        rng.shuffle(rows)
        picks.append(rows[: num // len(KINDS) + (1 if i < num % len(KINDS) else 0)])
    mixed = [row for group in zip(*picks, strict=False) for row in group]
    used = {r["id"] for r in mixed}
    return mixed + [r for group in picks for r in group if r["id"] not in used]


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """One user message with the model's own template and generation prompt (no added specials)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode(rendered, add_special_tokens=False)


def _engine_generate(loaded: LoadedModel, prompts: list[list[int]], s: GenSettings, seeds: list[int]) -> list[list[int]]:
    """The project's batched engine (CPU runner)."""
    from sparkserve.engine.config import EngineArgs
    from sparkserve.engine.core import EngineCore
    from sparkserve.scheduler.sampling_params import SamplingParams

    dtype = "bfloat16" if loaded.model.embed_tokens.weight.dtype == torch.bfloat16 else "float32"
    core = EngineCore(EngineArgs(dtype=dtype, max_num_seqs=len(prompts), max_num_batched_tokens=4096,
                                 kv_cache_memory_gb=1.0, drafter="none"), loaded=loaded)
    params = [SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
                             seed=seed) for seed in seeds]
    return core.generate_batch(prompts, params, request_prefix="gen")


def generate_dataset(loaded: LoadedModel, out_dir: str | Path, prompts_path: str | Path, settings: GenSettings,
                     backend: str = "auto", time_budget_s: float | None = None) -> Path:
    """Write / extend ``out_dir/samples.jsonl``. backend: "engine" | "loop" | "auto" (engine on CPU,
    the plain batched loop on an accelerator). Stops cleanly after ``time_budget_s`` seconds."""
    import time

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = loaded.model.embed_tokens.weight.device
    if backend == "auto":
        backend = "engine" if device.type == "cpu" else "loop"
    meta = {"settings": asdict(settings), "prompts": str(prompts_path), "model": loaded.name, "backend": backend,
            "template": "one user message, model chat template, add_generation_prompt=True"}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    samples = out / "samples.jsonl"
    done = set()
    if samples.exists():
        done = {json.loads(line)["id"] for line in samples.read_text().splitlines() if line.strip()}
    rows = [r for r in select_prompts(prompts_path, settings.num_prompts, settings.seed) if r["id"] not in done]
    tok = loaded.tokenizer
    stop_ids = set(tok.stop_token_ids)
    start, skipped = time.monotonic(), 0
    bar = tqdm(total=len(rows), desc="gen-data", unit="prompt")
    with samples.open("a", encoding="utf-8") as f:
        for c in range(0, len(rows), settings.chunk):
            if time_budget_s is not None and time.monotonic() - start > time_budget_s:
                break
            chunk = rows[c:c + settings.chunk]
            encoded = [(r, chat_prompt_ids(tok, r["prompt"])) for r in chunk]
            kept = [(r, ids) for r, ids in encoded if len(ids) <= settings.max_prompt_tokens]
            skipped += len(chunk) - len(kept)
            seeds = [settings.seed * 1_000_003 + zlib.crc32(r["id"].encode()) for r, _ in kept]
            prompts = [ids for _, ids in kept]
            if backend == "engine":
                outs = _engine_generate(loaded, prompts, settings, seeds)
            else:
                outs = generate_paged(loaded.model, prompts, settings.max_tokens, stop_ids, settings.temperature,
                                      settings.top_p, settings.top_k, seeds[0] if seeds else settings.seed)
            for (r, ids), resp in zip(kept, outs, strict=True):
                f.write(json.dumps({"id": r["id"], "kind": r["kind"], "prompt_ids": ids, "response_ids": resp}) + "\n")
            f.flush()
            bar.update(len(chunk))
    bar.close()
    meta["skipped_long_prompts_this_run"] = skipped
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return samples


def read_samples(path: str | Path, max_len: int | None = None) -> list[Sample]:
    """Samples with at least 14 loss tokens, truncated to ``max_len`` tokens."""
    path = Path(path)
    if path.is_dir():
        path = path / "samples.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no samples at {path}; run `gen-data` first")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        ids = (row["prompt_ids"] + row["response_ids"])[:max_len]
        if len(ids) - len(row["prompt_ids"]) >= MIN_LOSS_TOKENS:
            out.append(Sample(row["id"], ids, len(row["prompt_ids"])))
    return out


def split_holdout(samples: list[Sample], fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out) by a hash of the id: stable when the data grows."""
    cut = int(fraction * 10_000)
    held = [s for s in samples if zlib.crc32(f"{seed}:{s.id}".encode()) % 10_000 < cut]
    ids = {s.id for s in held}
    return [s for s in samples if s.id not in ids], held
