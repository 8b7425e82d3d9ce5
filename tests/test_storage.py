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


def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path: Path) -> None:
    """Not mkstemp's private 0600: files on shared storage are read by other users' processes."""
    import stat

    old = os.umask(0o027)
    try:
        storage.atomic_write_bytes(tmp_path / "a.json", b"{}")
        with open(tmp_path / "b.json", "w"):
            pass
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o640
