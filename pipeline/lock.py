"""One process per round: a lock file beside the round's manifest.

Two commands working on the same round at once would interleave their writes to its manifest and
files. ``manifests/<run>/round-<N>.lock`` is created only where none exists (a hard link, which
fails if it does) and holds who has it (host, pid, start time, command; the pid's namespace and
start time too). A second process refuses with one line naming the holder. A lock whose process
is gone (same host and pid namespace, and no such pid, or one that started at another time: a
pid reused after a reboot) was left by a crash: it is taken over, and the log says so; two
processes that find it stale at once take it over one after the other under an ``flock`` (the
second then refuses). The lock appears with its contents or not at all (written beside it, then
hard-linked into place). A lock from another host or pid namespace cannot be checked from here;
the message says which file to delete once that process is known to be gone.

On object storage (an ``s3://`` root) there is no exclusive create through pyarrow: the lock is
written only when absent, then read back after :data:`REMOTE_SETTLE` seconds, and the process
whose token is there holds it (S3 reads are strongly consistent). Two processes can then both
hold it only if one stalls for longer than that between its check and its write.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.fs import S3Path
from pipeline.layout import RunLayout

REMOTE_SETTLE = 1.0  # seconds between writing a lock object and reading it back


class LockError(UserError, RuntimeError):
    """The round is being run by another process; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot, /proc/<pid>/stat field 22), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text.rsplit(")", 1)[1].split()[19])  # the name may hold spaces or ")"
    except (OSError, IndexError, ValueError):
        return None


def _pid_namespace() -> int | None:
    """This process's pid namespace (its inode), or None where /proc cannot say."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _stale(held: dict[str, Any], me: dict[str, Any]) -> bool:
    """Whether a lock's holder is known to be gone: same host and pid namespace (another's
    pids cannot be checked from here: containers sharing a host name, or a container since
    restarted, which has a new namespace), and its pid either gone or now another process's
    (one started at another time: a pid reused after a reboot, which the lock's own pid
    would otherwise seem to be alive as)."""
    pid = held.get("pid")
    if held.get("host") != me["host"] or not isinstance(pid, int):
        return False
    if None not in (held.get("pid_ns"), me["pid_ns"]) and held["pid_ns"] != me["pid_ns"]:
        return False
    if not _alive(pid):
        return True
    started = held.get("pid_start")
    return started is not None and _start_time(pid) not in (None, started)


def _holder(path: Path | S3Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _describe(h: dict[str, Any]) -> str:
    return (f"pid {h.get('pid')} on host {h.get('host')} since {h.get('started_at')} "
            f"(`{h.get('command', '?')}`)")


def _create(path: Path | S3Path, me: dict[str, Any]) -> bool:
    if isinstance(path, S3Path):
        if path.exists():
            return False
        path.write_text(json.dumps(me))
        time.sleep(REMOTE_SETTLE)
        return (_holder(path) or {}).get("token") == me["token"]
    # Written whole beside it, then hard-linked into place: the link appears with its contents
    # or not at all (it fails if the lock exists), so a kill between creating the lock and
    # writing it cannot leave an empty lock, which no later run could take over. A full disk
    # fails on the side file, with no lock made.
    side = path.with_name(f".{path.name}.{me['token']}")
    try:
        side.write_text(json.dumps(me))
        try:
            os.link(side, path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: an exclusive create, then write
            return _create_exclusive(path, me)
        return True
    finally:
        side.unlink(missing_ok=True)


def _create_exclusive(path: Path, me: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
    except BaseException:  # a full disk: an empty lock would refuse every later run
        path.unlink(missing_ok=True)
        raise
    return True


@contextlib.contextmanager
def _takeover_guard(path: Path | S3Path) -> Iterator[None]:
    """Held around taking over a stale lock, so that two processes that both found it stale
    take it over one after the other: the second then finds the first's lock, not the stale
    one, and refuses (without it, the second removed the first's fresh lock and both held the
    round). Local files only: object storage has no such lock (see the module docstring)."""
    if isinstance(path, S3Path):
        yield
        return
    from pipeline.storage import flocked

    with flocked(path.with_name(f".{path.name}.guard")):
        yield


@contextlib.contextmanager
def round_lock(layout: RunLayout, round_: int) -> Iterator[Path]:
    """Hold the round's lock inside the block; refuses (LockError) while another process has it."""
    from pipeline.manifest import now_iso

    path = layout.manifest_dir / f"round-{round_}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": now_iso(),
          "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
          "token": uuid.uuid4().hex, "pid_start": _start_time(os.getpid()),
          "pid_ns": _pid_namespace()}
    if not _create(path, me):
        held = _holder(path) or {}
        if not _stale(held, me):
            where = _describe(held) if held else "a process whose lock file cannot be read"
            other = held.get("pid_ns") not in (None, me["pid_ns"]) and \
                held.get("host") == me["host"]
            scope = (" (in another pid namespace: another container, or this one before a "
                     "restart)") if other else ""
            raise LockError(
                f"round {round_} of run {layout.run!r} is being run by {where}{scope}; wait for "
                f"it to finish, or if that process is gone, delete {path}")
        with _takeover_guard(path):
            now = _holder(path)
            if now is not None and now.get("token") != held.get("token"):
                raise LockError(f"round {round_} of run {layout.run!r} was just taken by "
                                f"{_describe(now)}; wait for it to finish")
            print(f"lock: taking over {path}, left by {_describe(held)}, which no longer runs",
                  file=sys.stderr)
            path.unlink(missing_ok=True)
            if not _create(path, me):  # a process starting afresh created it first
                raise LockError(f"round {round_} of run {layout.run!r} was just taken by "
                                f"{_describe(_holder(path) or {})}; wait for it to finish")
    try:
        yield path
    finally:
        if (_holder(path) or {}).get("token") == me["token"]:
            path.unlink(missing_ok=True)
