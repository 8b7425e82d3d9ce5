"""A dataset for DataLoader workers to report which modules they found already imported
(tests/test_data.py). Kept apart from the pipeline so that unpickling it imports nothing of it."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset


class ModulesSeen(IterableDataset):
    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield torch.tensor([name in sys.modules for name in self.names])
