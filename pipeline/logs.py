"""What a job prints: our progress lines, without Ray's chatter (``--verbose`` shows it all).

A Ray job's log interleaves our per-epoch and per-stage lines with Ray's own INFO lines (Ray
Train's worker-group start-up, Ray Data's execution plans) and warnings known to be harmless
here: the token-authentication notice of every local cluster, and a core-worker error line for
every actor whose constructor arguments sit in the object store (Ray Train's PreemptionWatcher,
Ray Data's actor pool; ray-project/ray#53727). :func:`quiet_ray` hides those:

* Ray's Python loggers in the driver go to WARNING (Ray Data, Ray Train) or ERROR (the token
  notice);
* lines that workers forward to the driver pass a filter that drops the known ones by pattern
  (nothing else: a real error a worker prints still shows).

What it cannot hide: lines that Ray's C++ core writes to the driver's own stderr file
descriptor, which bypass Python (the core-worker line for the pseudo-label actor pool, once per
pseudo-label stage). Lowering the core's level with ``RAY_BACKEND_LOG_LEVEL`` would hide that
line, but also every real C++ error, and it prints a line of its own in every process; so it is
left to the user. ``--verbose`` shows everything.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

# Each one seen in our jobs' logs with Ray 2.60 and known not to need the user.
KNOWN_HARMLESS = tuple(re.compile(p) for p in (
    r"has constructor arguments in the object store and max_restarts > 0",
    r"Token authentication is enabled for this Ray cluster",
    r"^(\(TrainController pid=\d+[^)]*\) )?(Requesting resources: |Attempting to start "
    r"training worker group |Started training worker group of size )",
    r"^(\(TrainController pid=\d+[^)]*\) )?- \(ip=[^)]*, pid=\d+\) world_rank=\d+",
    r"^(\(RayTrainWorker pid=\d+[^)]*\) )?Setting up process group for: ",
    r"Progress bars disabled\. To enable",
    # Ray Train's note on a resume (three lines): it advises deleting the run folder, which
    # holds the checkpoints the resume continues from; the job says "resumed from checkpoint".
    r"A run snapshot was found in storage folder at: ",
    r"^(\(TrainController pid=\d+[^)]*\) )?This snapshot contains a list of checkpoints "
    r"reported via `ray\.train\.report`",
    r"^(\(TrainController pid=\d+[^)]*\) )?If you meant to start a brand new training job "
    r"without any information about previous checkpoints",
))
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_quiet: list[list[tuple[logging.Handler, int]]] = []  # per active quiet_ray: handlers it lowered


def harmless(line: str) -> bool:
    plain = _ANSI.sub("", line)
    return any(p.search(plain) for p in KNOWN_HARMLESS)


class _LineFilter(io.TextIOBase):
    """A text stream that drops whole lines matching KNOWN_HARMLESS and passes the rest on."""

    def __init__(self, inner: TextIO) -> None:
        self.inner, self._pending = inner, ""
        # Ray's driver forwards the workers' lines from a thread of its own while the main
        # thread prints progress: without it, one writer's text could replace the other's.
        # Re-entrant: a signal handler that prints runs on the main thread, possibly inside
        # write(), and would wait for ever on a plain lock.
        self._lock = threading.RLock()

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                if not harmless(line):
                    self.inner.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending and not harmless(self._pending):
                self.inner.write(self._pending)
            self._pending = ""
            self.inner.flush()

    def isatty(self) -> bool:
        # Ray's colorama asks at interpreter exit, when pytest may have closed the stream.
        return not getattr(self.inner, "closed", False) and self.inner.isatty()

    def fileno(self) -> int:
        return self.inner.fileno()


def quiet_console(logger: str) -> None:
    """Inside :func:`quiet_ray`, ``logger``'s console handlers show WARNING and above only.

    For loggers that configure their own handlers when first imported (Ray Data's logs every
    execution plan at INFO to the console, and everything to its session log file, which keeps
    it all): call this after the import."""
    if not _quiet:
        return
    for handler in logging.getLogger(logger).handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler) and handler.level < logging.WARNING:
            _quiet[-1].append((handler, handler.level))
            handler.setLevel(logging.WARNING)


@contextlib.contextmanager
def quiet_ray(verbose: bool = False) -> Iterator[None]:
    """Inside: Ray's chatter hidden from this process's output (see the module docstring)."""
    if verbose:
        yield
        return
    levels = {"ray.data": logging.WARNING, "ray.train": logging.WARNING,
              "ray._private.authentication": logging.ERROR}
    old_levels = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _LineFilter(out), _LineFilter(err)  # type: ignore[assignment]
    _quiet.append([])
    try:
        yield
    finally:
        for handler, level in _quiet.pop():
            handler.setLevel(level)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = out, err
        for name, level in old_levels.items():
            logging.getLogger(name).setLevel(level)
