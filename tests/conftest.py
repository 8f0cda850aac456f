from __future__ import annotations

from pathlib import Path

import pytest

from bot.core.config import Settings
from tests.tiny_model import tiny_settings, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer, written once per test session."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def tiny_model_settings(tiny_model_dir: Path) -> Settings:
    """Settings whose [model] is the tiny model, on CPU."""
    return tiny_settings(tiny_model_dir)
