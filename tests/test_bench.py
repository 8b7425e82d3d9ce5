"""bench/: latest.json's merge (read-modify-write, atomic, concurrent writers), the table printer,
and quick runs of the benchmark scripts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.results import FIGURES, merge, read, table

ROOT = Path(__file__).resolve().parent.parent


def test_merge_keeps_other_scripts_keys_and_replaces_its_own(tmp_path: Path) -> None:
    path = tmp_path / "latest.json"
    merge({"train_epoch_teacher_steady": 0.97}, path)
    merge({"s3_over_local_read": 1.234567, "train_epoch_teacher_steady": 0.99}, path)
    assert json.loads(path.read_text()) == {"s3_over_local_read": 1.2346,
                                            "train_epoch_teacher_steady": 0.99}
    assert {p.name for p in tmp_path.iterdir()} == {"latest.json", "latest.json.lock"}  # no temp


def test_merge_refuses_non_numbers_and_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "latest.json"
    merge({"a": 1.0}, path)
    before = path.read_bytes()
    for bad in ({"b": float("nan")}, {"b": "fast"}, {"b": True}):
        with pytest.raises(ValueError, match="finite numbers"):
            merge(bad, path)
    assert path.read_bytes() == before


def test_concurrent_writers_lose_no_key(tmp_path: Path) -> None:
    path = tmp_path / "latest.json"
    code = ("import sys; from bench.results import merge; from pathlib import Path\n"
            "for i in range(25): merge({f'{sys.argv[1]}_{i}': i}, Path(sys.argv[2]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, name, str(path)], cwd=ROOT)
             for name in ("a", "b", "c")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert read(path) == {f"{n}_{i}": i for n in "abc" for i in range(25)}


def test_table_shows_known_figures_first_then_any_new_key() -> None:
    text = table({"zz_new_figure": 2.5, "memory_40x_over_1x": 1.02,
                  "pseudo_label_end_to_end_40x": 0.81})
    lines = text.splitlines()
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == [
        "`pseudo_label_end_to_end_40x`", "`memory_40x_over_1x`", "`zz_new_figure`"]
    assert "| 0.810 | >= 0.9 | no |" in lines[2] and "| 1.020 | <= 1.1 | yes |" in lines[3]
    assert "no description" in lines[4]


def test_every_issue_figure_has_a_description() -> None:
    wanted = {"pseudo_label_end_to_end_40x", "pseudo_label_steady_40x",
              "train_epoch_teacher_steady", "train_epoch_student_steady",
              "train_epoch_teacher_with_startup", "train_epoch_student_with_startup",
              "augment_vs_plain", "memory_40x_over_1x", "bytes_per_pseudo_label_row"}
    assert wanted <= set(FIGURES)


def test_table_script_prints_the_file_and_refuses_a_missing_or_broken_one(tmp_path: Path
                                                                         ) -> None:
    path = tmp_path / "latest.json"
    merge({"augment_vs_plain": 0.9}, path)
    run = lambda p: subprocess.run([sys.executable, "bench/table.py", "--json", str(p)],  # noqa: E731
                                   cwd=ROOT, capture_output=True, text=True)
    ok = run(path)
    assert ok.returncode == 0 and "`augment_vs_plain` | 0.900" in ok.stdout
    missing = run(tmp_path / "none.json")
    assert missing.returncode == 2 and "make bench" in missing.stderr
    (tmp_path / "bad.json").write_text("{not json")
    bad = run(tmp_path / "bad.json")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_augment_bench_writes_its_figures(tmp_path: Path) -> None:
    path = tmp_path / "latest.json"
    merge({"other": 1.0}, path)
    r = subprocess.run([sys.executable, "bench/augment.py", "--rounds", "1", "--min-seconds",
                        "0.05", "--json", str(path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    data = read(path)
    assert set(data) == {"other", "augment_vs_plain", "augment_vs_plain_digits"}
    assert all(0 < data[k] < 100 for k in data)


@pytest.mark.slow
def test_reduced_decode_bench_writes_its_figures(tmp_path: Path) -> None:
    path = tmp_path / "latest.json"
    merge({"other": 1.0}, path)
    r = subprocess.run([sys.executable, "bench/reduced_decode.py", "--rounds", "1",
                        "--min-seconds", "0.01", "--json", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = read(path)
    figures = {f"eval_decode_reduced_over_full_{t}_{s}" for t in ("12mp", "2mp")
               for s in (224, 600)} | {f"train_decode_reduced_over_full_{t}_224"
                                       for t in ("12mp", "2mp")}
    assert set(data) == {"other", *figures} and figures <= set(FIGURES)
    assert all(0 < data[k] < 100 for k in data)
    # the reported decode sizes are the reductions the stages get
    assert "500x375" in r.stdout and "1000x750" in r.stdout and "1600x1200" in r.stdout


@pytest.mark.slow
def test_depthwise_bench_writes_its_figures(tmp_path: Path) -> None:
    path = tmp_path / "latest.json"
    merge({"other": 1.0}, path)
    r = subprocess.run([sys.executable, "bench/depthwise.py", "--steps", "1", "--rounds", "1",
                        "--json", str(path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    data = read(path)
    figures = {f"depthwise_train_step_t{k}" for k in range(3)}
    assert set(data) == {"other", *figures} and figures <= set(FIGURES)
    assert all(0 < data[k] < 100 for k in data)
    # the layers of t1 that take the matmul path: its 4x4 and 2x2 maps, none larger
    layers = [line for line in r.stdout.splitlines() if " map: PyTorch " in line]
    assert len(layers) == 6 and all(("4x4 map" in s or "2x2 map" in s) for s in layers)


@pytest.mark.slow
def test_prepare_bench_writes_its_figures(tmp_path: Path) -> None:
    path = tmp_path / "latest.json"
    merge({"other": 1.0}, path)
    r = subprocess.run([sys.executable, "bench/prepare.py", "--files", "4", "--min-seconds",
                        "0.05", "--repeat", "2", "--json", str(path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = read(path)
    figures = {"prepare_workers_over_one", "prepare_max_short_side_915_over_kept",
               "prepare_max_short_side_915_bytes_over_kept",
               "train_decode_max_short_side_915_over_kept_12mp_224"}
    assert set(data) == {"other", *figures} and figures <= set(FIGURES)
    assert all(0 < data[k] < 100 for k in data)
    assert data["prepare_max_short_side_915_bytes_over_kept"] < 0.5  # 12 MP -> 1220x915
    from pipeline.dataset import default_workers

    used = re.findall(r"checking 4 files with (\d+) process", r.stderr)
    pool = str(min(default_workers(), 4))
    # one process, then a pool twice; the second round starts one place further on
    assert used == ["1", pool, pool, pool, pool, "1"]


def test_pseudo_label_figures_are_ratios_of_the_largest_run() -> None:
    from bench.pseudo_label import figures

    runs = [{"e2e_rate": 100.0, "steady_rate": 500.0, "forward": 1000.0, "tree_peak": 2000,
             "bytes_per_row": 41.0},
            {"e2e_rate": 900.0, "steady_rate": 950.0, "forward": 1000.0, "tree_peak": 2100,
             "bytes_per_row": 40.0}]
    assert figures(runs, 40, 1.5) == {"pseudo_label_end_to_end_40x": 0.9,
                                      "pseudo_label_steady_40x": 0.95,
                                      "memory_40x_over_1x": 1.05,
                                      "bytes_per_pseudo_label_row": 40.0,
                                      "pseudo_label_teacher_forward_over_plain": 1.5}


def test_pseudo_label_steady_window_starts_after_the_first_block() -> None:
    """The shards of the driver's first block finish milliseconds apart; counting their rows
    in the window but not their time overstated the steady rate (here 500 rows/s for 300)."""
    import math

    from bench.pseudo_label import steady_rate

    done = [(1.000, 100), (1.003, 100), (1.006, 100),  # block 1: three shards
            (1.500, 100), (1.503, 100), (2.006, 100)]  # blocks 2 and 3
    assert steady_rate(done) == pytest.approx(300 / 1.0)
    assert math.isnan(steady_rate(done[:3])) and math.isnan(steady_rate(done[:1]))


def test_seed_tables_compute_what_the_readme_reports() -> None:
    """bench/seeds.py's summary (the README's seed tables): mean ± sample std per row, the gap
    recovered per seed and of the means, and all noise - no noise, on numbers checked by hand."""
    from bench.seeds import ABLATION, summarize, tables

    loops = [{"seed": 0, "teacher": 0.90, "round 1": 0.92, "round 2": 0.93, "ceiling": 0.95,
              "gap_recovered": 0.6},
             {"seed": 1, "teacher": 0.80, "round 1": 0.84, "round 2": 0.86, "ceiling": 0.90,
              "gap_recovered": 0.6}]
    abl = [{"seed": s, "teacher": 0.9, "all noise": a, **{n: 0.9 for n in ABLATION},
            "no noise": b} for s, a, b in ((0, 0.93, 0.91), (1, 0.95, 0.92))]
    got = summarize(loops, abl)
    mean, std = got["loop"]["teacher"]
    assert mean == pytest.approx(0.85) and std == pytest.approx(0.0707107, rel=1e-5)
    # (0.895 - 0.85) / (0.925 - 0.85) = 0.6
    assert got["gap_recovered_of_means"] == pytest.approx(0.6)
    assert got["gap_recovered_per_seed"] == (pytest.approx(0.6), pytest.approx(0.0))
    assert got["all_minus_no_noise"][0] == pytest.approx(0.025)
    text = tables(loops, abl)
    assert "| mean ± std | 85.00 ± 7.07 | 88.00 ± 5.66 | 89.50 ± 4.95 | 92.50 ± 3.54 |" in text
    assert "gap recovered of the means, (round 2 - teacher) / (ceiling - teacher): 60%" in text
    assert "all noise - no noise: 2.50 ± 0.71 points" in text
    one = tables(loops[:1], [])
    assert "90.00 (one seed)" in one and "Noise ablation" not in one


@pytest.mark.slow
def test_decode_bench_runs_and_finds_identical_pixels() -> None:
    """bench/decode.py is not in `make bench`: this keeps it runnable (it reaches into
    pipeline.images' header check, which once changed under it)."""
    r = subprocess.run([sys.executable, "bench/decode.py", "--rounds", "1", "--min-seconds",
                        "0.01"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith(("digits", "photo",
                                                                      "noise"))]
    assert len(rows) == 6 and all(line.rstrip().endswith("yes") for line in rows)


@pytest.mark.slow
def test_fit_startup_bench_writes_its_figure_and_sees_torch_only_in_rays_controller(
        tmp_path: Path) -> None:
    path = tmp_path / "latest.json"
    merge({"other": 1.0}, path)
    r = subprocess.run([sys.executable, "bench/fit_startup.py", "--rounds", "1", "--no-warmup",
                        "--json", str(path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    data = read(path)
    assert set(data) == {"other", "fit_startup_ray_config_over_ours"} <= {"other", *FIGURES}
    assert 0.2 < data["fit_startup_ray_config_over_ours"] < 5
    # each fit's controller found, with torch's libraries under Ray's config only
    assert re.search(r"round 1: ray .* mapped torch: \[True\]", r.stdout), r.stdout
    assert re.search(r"round 1: ours .* mapped torch: \[False\]", r.stdout), r.stdout
