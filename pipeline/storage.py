"""Bytes on storage: whole-file atomic writes and content hashes.

Every file this tool writes for others to trust (manifests, model files, pseudo-label files,
dataset descriptions) goes through :func:`atomic_write_bytes`: a reader sees the old file or the
new one, never half of one. Every file whose integrity a later stage relies on is recorded with
its :func:`sha256_file`. Both take local paths and ``s3://`` locations (:mod:`pipeline.fs`):
an object store has no rename, but an upload appears only once complete, so there a write is one
whole upload with the same guarantee.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.fs import S3Path, location


def sha256_file(path: str | Path | S3Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with location(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path | S3Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one."""
    path = location(path)
    if isinstance(path, S3Path):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); a plain open() would give 0666 less the umask,
        # which is what others on shared storage (another uid's Ray workers) need to read it
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only set it)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: set and restore (a moment's race, on such systems only)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path | S3Path, obj: Any) -> None:
    # Serialise first: a value json cannot encode must fail before anything touches the disk.
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    atomic_write_bytes(path, text.encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path | S3Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in a manifest")


def remove_numbered_beyond(folder: str | Path | S3Path, prefix: str, suffix: str,
                           count: int) -> list[str]:
    """Remove ``folder/<prefix>NNNNN<suffix>`` files numbered ``count`` or above; returns their
    names. Per-rank (per-reader) files of an earlier attempt with more ranks would otherwise be
    merged with this attempt's: rank 0 calls it when every rank writes its own again."""
    removed = []
    for path in location(folder).glob(f"{prefix}*{suffix}"):
        number = path.name[len(prefix):len(path.name) - len(suffix)]
        if number.isdigit() and int(number) >= count:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return sorted(removed)


@contextlib.contextmanager
def flocked(guard: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the local file ``guard`` (made if missing) inside the
    block: processes on one host take turns at a read-modify-write. The file is kept, since
    removing it would race the next process to open it."""
    with open(guard, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
