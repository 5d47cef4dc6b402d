"""Shared fixtures: a small scenario that simulates in well under a second."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# DeepSeek-V3 shape, cut to 4 layers and 256 tokens per GPU so tests stay fast.
SMALL = [
    "model.num_layers=4",
    "parallel.tokens_per_gpu=256",
    "routing.layer_samples=2",
]


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def small_overrides() -> list[str]:
    return list(SMALL)
