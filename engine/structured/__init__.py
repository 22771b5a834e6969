"""Structured outputs: grammars (xgrammar) compiled from JSON schemas, regexes, choices and tool
definitions (``grammar.py``, no torch: the server compiles before any SSE byte) and the engine's
logits mask that enforces them on the target's p and the drafter's q (``logits_mask.py``)."""
