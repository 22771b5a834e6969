"""Write a model's tokenizer as Hugging Face files (``tokenizer.json``, ``tokenizer_config.json``).

    python -m sparkserve.engine.export_tokenizer --model model.gguf --out ./tokenizer

A router that tokenizes requests itself (``vllm-router``'s token-based policies load a Hugging Face
tokenizer) needs the exact tokenizer the replicas use; with a GGUF model and no hub to download from, this
exports the one sparkserve builds from the GGUF metadata (:func:`sparkserve.engine.tokenizer.gguf_tokenizer`):
``tokenizer.json`` is the ``tokenizers`` backend as it is, ``tokenizer_config.json`` carries the chat
template and the BOS / EOS tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparkserve.engine.tokenizer import Tokenizer, load_tokenizer


def export_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir`` (created); returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_json = out_dir / "tokenizer.json"
    tokenizer.backend.save(str(tokenizer_json))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "chat_template": tokenizer.chat_template,
        "model_max_length": None,
    }
    config_json = out_dir / "tokenizer_config.json"
    config_json.write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2))
    return [tokenizer_json, config_json]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: the embedded model)")
    parser.add_argument("--out", required=True, help="folder to write the tokenizer files into")
    ns = parser.parse_args()
    from sparkserve.engine.loader import default_model_path  # imports torch: only for the default model

    for path in export_tokenizer(load_tokenizer(ns.model or default_model_path()), Path(ns.out)):
        print(path)


if __name__ == "__main__":
    main()
