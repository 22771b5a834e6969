"""Tokenizer and chat template (no torch: the server imports this module).

:func:`load_tokenizer` reads a Hugging Face folder (``tokenizer.json`` + ``tokenizer_config.json``,
optional ``chat_template.jinja`` / ``generation_config.json``) or a GGUF file, from whose
``tokenizer.ggml.*`` metadata it builds a byte-level BPE with the ``tokenizers`` library.
Chat templates render in a sandboxed jinja2 environment with the Hugging Face conventions.

:meth:`Tokenizer.encode_chat` tokenizes a rendered chat so that only the template's own markup yields
special tokens: ``<|im_end|>`` typed inside a message is text, so a user cannot close its own turn and
forge a system turn (see :func:`sparkserve.engine.chat_template.encode_chat_markup_only`).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

import jinja2
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from sparkserve.engine.chat_template import chat_environment, encode_chat_markup_only, flatten_content

if TYPE_CHECKING:
    from sparkserve.engine.structured.grammar import GrammarCompiler

# Special tokens that end a generation turn in common chat formats (ChatML, Llama 3, Gemma, Phi).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT2_PRE = ("default", "gpt2", "gpt-2", "olmo", "jais")
_DIGIT_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r")


class Tokenizer:
    """Text <-> token ids, special tokens, stop tokens and chat template of one model.

    Attributes:
        bos_token_id / eos_token_id: None when the model has none.
        stop_token_ids: ids that end generation: eos, eos ids from the model / generation config,
            and end-of-turn specials present in the vocabulary (e.g. ``<|im_end|>``).
        all_special_ids: ids of special (control) tokens, skipped by ``decode`` by default.
        vocab_size: tokenizer vocabulary incl. added tokens (may be below the model's padded V).
        chat_template: jinja source, None when the model ships none.
    """

    def __init__(self, backend: BackendTokenizer, *, chat_template: str | None, bos_token_id: int | None,
                 eos_token_id: int | None, extra_stop_ids: Sequence[int] = ()) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self.all_special_ids: frozenset[int] = frozenset(i for i, tok in added.items() if tok.special)
        stops = [eos_token_id, *extra_stop_ids]
        stops += [i for i in map(backend.token_to_id, END_OF_TURN_TOKENS) if i in self.all_special_ids]
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in stops if i is not None))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in the text map to their ids.
        ``add_special_tokens`` adds what the tokenizer's post-processor adds (e.g. BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` with special-token strings encoded as plain text (never as specials)."""
        return self._text_backend.encode(text, add_special_tokens=False).ids

    @cached_property
    def grammar_compiler(self) -> GrammarCompiler:
        """The grammar compiler (structured outputs) for this vocabulary, built once (~0.3 s, imports xgrammar)."""
        from sparkserve.engine.structured.grammar import GrammarCompiler

        vocab = [""] * self.vocab_size
        for token, i in self.backend.get_vocab(with_added_tokens=True).items():
            vocab[i] = token
        return GrammarCompiler(vocab, self.stop_token_ids)

    @cached_property
    def _text_backend(self) -> BackendTokenizer:
        # A copy with encode_special_tokens set: the flag is per tokenizer object, and flipping it on
        # the shared backend would race with encodes on other threads.
        backend = BackendTokenizer.from_str(self.backend.to_str())
        backend.encode_special_tokens = True
        return backend

    @cached_property
    def special_tokens(self) -> dict[str, int]:
        """Special (control) token strings -> ids, e.g. ``{"<|im_end|>": 2}``."""
        added = self.backend.get_added_tokens_decoder()
        return {tok.content: i for i, tok in added.items() if tok.special}

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """Render ``messages`` with the chat template and tokenize the result so that only the
        template's markup yields special tokens (message contents are text, special strings included).

        Raises ValueError as :meth:`apply_chat_template` does, and when a content holds special-token
        text that the template transforms so it cannot be told apart from markup.
        """
        messages = [flatten_content(m) for m in messages]
        return encode_chat_markup_only(
            lambda ms: self.apply_chat_template(ms, add_generation_prompt, **kwargs),
            lambda text: self.backend.encode(text, add_special_tokens=False).ids,
            self.encode_text, self.special_tokens, messages,
        )

    @cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes one token stands for (the longest vocabulary string's
        UTF-8 length; byte-level strings over-count, which keeps it an upper bound). A text longer than
        ``max_model_len * max_token_bytes`` bytes cannot fit the context, whatever its tokenization."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        return max((len(token.encode("utf-8")) for token in vocab), default=1)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (special tokens dropped unless ``skip_special_tokens`` is False)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Vocabulary strings (byte-level form, e.g. ``Ġthe``) of ``ids``; None for unknown ids."""
        return [self.backend.id_to_token(i) for i in ids]

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary string of one id (None if out of range)."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary string (None if absent)."""
        return self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        """BOS string (the chat template's ``bos_token``), None when the model has none."""
        return None if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        """EOS string (the chat template's ``eos_token``), None when the model has none."""
        return None if self.eos_token_id is None else self.backend.id_to_token(self.eos_token_id)

    @cached_property
    def _template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain completion prompt instead")
        return chat_environment().from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` with the model's chat template.

        A message's ``content`` may be a list of parts ``[{"type": "text", "text": ...}]``; the
        text parts are joined. ``kwargs`` (``tools``, ``enable_thinking`` ...) reach the template.
        Raises ValueError for a missing template, a non-text part or a ``raise_exception`` call.
        """
        try:
            return self._template.render(
                messages=[flatten_content(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template error: {exc}") from exc


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Tokenizer of a Hugging Face model folder or a GGUF file."""
    path = pathlib.Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf_tokenizer(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json (and is not a .gguf file)")
    return _load_hf_tokenizer(path)


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _as_ids(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _load_hf_tokenizer(folder: pathlib.Path) -> Tokenizer:
    backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
    tok_config = _read_json(folder / "tokenizer_config.json")
    model_config = _read_json(folder / "config.json")
    gen_config = _read_json(folder / "generation_config.json")

    def special_id(key: str) -> int | None:
        token = tok_config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        found = backend.token_to_id(token) if token else None
        fallback = _as_ids(model_config.get(f"{key}_id"))
        return found if found is not None else (fallback[0] if fallback else None)

    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text(encoding="utf-8")
    extra = _as_ids(gen_config.get("eos_token_id")) + _as_ids(model_config.get("eos_token_id"))
    return Tokenizer(backend, chat_template=template, bos_token_id=special_id("bos_token"),
                     eos_token_id=special_id("eos_token"), extra_stop_ids=extra)


def _gguf_pre_tokenizer(pre: str) -> tuple[normalizers.Normalizer | None, pre_tokenizers.PreTokenizer]:
    """Normalizer and pre-tokenizer matching llama.cpp's ``tokenizer.ggml.pre`` name."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        return None, byte_level
    if pre in _DIGIT_PRE:
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3", "qwen2", "deepseek-r1-qwen"):
        regex = _QWEN2_SPLIT if pre in ("qwen2", "deepseek-r1-qwen") else _LLAMA3_SPLIT
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated")
        raw_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        normalizer = normalizers.NFC() if pre in ("qwen2", "deepseek-r1-qwen") else None
        return normalizer, pre_tokenizers.Sequence([split, raw_bytes])
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")


def _load_gguf_tokenizer(path: pathlib.Path) -> Tokenizer:
    from sparkserve.engine.gguf_loader import open_gguf

    return gguf_tokenizer(open_gguf(path))


def gguf_tokenizer(reader: Any) -> Tokenizer:
    """Build the tokenizer from an open ``gguf.GGUFReader``'s ``tokenizer.*`` metadata: byte-level BPE
    over ``tokenizer.ggml.tokens`` / ``merges``, control tokens (token_type 3) as special tokens."""
    from sparkserve.engine.gguf_loader import gguf_field

    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (only byte-level BPE 'gpt2')")
    tokens: list[str] = gguf_field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges", [])]
    token_types: list[int] = gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    backend = BackendTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    normalizer, pre_tokenizer = _gguf_pre_tokenizer(gguf_field(reader, "tokenizer.ggml.pre", "default"))
    if normalizer is not None:
        backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    # token_type 3 = control (special), 4 = user-defined (matched verbatim in text, not special).
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(token_types) if t == 4])
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(token_types) if t == 3])
    bos = gguf_field(reader, "tokenizer.ggml.bos_token_id")
    if bos is not None and gguf_field(reader, "tokenizer.ggml.add_bos_token", False):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B:1", special_tokens=[(tokens[bos], bos)])
    eot = [gguf_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    return Tokenizer(backend, chat_template=gguf_field(reader, "tokenizer.chat_template"), bos_token_id=bos,
                     eos_token_id=gguf_field(reader, "tokenizer.ggml.eos_token_id"),
                     extra_stop_ids=[i for i in eot if i is not None])
