"""Shared fixtures: the embedded SmolLM2-135M-Instruct, loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from engine.loader import LoadedModel, default_model_path, load_model


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
