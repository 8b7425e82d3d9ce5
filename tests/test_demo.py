"""jobs/demo.py (make demo) without running its steps: how it ends when a step is interrupted.
The whole demo on a finished run is tests/test_student.py's slow demo test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo():
    if str(ROOT / "jobs") not in sys.path:  # demo.py imports its neighbours by name
        sys.path.insert(0, str(ROOT / "jobs"))
    import demo

    return demo


@pytest.mark.parametrize("how", ["the step exits 130", "Ctrl-C reaches the demo"])
def test_an_interrupted_step_ends_the_demo_with_one_line_and_exit_130(
        demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], how: str) -> None:
    """A Ctrl-C reaches the step and the demo (one process group): the step says so and exits
    130, and the demo printed a traceback (or, when only the step got it, 'failed (exit 130)')."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if how == "the step exits 130":
            return subprocess.CompletedProcess(cmd, 130)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo.subprocess, "run", run)
    assert demo.main(["--root", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == ("demo: interrupted; run `make demo` (or the same command) again to "
                           "continue")
    assert len(calls) == 1 and calls[0][1] == "jobs/prepare.py"  # no step after it ran
