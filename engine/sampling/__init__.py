"""Sampling: one implementation of the transforms (penalties, bias, temperature, top-k / top-p / min-p),
keyed counter-based randomness, per-step sampling metadata and logprobs. Used by the plain sampling
path, the verifier (rejection sampling / Gumbel coupling) and every drafter."""
