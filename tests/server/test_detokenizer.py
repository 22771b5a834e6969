"""Incremental detokenizer and stop strings: the byte-level fake tokenizer (every UTF-8 byte its own
token) and, when installed, the real SmolLM2 GGUF tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkserve.server.detokenizer import IncrementalDetokenizer, StopStringDecoder
from sparkserve.testing.fake_engine import EOS, FakeTokenizer

TEXTS = [
    "Hello, world!",
    "Café ☕ 🎉 naïve",
    "中文字符和日本語のテキスト",
    "def f(x):\n    return x ** 2  # 🐍",
    "emoji family 👨‍👩‍👧 flags 🇫🇷 and digits 12345",
]


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> object:
    try:
        from sparkserve.engine.loader import default_model_path
        from sparkserve.engine.tokenizer import load_tokenizer

        return load_tokenizer(default_model_path())
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"SmolLM2 tokenizer not available: {exc}")


def stream(decoder: StopStringDecoder, ids: Sequence[int], step: int = 1) -> tuple[list[str], int]:
    """Feed ``ids`` ``step`` at a time; returns the deltas and the counted tokens."""
    deltas, counted = [], 0
    for start in range(0, len(ids), step):
        chunk = ids[start : start + step]
        delta = decoder.process(chunk, final=start + step >= len(ids))
        deltas.append(delta.text)
        counted += delta.num_tokens
        if delta.stop is not None:
            break
    return deltas, counted


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokens_never_split_characters(text: str) -> None:
    tok = FakeTokenizer()
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add_token(t) for t in tok.encode(text)] + [detok.flush()]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_real_tokenizer_incremental_equals_full_decode(smollm2_tokenizer: object, text: str) -> None:
    tok = smollm2_tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.add_token(t) for t in ids] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_real_tokenizer_stop_string(smollm2_tokenizer: object) -> None:
    tok = smollm2_tokenizer
    text = "The capital of France is Paris. It is a big city."
    decoder = StopStringDecoder(tok, (), stop=["Paris"])
    ids = tok.encode(text)
    deltas, counted = stream(decoder, ids)
    assert "".join(deltas) == "The capital of France is " and decoder.stopped_by == "Paris"
    assert tok.decode(ids[:counted]).endswith("Paris") and not tok.decode(ids[: counted - 1]).endswith(
        "Paris"
    )


def test_dangling_partial_character_is_flushed_as_replacement() -> None:
    tok = FakeTokenizer()
    ids = tok.encode("ok ☕")[:-1]  # cut inside the 3-byte character
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add_token(t) for t in ids) == "ok "
    assert detok.flush() == "\ufffd"


def test_special_tokens_skipped_and_stop_token_not_decoded() -> None:
    tok = FakeTokenizer()
    decoder = StopStringDecoder(tok)
    ids = tok.encode("hi") + [EOS]
    delta = decoder.process(ids, final=True, skip_last=True)
    assert (delta.text, delta.num_tokens, delta.stop) == ("hi", 3, None)


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_stop_string_across_tokens_counts_completing_token(step: int) -> None:
    tok = FakeTokenizer()
    ids = tok.encode("abc STOP def")
    decoder = StopStringDecoder(tok, (), stop=["xyz", "STOP"])
    deltas, counted = stream(decoder, ids, step)
    assert "".join(deltas) == "abc " and decoder.stopped_by == "STOP"
    assert counted == len(tok.encode("abc STOP"))  # up to and including the token completing "STOP"
    assert all("S" not in d for d in deltas)  # never emitted, not even partially


def test_earliest_stop_wins_and_prefixes_are_held_then_released() -> None:
    tok = FakeTokenizer()
    decoder = StopStringDecoder(tok, (), stop=["world", "lo"])
    assert "".join(stream(decoder, tok.encode("Hello, world"))[0]) == "Hel"
    decoder = StopStringDecoder(tok, (), stop=["abc!"])
    deltas = [decoder.process([t]).text for t in tok.encode("ab abd abc")]
    assert "".join(deltas) == "ab abd " and decoder.process([], final=True).text == "abc"


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list("ab é☕🎉x\n")), max_size=30),
    stop=st.text(alphabet=st.sampled_from(list("ab é☕x")), min_size=1, max_size=4),
    step=st.integers(1, 5),
)
def test_streamed_text_equals_reference_cut(text: str, stop: str, step: int) -> None:
    """Property: whatever the token chunking, the streamed text is the full text cut before the
    first occurrence of the stop string, and no delta contains a broken character."""
    tok = FakeTokenizer()
    ids = tok.encode(text)
    deltas, counted = stream(StopStringDecoder(tok, (), stop=[stop]), ids, step)
    position = text.find(stop)
    assert "".join(deltas) == (text if position < 0 else text[:position])
    assert not any("\ufffd" in d for d in deltas)
    if position >= 0:  # counted tokens end exactly with the token that completed the stop string
        assert stop in tok.decode(ids[:counted]) and stop not in tok.decode(ids[: counted - 1])
    else:
        assert counted == len(ids)


_UNICODE = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from(list("é☕🎉👨‍👩‍👧 中文\n")),
    max_size=24,
)


@settings(max_examples=150, deadline=None)
@given(text=_UNICODE, chunks=st.lists(st.integers(1, 6), min_size=1, max_size=8))
def test_real_tokenizer_incremental_is_the_full_decode_for_any_text(
    smollm2_tokenizer: object, text: str, chunks: list[int]
) -> None:
    """Property (real byte-level BPE): for any text and any chunking of its tokens (speculative steps
    emit several at once), the deltas join to the full decode, and no delta ends inside a character
    unless the full decode itself holds a replacement character there."""
    tok = smollm2_tokenizer
    ids = tok.encode(text)
    decoder = StopStringDecoder(tok, tok.encode("<|im_start|>assistant\n"))
    deltas, start, i = [], 0, 0
    while start < len(ids):
        size = chunks[i % len(chunks)]
        deltas.append(decoder.process(ids[start : start + size], final=start + size >= len(ids)).text)
        start, i = start + size, i + 1
    full = tok.decode(ids)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list("abc é☕🎉\n")), max_size=30),
    stops=st.lists(st.text(alphabet=st.sampled_from(list("abc é☕")), min_size=1, max_size=5), min_size=1,
                   max_size=3),
    chunks=st.lists(st.integers(1, 5), min_size=1, max_size=6),
)
def test_stop_matcher_never_emits_or_retracts_text(text: str, stops: list[str], chunks: list[int]) -> None:
    """Property (several stop strings, variable chunking): what has been sent is at every moment a
    prefix of the final answer (nothing is ever taken back), the final answer is the text cut at the
    first stop string to be completed (the leftmost of those complete at that character; every
    character of this alphabet is one token or one multi-byte character), and no stop string appears
    in what was sent."""
    tok = FakeTokenizer()
    ids = tok.encode(text)
    decoder = StopStringDecoder(tok, (), stop=stops)
    expected, positions = text, []
    for end in range(1, len(text) + 1):
        positions = [p for p in (text[:end].find(s) for s in stops) if p >= 0]
        if positions:
            expected = text[: min(positions)]
            break
    sent, start, i = "", 0, 0
    while start < len(ids) and decoder.stopped_by is None:
        size = chunks[i % len(chunks)]
        sent += decoder.process(ids[start : start + size], final=start + size >= len(ids)).text
        start, i = start + size, i + 1
        assert expected.startswith(sent)
    assert sent == expected and not any(s in sent for s in stops)
    assert (decoder.stopped_by is not None) == bool(positions)
