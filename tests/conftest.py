"""Shared fixtures: the embedded SmolLM2-135M-Instruct, loaded once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from sparkserve.engine.loader import LoadedModel, default_model_path, load_model

# The checkout's root holds folders named like other distributions' packages (kernels/, server/ ...).
# `python -m pytest` puts the working directory on sys.path, where `import kernels` (transformers does
# it) would find ours instead of Hugging Face's; the product is imported as `sparkserve.*` only.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF in fp32 (skips when the package is not installed,
    except under CI=true where it fails)."""
    try:
        path = default_model_path()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            raise  # CI installs the model (scripts/setup.sh): a missing file is a failure there
        pytest.skip(str(exc))
    return load_model(path, dtype=torch.float32)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tiers are markers, not file names: a test that uses the real model gets ``real_model``."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_model)
