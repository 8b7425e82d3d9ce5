"""jobs/report.py: the summary it prints, and its one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import report as report_job
from tests.test_report_tables import REPO, RUN, make_run, manifest_path


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = report_job.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_writes_report_and_prints_summary(root: Path, capsys):
    rc, out, err = run_cli(capsys, "--run", RUN, "--root", str(root), "--format", "html")
    assert rc == 0
    assert "round 1 student" in out and "top-1 85.00%" in out and "ECE 0.410" in out
    assert out.strip().endswith(str(root / "reports" / RUN / "report.html"))
    assert (root / "reports" / RUN / "report.html").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--run", "nope"], "no run 'nope'"),
    (["--run", RUN, "--round", "0"], "round 0 is the teacher"),
    (["--run", RUN, "--round", "5"], "has no round 5"),
    (["--run", "/etc"], "--run '/etc': use letters, digits, '-' and '_' only"),
])
def test_cli_errors_are_one_line_exit_2(root: Path, capsys, argv, message):
    rc, out, err = run_cli(capsys, *argv, "--root", str(root))
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_cli_dataset_gone(root: Path, capsys):
    (root / "data" / "toy" / "dataset.json").unlink()
    rc, _, err = run_cli(capsys, "--run", RUN, "--root", str(root))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "data/toy" in err and "not found" in err


def test_cli_round_whose_pseudo_label_stage_is_unfinished(root: Path, capsys):
    m = json.loads(manifest_path(root, RUN, 2).read_text())
    m["stages"]["pseudo_label"]["status"] = "running"
    m["status"] = "running"
    manifest_path(root, RUN, 2).write_text(json.dumps(m))
    rc, _, err = run_cli(capsys, "--run", RUN, "--round", "2", "--root", str(root))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "pseudo_label stage is running" in err and "jobs/student.py" in err


def test_cli_newer_schema_in_a_subprocess(root: Path):
    m = json.loads(manifest_path(root, RUN, 1).read_text())
    m["schema"] = 2
    manifest_path(root, RUN, 1).write_text(json.dumps(m))
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "report.py"), "--run", RUN,
                           "--root", str(root)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "schema 2" in proc.stderr and "upgrade" in proc.stderr


def test_cli_output_folder_blocked_is_one_line(root: Path, capsys):
    (root / "reports").mkdir()
    (root / "reports" / RUN).write_text("not a folder")
    rc, out, err = run_cli(capsys, "--run", RUN, "--root", str(root))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"report: cannot write the report under {root}/reports/{RUN}: ")


def test_cli_unreadable_truth_is_a_note_not_a_traceback(root: Path, capsys):
    doc = json.loads((root / "data" / "toy" / "dataset.json").read_text())
    truth = root / "data" / "toy" / doc["unlabeled_truth"]
    truth.write_bytes(b"not parquet at all")
    rc, out, err = run_cli(capsys, "--run", RUN, "--root", str(root))
    assert rc == 0
    assert f"report: note: held-out truth unusable: {truth}: cannot read Parquet (" in err
    assert "): no precision" in err


def test_cli_ctrl_c_is_one_line_exit_130(root: Path, capsys, monkeypatch):
    """A Ctrl-C while the tables are made gave a traceback (the other jobs say it in a line)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_job, "write_report", interrupted)
    rc, out, err = run_cli(capsys, "--run", RUN, "--root", str(root))
    assert rc == 130 and out == ""
    assert err.strip() == "report: interrupted; run the same command again"
