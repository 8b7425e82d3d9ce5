"""jobs/demo.py (make demo) without running its steps: how it ends when a step is interrupted.
The whole demo on a finished run is tests/test_student.py's slow demo test."""

from __future__ import annotations

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


class FakeStep:
    """subprocess.Popen of a step: ``interrupts`` Ctrl-Cs arrive while the demo waits on it,
    then it exits with ``code`` (130: the step stopped cleanly and said so)."""

    def __init__(self, calls: list, interrupts: int, code: int) -> None:
        self.calls, self.interrupts, self.returncode, self.code = calls, interrupts, None, code

    def __call__(self, cmd: list[str], **kwargs: object) -> FakeStep:
        self.calls.append(cmd)
        return self

    def wait(self) -> int:
        self.calls.append("wait")
        if self.interrupts:
            self.interrupts -= 1
            raise KeyboardInterrupt
        self.returncode = self.code
        return self.code

    def kill(self) -> None:
        self.calls.append("kill")
        self.code = -9


@pytest.mark.parametrize("interrupts,code,waits", [
    (0, 130, ["wait"]),  # only the step got the Ctrl-C: it said 'failed (exit 130)'
    (1, 130, ["wait", "wait"]),  # both got it: the demo waits for the step to stop cleanly
    (2, -9, ["wait", "wait", "kill", "wait"]),  # a second Ctrl-C ends the step at once
])
def test_an_interrupted_step_ends_the_demo_with_one_line_and_exit_130(
        demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], interrupts: int, code: int, waits: list) -> None:
    """A Ctrl-C reaches the step and the demo (one process group). The demo printed a traceback,
    and subprocess.run killed the step (SIGKILL) a quarter of a second later, before Ray Train
    had aborted its run and the round was recorded as failed."""
    calls: list = []
    monkeypatch.setattr(demo.subprocess, "Popen", FakeStep(calls, interrupts, code))
    assert demo.main(["--root", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == ("demo: interrupted; run `make demo` (or the same command) again to "
                           "continue")
    assert calls[0][1] == "jobs/prepare.py" and calls[1:] == waits  # no step after it


def test_a_ray_that_cannot_start_is_one_line(demo, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.runner import RunError

    (tmp_path / "data" / "digits-5pct").mkdir(parents=True)
    (tmp_path / "data" / "digits-5pct" / "dataset.json").write_text("{}")  # prepare skipped

    def no_ray():
        raise RunError("cannot start a local Ray (Failed to start GCS.)")

    monkeypatch.setattr(demo, "shared_ray", no_ray)
    assert demo.main(["--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("demo: error: cannot start a local Ray (Failed to "
                                               "start GCS.)")
