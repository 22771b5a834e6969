"""Sampling: one implementation of the transforms (penalties, bias, temperature, top-k / top-p / min-p),
drawing with keyed counter-based randomness (the hash itself is ``kernels/keyed_random.py``, shared with
the Triton kernels), per-step sampling metadata and logprobs. Used by the plain sampling path, the
verifier (rejection sampling / Gumbel coupling) and every drafter."""
