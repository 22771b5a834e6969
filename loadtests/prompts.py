"""Evaluation prompts read at run time from ../shared/data/prompts (never copied into the project)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

_FILES = {
    "mt_bench": ("mt_bench_question.jsonl", "turns"),
    "vicuna": ("vicuna_bench_question.jsonl", "turns"),
    "spec_bench": ("spec_bench_question.jsonl", "turns"),
    "gsm8k": ("gsm8k_test.jsonl", "question"),
    "humaneval": ("HumanEval.jsonl.gz", "prompt"),
}


def shared_data_dir() -> Path:
    """The shared data folder: $SPARKSERVE_DATA, else ../shared/data beside the repository."""
    env = os.environ.get("SPARKSERVE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def load_prompts(name: str) -> list[str]:
    """First-turn prompts of an evaluation set; ``spec_bench:CATEGORY`` keeps one Spec-Bench category
    (translation, summarization, qa, math_reasoning, rag, and the MT-bench ones).

    Raises:
        KeyError: unknown set name.
        FileNotFoundError: the shared data file is missing (with the path looked at).
        ValueError: the category matches no record.
    """
    name, _, category = name.partition(":")
    return [turns[0] for turns in load_conversations(name, category or None)]


def load_conversations(name: str, category: str | None = None) -> list[list[str]]:
    """User turns of each record of an evaluation set (MT-bench, Vicuna and Spec-Bench records have
    two turns for MT-bench questions, one otherwise; GSM8K and HumanEval one), optionally only
    records whose ``category`` field is ``category`` (Spec-Bench: writing, roleplay, reasoning, math,
    coding, extraction, stem, humanities, translation, summarization, qa, math_reasoning, rag).

    Raises:
        KeyError: unknown set name.
        FileNotFoundError: the shared data file is missing (with the path looked at).
        ValueError: ``category`` matches no record (the error lists the categories present).
    """
    if name not in _FILES:
        raise KeyError(f"unknown prompt set {name!r}; choose from {sorted(_FILES)}")
    filename, key = _FILES[name]
    path = shared_data_dir() / "prompts" / filename
    if not path.exists():
        raise FileNotFoundError(
            f"prompt file {path} not found: set SPARKSERVE_DATA to the shared data folder"
        )
    opener = gzip.open if filename.endswith(".gz") else open
    conversations: list[list[str]] = []
    categories: set[str] = set()
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                categories.add(str(record.get("category", "")))
                if category is not None and record.get("category") != category:
                    continue
                value = record[key]
                conversations.append(list(value) if isinstance(value, list) else [value])
    if category is not None and not conversations:
        raise ValueError(f"no {name} record has category {category!r}; categories: {sorted(categories)}")
    return conversations
