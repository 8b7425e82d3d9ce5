"""What every job entry point shares: import path, config parsing, one-line errors."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python jobs/x.py` and Ray jobs run from a copy of the repo
    sys.path.insert(0, str(ROOT))


def disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_line(name: str, e: OSError, option: str, kept: str) -> str:
    """The one line for a full disk or quota: what, where, and that rerunning continues."""
    what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
    where = f" writing {e.filename}" if e.filename else ""
    return (f"{name}: error: {what}{where}; free space on the volume of {option} and run the "
            f"same command again: {kept}")


def run_job(name: str, body: Callable[[], int]) -> int:
    """Run ``body``; a known user error becomes one line on stderr and exit code 2, a training
    crash (a lost worker: nothing to fix, run again) one line and exit code 1."""
    # Each module's error class derives from UserError: catching the base needs none of those
    # modules (some import torch, seconds), so a mistake found early is reported at once.
    from pipeline.errors import UserError
    from pipeline.runner import TrainingCrash

    try:
        return body()
    except TrainingCrash as e:  # nothing to fix: the same command continues
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except UserError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not disk_full(e):
            raise
        # Every file is written whole or not at all (pipeline/storage.py), so what was finished
        # before is intact; the stage that failed is redone from its last finished file.
        print(disk_full_line(name, e, "--root", "finished stages and files are kept"),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
