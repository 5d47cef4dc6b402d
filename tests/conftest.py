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


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; everything else always runs."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def one_error_line():
    """``run(args, *names)``: invoke ``moesim args``, assert exit code 2 and exactly one
    ``moesim: error:`` line naming each of ``names``, and return that line."""
    from typer.testing import CliRunner

    from moesim.cli.main import app

    def run(args: list[str], *names: str) -> str:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moesim: error: "), result.output
        for name in names:
            assert name in lines[0], (name, lines[0])
        return lines[0]

    return run
