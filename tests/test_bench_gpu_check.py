"""bench/gpu_check.py runs on a CPU (--device cpu --quick: the same code paths, small), its checks
can fail, and bench/gpu_check.sh stops with one clear line where there is no CUDA device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.results import read

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_quick_cpu_run_passes_its_checks_and_writes_its_figures(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick",
                        "--json", str(path)], cwd=ROOT, env=NO_GPU, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "conv output float32 (expected float32)" in r.stdout  # autocast is off on a CPU
    assert "input channels_last True, weights channels_last True" in r.stdout
    data = read(path)
    assert data["cpu_quick_batch_mates_bit_exact"] == 1.0
    assert data["cpu_quick_epoch_host_reads"] == 1.0
    assert data["cpu_quick_label_images_per_s"] > 0


@pytest.mark.parametrize("cmd", [["bash", "bench/gpu_check.sh"],
                                 [sys.executable, "bench/gpu_check.py"]], ids=["sh", "py"])
def test_without_cuda_it_stops_with_one_line_and_status_2(cmd: list[str]) -> None:
    r = subprocess.run(cmd, cwd=ROOT, env=NO_GPU, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "no CUDA device" in r.stderr
    assert "Traceback" not in r.stderr


class _Predictor:
    """Outputs per row: a function of the row alone, or leaking the batch's mean (what the
    padding of pipeline.inference.TeacherPredictor prevents)."""

    def __init__(self, leaky: bool) -> None:
        self.leaky = leaky

    def forward(self, images: np.ndarray) -> dict[str, np.ndarray]:
        own = images.reshape(len(images), -1).mean(axis=1)
        return {"confidence": own + (images.mean() if self.leaky else 0.0)}


def test_the_batch_mates_check_fails_when_rows_depend_on_their_mates() -> None:
    from bench.gpu_check import QUICK, rows_identical

    assert rows_identical(_Predictor(leaky=False), QUICK, 4)
    assert not rows_identical(_Predictor(leaky=True), QUICK, 4)
