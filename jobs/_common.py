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
    from models.weights import WeightsError
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import ConfigError
    from pipeline.dataset import DatasetError
    from pipeline.fs import StorageError
    from pipeline.inference import InferenceError
    from pipeline.lock import LockError
    from pipeline.manifest import ManifestError
    from pipeline.pseudo_files import PseudoFileError
    from pipeline.runner import RunError, TrainingCrash
    from pipeline.shards import ShardError

    known: tuple[type[BaseException], ...] = (
        ConfigError, DatasetError, ManifestError, RunError, ShardError, CheckpointError,
        InferenceError, PseudoFileError, WeightsError, LockError, StorageError)
    try:
        return body()
    except TrainingCrash as e:  # nothing to fix: the same command continues
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except known as e:
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
