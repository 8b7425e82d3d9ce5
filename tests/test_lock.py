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


def test_a_lock_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path: Path,
                                                                        capsys) -> None:
    """After a reboot, the crashed holder's pid can belong to another process (here, this very
    process): alive, but started at another time. It was refused for ever ("being run by pid
    N", N being the refused process itself)."""
    from pipeline.lock import _pid_namespace, _start_time

    layout = RunLayout(tmp_path, "r")
    path = layout.manifest_dir / "round-0.lock"
    path.parent.mkdir(parents=True)
    mine = _start_time(os.getpid())
    assert mine is not None
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "pid_ns": _pid_namespace(), "pid_start": mine - 1,
                                "started_at": "then", "token": "old"}))
    with round_lock(layout, 0):
        assert json.loads(path.read_text())["pid_start"] == mine
    assert f"left by pid {os.getpid()}" in capsys.readouterr().err


def test_a_lock_from_another_pid_namespace_is_not_guessed_stale(tmp_path: Path) -> None:
    """Containers sharing the host's name, each with its own pids: another's live pid is not
    visible here, and taking its lock over would let two processes run the round. (A container
    since restarted has a new namespace too: it is refused the same way, saying so.)"""
    from pipeline.lock import _pid_namespace

    layout = RunLayout(tmp_path, "r")
    path = layout.manifest_dir / "round-0.lock"
    path.parent.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    path.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(),
                                "pid_ns": (_pid_namespace() or 0) + 1, "started_at": "then"}))
    with pytest.raises(LockError, match=r"is being run by pid .* \(in another pid namespace: "
                                        r"another container, or this one before a restart\); "
                                        r"wait for it to finish, or if that process is gone, "
                                        rf"delete {path}"), round_lock(layout, 0):
        pass
    assert json.loads(path.read_text())["pid"] == int(gone.stdout)  # untouched


def test_two_processes_taking_over_one_stale_lock_do_not_both_hold_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both find the crashed holder's lock stale before either acts. The second used to remove
    the first's fresh lock and make its own: both held the round. Now it finds the first's."""
    import threading
    import time

    import pipeline.lock as lock

    layout = RunLayout(tmp_path, "r")
    path = layout.manifest_dir / "round-1.lock"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(),
                                "token": "dead"}))  # above Linux's pid_max: no such process
    both_read = threading.Barrier(2)
    alive = lock._alive

    def slow_alive(pid: int) -> bool:
        answer = alive(pid)
        both_read.wait(timeout=10)  # both have judged the stale holder before either acts
        if threading.current_thread().name == "B":
            time.sleep(0.2)  # A takes it over first
        return answer

    monkeypatch.setattr(lock, "_alive", slow_alive)
    held, refused = [], []

    def run() -> None:
        try:
            with round_lock(layout, 1):
                held.append(threading.current_thread().name)
                time.sleep(0.5)
        except LockError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=run, name=n) for n in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert held == ["A"]
    assert len(refused) == 1 and refused[0].startswith("round 1 of run 'r' was just taken by pid")
    assert not path.exists()  # A released it


def test_a_lock_is_never_left_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock appears with its contents (hard-linked from a file written beside it): a kill
    between creating it and writing it used to leave an empty lock that no run could take
    over. The side file is gone afterwards, written or not."""
    import pipeline.lock as lock

    layout = RunLayout(tmp_path, "r")
    seen = []
    link = os.link

    def check_link(src: str, dst: str) -> None:
        seen.append(json.loads(Path(src).read_text())["pid"])  # whole before it appears
        link(src, dst)

    monkeypatch.setattr(lock.os, "link", check_link)
    with round_lock(layout, 3) as path:
        assert seen == [os.getpid()] and json.loads(path.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in path.parent.iterdir()) == []
