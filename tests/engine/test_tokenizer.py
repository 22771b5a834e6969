"""Tokenizer (GGUF and HF folder) and chat-template rendering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparkserve.engine.loader import default_model_path
from sparkserve.engine.tokenizer import Tokenizer, load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference tokenizer must never reach the hub

TEXTS = [
    "Hello world! It's 2024-06-30, pi is 3.14159 and 1234567890 has ten digits.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n\n\tx = {'a': [1, 2]}",
    "中文测试：今天天气很好。日本語のテキスト、한국어 텍스트",
    "emoji 🤗🚀 and flags 🇫🇷, accents: café naïve Ångström",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces, trailing tabs\t\t\n\n\nmany newlines   ",
]


@pytest.fixture(scope="module")
def smol_path():
    try:
        return default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def smol_tok(smollm2) -> Tokenizer:
    """The GGUF-built tokenizer of the session's shared SmolLM2 load."""
    return smollm2.tokenizer


def test_gguf_ids_match_transformers(smol_path, smol_tok) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)
    for text in TEXTS:
        assert smol_tok.encode(text) == ref.encode(text, add_special_tokens=False), text


def test_digits_are_split_individually(smol_tok) -> None:
    """SmolLM2's pre-tokenizer ("smollm") isolates every digit."""
    ids = smol_tok.encode("x 2024")
    assert [smol_tok.decode([i]) for i in ids][-4:] == ["2", "0", "2", "4"]


def test_decode_round_trip(smol_tok) -> None:
    for text in TEXTS:
        ids = smol_tok.encode(text)
        assert smol_tok.decode(ids, skip_special_tokens=False) == text
    ids = smol_tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smol_tok.decode(ids) == "user\nHi"
    assert smol_tok.convert_ids_to_tokens(smol_tok.encode(" the")) == ["Ġthe"]


def test_special_and_stop_tokens(smol_tok) -> None:
    assert (smol_tok.bos_token_id, smol_tok.eos_token_id, smol_tok.vocab_size) == (1, 2, 49152)
    assert smol_tok.eos_token == "<|im_end|>"
    assert 2 in smol_tok.stop_token_ids and smol_tok.stop_token_ids[0] == 2
    assert smol_tok.token_to_id("<|endoftext|>") in smol_tok.stop_token_ids
    assert set(range(17)) == smol_tok.all_special_ids
    assert smol_tok.encode("hi", add_special_tokens=True) == smol_tok.encode("hi")  # add_bos_token is false


def test_smollm2_chat_template(smol_tok) -> None:
    user = {"role": "user", "content": "What is the capital of France?"}
    text = smol_tok.apply_chat_template([user])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    own = smol_tok.apply_chat_template([{"role": "system", "content": "Be brief."}, user], add_generation_prompt=False)
    assert own == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    parts = {"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                         {"type": "text", "text": "of France?"}]}
    assert smol_tok.apply_chat_template([parts]) == text
    with pytest.raises(ValueError, match="only text parts"):
        smol_tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])


QWEN_LIKE = """{%- if messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and not loop.first %}
        {{- raise_exception('System message must be first') }}
    {%- elif message.role != 'system' %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


@pytest.fixture()
def qwen_like_folder(tmp_path, smol_tok):
    """An HF folder: SmolLM2's vocabulary with a Qwen-style ChatML template and generation config."""
    smol_tok.backend.save(str(tmp_path / "tokenizer.json"))
    config = {"chat_template": QWEN_LIKE, "eos_token": {"content": "<|im_end|>"}, "bos_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return tmp_path


def test_qwen_like_template_from_hf_folder(qwen_like_folder) -> None:
    tok = load_tokenizer(qwen_like_folder)
    assert tok.eos_token_id == 2 and tok.bos_token_id is None and tok.stop_token_ids[:2] == (2, 0)
    messages = [
        {"role": "system", "content": "You are Qwen."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
    ]
    assert tok.apply_chat_template(messages, enable_thinking=False) == (
        "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert tok.apply_chat_template(messages[1:2]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="System message must be first"):
        tok.apply_chat_template([messages[1], messages[0]])


def test_chat_template_jinja_file_wins(qwen_like_folder) -> None:
    (qwen_like_folder / "chat_template.jinja").write_text("{{ bos_token }}[{{ messages | length }}]{{ eos_token }}")
    tok = load_tokenizer(qwen_like_folder)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[1]<|im_end|>"


def test_missing_template_is_a_value_error(qwen_like_folder) -> None:
    (qwen_like_folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok = load_tokenizer(qwen_like_folder)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_tokenizer_module_does_not_import_torch(smol_path) -> None:
    code = ("import sys; from sparkserve.engine.tokenizer import load_tokenizer; "
            f"t = load_tokenizer({str(smol_path)!r}); assert t.encode('hi'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    root = str(Path(__file__).resolve().parents[2])
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
