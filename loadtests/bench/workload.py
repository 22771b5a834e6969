"""What ``sparkserve bench`` sends: prompts from the evaluation sets or synthetic random text.

A :class:`Conversation` is one unit of work: one request per user turn, sent one after the other
(turn 2 carries turn 1's question and the answer the server gave). A :class:`PromptPool` hands out
conversations that no earlier call handed out, so every repetition and concurrency level sends
prompts the servers have not seen (a prefix cache cannot favour repeats); when a set runs out, the
pool starts over and marks the repeats (``reused``).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from sparkserve.loadtests.prompts import load_conversations

DATASETS = {
    "mtbench": "mt_bench", "mt_bench": "mt_bench",
    "specbench": "spec_bench", "spec_bench": "spec_bench",
    "gsm8k": "gsm8k", "humaneval": "humaneval", "vicuna": "vicuna",
    "random": "random",
}

# Common English words that byte-level BPE vocabularies (GPT-2, Llama, SmolLM2) hold as one token
# each with their leading space, so "n words" is close to n prompt tokens without a tokenizer; the
# measured prompt tokens (usage) are reported next to the target.
_WORDS = (
    "the of and to in is was for that on with as by at from his her they this had not are but be "
    "have one all were we when there can an which their said if do will each about how up out them "
    "then she many some so these would other into has more two like him see time could no make than "
    "first been its who now people my made over did down only way find use may water long little very "
    "after words called just where most know get through back much before go good new write our used me "
    "man too any day same right look think also around another came come work three word must because "
    "does part even place well such here take why things help put years different away again off went "
    "old number great tell men say small every found still between name should home big give air line "
    "set own under read last never us left end along while might next sound below saw something thought "
    "both few those always looked show large often together asked house world going want school important"
).split()


@dataclass
class Conversation:
    """User turns to send in order (one for single-turn sets), the output cap of each turn, and
    ``reused``: the pool had handed out these turns before."""

    turns: list[str]
    max_tokens: int
    reused: bool = False


def random_prompt(rng: random.Random, num_tokens: int) -> str:
    """About ``num_tokens`` prompt tokens of random common words (see ``_WORDS``)."""
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, num_tokens)))


class PromptPool:
    """Conversations from one set, shuffled once with ``seed``, each handed out once.

    Args:
        dataset: a key of ``DATASETS``, or several joined by "+" (records interleaved); a set may carry
            its own category as ``specbench:CATEGORY`` (e.g. ``specbench:summarization+specbench:rag``).
        max_tokens: output cap per turn (the random set draws it around ``random_output_len``).
        multi_turn: keep every user turn of a record (MT-bench and Spec-Bench's MT-bench part have
            two); otherwise only the first.
        category: Spec-Bench (or MT-bench) category filter (single sets only).
        random_input_len / random_output_len / random_range_ratio: the random set's prompt and
            output lengths in tokens, each drawn uniformly in [len * (1 - r), len * (1 + r)].
        skip: conversations of the shuffled set to pass over first (not handed out), so a grid run
            as several invocations with one seed sends each prompt once.

    Raises:
        KeyError: unknown dataset; FileNotFoundError / ValueError as :func:`load_conversations`.
    """

    def __init__(self, dataset: str, *, max_tokens: int, seed: int = 0, multi_turn: bool = False,
                 category: str | None = None, random_input_len: int = 256, random_output_len: int = 128,
                 random_range_ratio: float = 0.0, skip: int = 0) -> None:
        names, categories = [], []
        for part in dataset.split("+"):
            name, _, own = part.partition(":")
            names.append(name)
            categories.append(own or (category if "+" not in dataset else None))
        for name in names:
            if name not in DATASETS or (name == "random" and len(names) > 1):
                raise KeyError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)} or join sets by '+'")
        if not 0.0 <= random_range_ratio < 1.0:
            raise ValueError("random_range_ratio must be in [0, 1)")
        if skip < 0:
            raise ValueError("skip must be >= 0")
        self.dataset = "+".join(DATASETS[n] for n in names)
        self.categories = categories
        self.max_tokens = max_tokens
        self._rng = random.Random(seed)
        self._random = (random_input_len, random_output_len, random_range_ratio)
        self._records: list[list[str]] = []
        if self.dataset != "random":
            per_set = []
            for name, own in zip(self.dataset.split("+"), categories, strict=True):
                records = load_conversations(name, own)
                records = records if multi_turn else [r[:1] for r in records]
                self._rng.shuffle(records)
                per_set.append(records)
            # interleave the sets (a b a b ...), the longer ones' tail last
            self._records = [r for row in itertools.zip_longest(*per_set) for r in row if r is not None]
        self._next = 0
        self.handed_out = 0
        self.reused = 0
        self.take(skip)  # passed over: neither handed out nor counted as reused
        self.handed_out = self.reused = 0

    def _draw(self, length: int) -> int:
        ratio = self._random[2]
        return max(1, self._rng.randint(int(length * (1 - ratio)), int(length * (1 + ratio))))

    def take(self, n: int) -> list[Conversation]:
        """The next ``n`` conversations (fresh until the set runs out; then repeats, marked)."""
        out: list[Conversation] = []
        for _ in range(n):
            if self.dataset == "random":
                prompt = random_prompt(self._rng, self._draw(self._random[0]))
                out.append(Conversation([prompt], self._draw(self._random[1])))
            else:
                index = self._next % len(self._records)
                reused = self._next >= len(self._records)
                self.reused += reused
                out.append(Conversation(list(self._records[index]), self.max_tokens, reused))
                self._next += 1
            self.handed_out += 1
        return out
