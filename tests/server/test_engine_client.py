"""The server's engine Protocols (server/engine_client.py) declare every field the server reads, and the
output path reads them as attributes: no ``getattr`` with a default, no ``hasattr`` (issue 27)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from sparkserve.engine.loader import default_model_path
from sparkserve.engine.outputs import RequestOutput as EngineRequestOutput
from sparkserve.engine.tokenizer import load_tokenizer
from sparkserve.server import engine_client
from sparkserve.testing.fake_engine import FakeTokenizer

SERVER = Path(engine_client.__file__).resolve().parent
OUTPUT_PATH = ("serving.py", "serving_chat.py", "serving_completions.py", "serving_responses.py",
               "serving_tokenize.py", "detokenizer.py", "sse.py", "metrics.py", "metrics_glue.py")
"""The server modules an engine output or the tokenizer passes through on its way to a response."""


def _members(protocol: type) -> set[str]:
    """The data members a Protocol declares (annotated attributes and properties)."""
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n, v in vars(protocol).items() if isinstance(v, property)}
    return names


def test_the_engine_output_holds_every_field_the_protocol_declares() -> None:
    declared = _members(engine_client.RequestOutput)
    assert {"prompt_logprobs", "speculation", "num_cached_tokens"} <= declared
    assert declared <= {f.name for f in dataclasses.fields(EngineRequestOutput)}


def test_both_tokenizers_hold_every_field_the_protocol_declares() -> None:
    declared = _members(engine_client.Tokenizer)
    assert {"bos_token_id", "chat_template"} <= declared
    try:
        real = load_tokenizer(default_model_path())
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    for tokenizer in (FakeTokenizer(), real):
        missing = {n for n in declared if not hasattr(tokenizer, n)}
        assert not missing, (type(tokenizer).__name__, missing)


def test_the_output_path_reads_no_field_with_a_default() -> None:
    found = []
    for name in OUTPUT_PATH:
        tree = ast.parse((SERVER / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and (
                    (node.func.id == "getattr" and len(node.args) == 3) or node.func.id == "hasattr"):
                found.append(f"{name}:{node.lineno}")
    assert found == []
