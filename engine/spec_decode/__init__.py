"""Speculative decoding: the ``Drafter`` Protocol and its drafters (DSpark / DFlash, draft model), the
speculator (drafter context cache, scratch blocks), the draft store (q under draft ids) and the verifier
(ragged rejection sampling and Gumbel-max coupling)."""
