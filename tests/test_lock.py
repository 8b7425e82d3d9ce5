"""One process per round: the lock refuses a second holder and takes over a crashed one's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.layout import RunLayout
from pipeline.lock import LockError, round_lock


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "r")
    with round_lock(layout, 1) as path:
        held = json.loads(path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        refused = rf"round 1 of run 'r' is being run by pid {os.getpid()} on host .* delete {path}"
        with pytest.raises(LockError, match=refused), round_lock(layout, 1):
            pass
        with round_lock(layout, 2):  # other rounds are free
            pass
    assert not path.exists()  # released


def test_a_lock_left_by_a_crashed_process_is_taken_over(tmp_path: Path, capsys) -> None:
    layout = RunLayout(tmp_path, "r")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)  # that process has exited
    path = layout.manifest_dir / "round-0.lock"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(),
                                "started_at": "then", "command": "teacher.py"}))
    with round_lock(layout, 0):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"left by pid {dead_pid}" in capsys.readouterr().err


def test_a_lock_from_another_host_is_not_guessed_stale(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "r")
    path = layout.manifest_dir / "round-0.lock"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started_at": "then"}))
    with pytest.raises(LockError, match="on host elsewhere"), round_lock(layout, 0):
        pass
    assert json.loads(path.read_text())["host"] == "elsewhere"  # untouched
