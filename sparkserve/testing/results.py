"""Shared by the scripts: print a JSON result and write it to a file."""

from __future__ import annotations

import json
from typing import Any


def emit(result: dict[str, Any], out: str | None) -> None:
    """Print ``result`` as indented JSON and, when ``out`` is given, write it there too."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
