"""The tokenizer exported for a router (from the embedded GGUF) tokenizes as the engine does."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from transformers import PreTrainedTokenizerFast

from sparkserve.engine.export_tokenizer import export_tokenizer
from sparkserve.engine.loader import LoadedModel

TEXTS = ["Hello, world!", "  leading spaces and\ttabs\nnew lines", "café ☕ 🎉 naïve", "def f(x):\n    return x**2"]


@pytest.fixture(scope="module")
def exported(smollm2: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    paths = export_tokenizer(smollm2.tokenizer, out)
    assert sorted(p.name for p in paths) == ["tokenizer.json", "tokenizer_config.json"]
    return out


def test_tokenizer_json_encodes_and_decodes_as_the_engine(smollm2: LoadedModel, exported: Path) -> None:
    backend = BackendTokenizer.from_file(str(exported / "tokenizer.json"))
    for text in TEXTS:
        ids = smollm2.tokenizer.encode(text)
        assert backend.encode(text, add_special_tokens=False).ids == ids
        assert backend.decode(ids) == text


def test_hf_tokenizer_renders_the_chat_as_the_engine(smollm2: LoadedModel, exported: Path) -> None:
    hf = PreTrainedTokenizerFast.from_pretrained(str(exported))
    assert hf.eos_token_id == smollm2.tokenizer.eos_token_id
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[2]}]
    prompt = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert hf(prompt, add_special_tokens=False).input_ids == smollm2.tokenizer.encode_chat(messages)
