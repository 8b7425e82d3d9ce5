"""Shared fixtures: a small digits dataset made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.dataset import DatasetInfo, prepare_digits


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled digits corpus as shards (default fractions, 100 samples a shard)."""
    out = tmp_path_factory.mktemp("digits")
    prepare_digits(out, shard_size=100)
    return out


@pytest.fixture(scope="session")
def digits_info(digits_dir: Path) -> DatasetInfo:
    from pipeline.dataset import load_dataset

    return load_dataset(digits_dir)
