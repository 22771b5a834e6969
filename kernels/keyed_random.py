"""Keyed, counter-based randomness: every random number is a pure function of
``(request key, sequence position, draw index[, token id])``.

Why: with a per-request sequential generator, the numbers a request consumes depend on how many drafts
it verified in each step (i.e. on load), so a seeded request returned different text alone and under
load. A counter-based generator (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3")
removes the state: the uniform for "the acceptance test of the draft at position 37" is the same
number whatever else happened. It is also graph-safe (pure tensor ops, no ``torch.Generator`` loop).

The hash is MurmurHash3's 32-bit finaliser (``fmix32``) applied to chained inputs. Arithmetic is done
on non-negative int64 tensors masked to 32 bits, so it is identical on every device; the pure-Python
``fmix32`` is the reference the tests compare with.

Draw kinds (``Draw``): each kind of random decision at a position has its own stream so that no number
is used twice. Unseeded requests also mix in their verify-step count (``attempt``), so a position that
is re-drafted after a rejection gets fresh numbers; seeded requests use ``attempt = 0`` so their numbers
depend on the position only (which makes Gumbel-max coupling reproducible, see ``engine/spec_decode``).
"""

from __future__ import annotations

import enum
import hashlib

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_C1 = 0x85EBCA6B
_C2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B9
_POS_MIX = 0x27D4EB2F
_DRAW_MIX = 0x165667B1
_NUM_DRAW_KINDS = 8


class Draw(enum.IntEnum):
    """Independent random streams per position."""

    TOKEN = 0  # a token sampled from p (plain sampling, bonus token, Gumbel-coupled drafts and targets)
    ACCEPT = 1  # the uniform of a draft's acceptance test
    RECOVER = 2  # the recovered token drawn from the residual after a rejection
    DRAFT = 3  # a drafter's own (uncoupled) sample


def fmix32(h: int) -> int:
    """MurmurHash3 32-bit finaliser on a Python int (reference of ``_fmix32``)."""
    h &= _MASK32
    h ^= h >> 16
    h = (h * _C1) & _MASK32
    h ^= h >> 13
    h = (h * _C2) & _MASK32
    return h ^ (h >> 16)


def _fmix32(h: Tensor) -> Tensor:
    """``fmix32`` on an int64 tensor of values in [0, 2^32) (products fit after masking)."""
    h = h ^ (h >> 16)
    h = (h * _C1) & _MASK32
    h = h ^ (h >> 13)
    h = (h * _C2) & _MASK32
    return h ^ (h >> 16)


def request_key(seed: int | None, request_id: str, engine_seed: int = 0) -> int:
    """The 64-bit key of a request's random streams, as a non-negative Python int < 2^63.

    A seeded request's key depends only on its seed (the same seed gives the same text in any run);
    an unseeded one's on its id and the engine seed. Raises ValueError for a seed outside int64.
    """
    if seed is not None:
        if not -(2**63) <= seed < 2**63:
            raise ValueError(f"seed {seed} is outside the int64 range")
        material = f"seed:{seed}"
    else:
        material = f"id:{engine_seed}:{request_id}"
    return int.from_bytes(hashlib.blake2b(material.encode(), digest_size=8).digest(), "little") >> 1


def draw_index(kind: Draw, attempt: int = 0) -> int:
    """Index of a stream: the kind, and for unseeded requests the verify step it is used in."""
    return int(kind) + _NUM_DRAW_KINDS * attempt


def _row_state(keys: Tensor, positions: Tensor, draws: Tensor | int) -> Tensor:
    """Per-row 32-bit state from (key [N] int64 >= 0, position [N] int64, draw [N] or int)."""
    lo, hi = keys & _MASK32, (keys >> 32) & _MASK32
    h = _fmix32(lo ^ _fmix32((hi + _GOLDEN) & _MASK32))
    h = _fmix32(h ^ ((positions * _POS_MIX) & _MASK32))
    return _fmix32(h ^ ((torch.as_tensor(draws, dtype=torch.int64, device=keys.device) * _DRAW_MIX) & _MASK32))


def _to_unit(h: Tensor) -> Tensor:
    """32-bit hashes -> float32 uniforms in (0, 1): odd multiples of 2^-24 (exact in fp32, never 0 or 1)."""
    return ((h >> 9) * 2 + 1).to(torch.float32) * (2.0**-24)


def keyed_uniform(keys: Tensor, positions: Tensor, draws: Tensor | int) -> Tensor:
    """One uniform in (0, 1) per row. keys, positions: [N] int64; draws: [N] int64 or an int.
    Returns [N] float32."""
    return _to_unit(_fmix32(_row_state(keys, positions, draws) ^ _GOLDEN))


def keyed_gumbel(keys: Tensor, positions: Tensor, draws: Tensor | int, vocab_size: int) -> Tensor:
    """Gumbel(0, 1) noise for every token of every row: ``-log(-log(u[n, v]))``.

    ``argmax(logits + noise)`` samples softmax(logits) (the Gumbel-max trick); with the same keys and
    positions two distributions p and q choose with the same noise (Gumbel-max coupling). Element
    ``[n, v]`` depends only on (key, position, draw, v), so a prefix of the vocabulary (a drafter's
    reduced draft vocabulary) sees the same numbers. Returns [N, vocab_size] float32.
    """
    state = _row_state(keys, positions, draws)[:, None]  # [N, 1]
    tokens = torch.arange(vocab_size, dtype=torch.int64, device=keys.device) * _GOLDEN  # [V]
    u = _to_unit(_fmix32((state + tokens) & _MASK32))  # [N, V]
    return -torch.log(-torch.log(u))
