from __future__ import annotations

import os
from pathlib import Path

from pipeline import storage


def test_sha256_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert storage.sha256_file(p) == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_atomic_write_bytes_replaces(tmp_path: Path) -> None:
    p = tmp_path / "a" / "b.bin"
    storage.atomic_write_bytes(p, b"1")
    storage.atomic_write_bytes(p, b"22")
    assert p.read_bytes() == b"22" and os.listdir(p.parent) == ["b.bin"]
