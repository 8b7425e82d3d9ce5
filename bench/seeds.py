"""The demo's evidence over seeds: the loop, its truth-label ceiling and the noise ablation.

    python bench/seeds.py --root /tmp/seeds --seeds 0 1 2 [--ablation-seeds 0 1 2 3 4]
        [--teacher-args "..."] [--student-args "..."] [--out results.json]
    python bench/seeds.py --root /tmp/seeds --seeds --ablation-seeds 0 1 2   # the ablation alone

For each seed of ``--seeds`` it runs the demo loop (jobs/teacher.py and two rounds of
jobs/student.py with ``--preset demo``, as `make demo` does) as run ``s<seed>``, and the ceiling:
round 0 of that run copied into ``s<seed>-ceiling``, whose round-1 student (the same t1 as the
loop's round 1) trains on the unlabeled split's held-out TRUE labels instead of pseudo-labels.
For each seed of ``--ablation-seeds`` (default: the same) it trains round-1 students of that
seed's teacher without some of the noise (the "all noise" row is the loop's own round 1):

    all noise         RandAugment + dropout + stochastic depth (the demo's student)
    no RandAugment    dropout + stochastic depth only
    no dropout/SD     RandAugment only
    no noise          none of the three (the paper: barely beats its teacher)

An ablation seed without a loop run gets its teacher (and its round 1, the "all noise" row) first.
Prints mean +- std (sample standard deviation, n - 1) over the seeds of top-1 (%) and the gap
recovered, (round 2 - teacher) / (ceiling - teacher), per seed and of the means; writes every
number to ``--out`` (default ROOT/seeds.json). Completed rounds are reused, so an interrupted
bench continues where it stopped; ``--teacher-args``/``--student-args`` pass more flags to
every teacher/student (e.g. a recipe change to try: ``--student-args "--threshold 0.5"``), and
then ``--tag`` keeps such runs apart.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "jobs"))

from pipeline.layout import RunLayout  # noqa: E402
from pipeline.manifest import RoundRecord, load_round, save_round  # noqa: E402

ABLATION = {
    "no RandAugment": ["--no-randaugment"],
    "no dropout/SD": ["--dropout", "0", "--drop-path", "0"],
    "no noise": ["--no-randaugment", "--dropout", "0", "--drop-path", "0"],
}
ROWS = ["teacher", "round 1", "round 2", "ceiling"]


def _complete(root: Path, run: str, n: int) -> RoundRecord | None:
    rec = load_round(RunLayout(root, run), n)
    return rec if rec is not None and rec.status == "complete" else None


def _job(script: str, args: list[str], title: str, log: Path) -> float:
    """Run a job, its output to ``log``; returns its seconds. A failure stops the bench."""
    t0 = time.time()
    print(f"=== {title}: python jobs/{script} {' '.join(args)}", flush=True)
    with log.open("a") as out:
        proc = subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT,
                              stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"seeds: {title} failed (exit {proc.returncode}); see {log}")
    seconds = time.time() - t0
    print(f"=== {title}: {seconds:.0f}s", flush=True)
    return seconds


def _round(root: Path, run: str, n: int, script: str, args: list[str], title: str,
           times: dict[str, float]) -> RoundRecord:
    rec = _complete(root, run, n)
    if rec is None:
        times[f"{run}/{n}"] = _job(script, args, title, root / "logs" / f"{run}.log")
        rec = _complete(root, run, n)
        assert rec is not None
    return rec


def copy_teacher(root: Path, src_run: str, dst_run: str) -> None:
    """Round 0 of ``src_run`` as round 0 of ``dst_run`` (its model file stays where it is)."""
    if _complete(root, dst_run, 0) is not None:
        return
    rec = load_round(RunLayout(root, src_run), 0)
    rec.run = dst_run
    save_round(RunLayout(root, dst_run), rec)


def run_seed(root: Path, data: Path, seed: int, args: argparse.Namespace, *, loop: bool,
             times: dict[str, float]) -> dict[str, Any]:
    """Teacher and round 1 always; round 2 and the ceiling when ``loop``. Top-1 as fractions."""
    run = f"{args.tag}s{seed}"
    common = ["--root", str(root), "--preset", "demo", "--seed", str(seed)]
    teacher = _round(root, run, 0, "teacher.py",
                     ["--run", run, "--data", str(data), *common, *args.teacher_args],
                     f"seed {seed} teacher", times)
    out: dict[str, Any] = {"seed": seed, "teacher": teacher.metrics.top1,
                           "fixres": {0: _fixres(teacher)}}
    rounds = 2 if loop else 1
    for n in range(1, rounds + 1):
        rec = _round(root, run, n, "student.py",
                     ["--run", run, "--round", str(n), *common, *args.student_args],
                     f"seed {seed} round {n}", times)
        out[f"round {n}"] = rec.metrics.top1
        out["fixres"][n] = _fixres(rec)
    if loop:
        ceiling_run = f"{run}-ceiling"
        copy_teacher(root, run, ceiling_run)
        rec = _round(root, ceiling_run, 1, "student.py",
                     ["--run", ceiling_run, "--round", "1", *common, "--truth-labels",
                      *args.student_args], f"seed {seed} ceiling", times)
        out["ceiling"] = rec.metrics.top1
        out["gap_recovered"] = _recovered(out["teacher"], out["round 2"], out["ceiling"])
    return out


def _fixres(rec: RoundRecord) -> dict[str, Any] | None:
    ft = rec.stage("finetune")
    if ft is None:
        return None
    keys = ("top1_before", "top1_after", "batchnorm", "step_time_ratio", "train_seconds_saved")
    return {k: ft.info.get(k) for k in keys}


def _recovered(teacher: float, r2: float, ceiling: float) -> float | None:
    return (r2 - teacher) / (ceiling - teacher) if ceiling != teacher else None


def run_ablation(root: Path, seed: int, args: argparse.Namespace, base: dict[str, Any],
                 times: dict[str, float]) -> dict[str, Any]:
    src = f"{args.tag}s{seed}"
    out = {"seed": seed, "teacher": base["teacher"], "all noise": base["round 1"]}
    for name, flags in ABLATION.items():
        run = f"{src}-{name.replace(' ', '').replace('/', '')}"
        copy_teacher(root, src, run)
        rec = _round(root, run, 1, "student.py",
                     ["--run", run, "--round", "1", "--root", str(root), "--preset", "demo",
                      "--seed", str(seed), *args.student_args, *flags],
                     f"seed {seed} {name}", times)
        out[name] = rec.metrics.top1
    return out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def _fmt(values: list[float], scale: float = 100.0) -> str:
    m, s = mean_std(values)
    return f"{scale * m:.2f}" + (f" ± {scale * s:.2f}" if s is not None else " (one seed)")


def summarize(loops: list[dict[str, Any]], ablations: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if loops:
        summary["loop"] = {r: mean_std([x[r] for x in loops]) for r in ROWS}
        rec = [x["gap_recovered"] for x in loops if x.get("gap_recovered") is not None]
        summary["gap_recovered_per_seed"] = mean_std(rec) if rec else None
        m = {r: summary["loop"][r][0] for r in ROWS}
        summary["gap_recovered_of_means"] = _recovered(m["teacher"], m["round 2"], m["ceiling"])
    if ablations:
        names = ["all noise", *ABLATION]
        summary["ablation"] = {n: mean_std([x[n] for x in ablations]) for n in names}
        diffs = [x["all noise"] - x["no noise"] for x in ablations]
        summary["all_minus_no_noise"] = mean_std(diffs)
    return summary


def tables(loops: list[dict[str, Any]], ablations: list[dict[str, Any]]) -> str:
    out = []
    if loops:
        seeds = ", ".join(str(x["seed"]) for x in loops)
        out += [f"Loop over seeds {seeds} (test top-1 %, mean ± std):", "",
                "| seed | teacher (t0) | round 1 (t1) | round 2 (t2) | ceiling (t1, true labels) "
                "| gap recovered |", "|---|---|---|---|---|---|"]
        for x in loops:
            rec = x.get("gap_recovered")
            out.append(f"| {x['seed']} | " + " | ".join(f"{100 * x[r]:.2f}" for r in ROWS)
                       + f" | {'-' if rec is None else f'{100 * rec:.0f}%'} |")
        rec = [x["gap_recovered"] for x in loops if x.get("gap_recovered") is not None]
        m = {r: statistics.mean(x[r] for x in loops) for r in ROWS}
        of_means = _recovered(m["teacher"], m["round 2"], m["ceiling"])
        out.append("| mean ± std | " + " | ".join(_fmt([x[r] for x in loops]) for r in ROWS)
                   + f" | {_fmt(rec) + '%' if rec else '-'} |")
        out += ["", "gap recovered of the means, (round 2 - teacher) / (ceiling - teacher): "
                + ("-" if of_means is None else f"{100 * of_means:.0f}%")]
    if ablations:
        names = ["all noise", *ABLATION]
        seeds = ", ".join(str(x["seed"]) for x in ablations)
        out += ["", f"Noise ablation, round-1 student (t1), seeds {seeds} (test top-1 %):", "",
                "| seed | teacher | " + " | ".join(names) + " |",
                "|---|---|" + "---|" * len(names)]
        for x in ablations:
            out.append(f"| {x['seed']} | {100 * x['teacher']:.2f} | "
                       + " | ".join(f"{100 * x[n]:.2f}" for n in names) + " |")
        out.append("| mean ± std | " + _fmt([x["teacher"] for x in ablations]) + " | "
                   + " | ".join(_fmt([x[n] for x in ablations]) for n in names) + " |")
        diffs = [x["all noise"] - x["no noise"] for x in ablations]
        out += ["", f"all noise - no noise: {_fmt(diffs)} points"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                    help="seeds of the loop and its ceiling")
    ap.add_argument("--ablation-seeds", type=int, nargs="*", default=None,
                    help="seeds of the noise ablation (default: --seeds; none: skip it)")
    ap.add_argument("--teacher-args", type=shlex.split, default=[])
    ap.add_argument("--student-args", type=shlex.split, default=[])
    ap.add_argument("--tag", default="", help="prefix of the run names (keeps variants apart)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default ROOT/seeds.json)")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    from demo import LABELED_FRACTION

    data = root / "data" / "digits-5pct"
    if not (data / "dataset.json").exists():
        _job("prepare.py", ["digits", "--out", str(data), "--labeled-fraction",
                            str(LABELED_FRACTION)], "prepare", root / "logs" / "prepare.log")
    ablation_seeds = args.seeds if args.ablation_seeds is None else args.ablation_seeds
    times: dict[str, float] = {}
    t0 = time.time()
    loops = [run_seed(root, data, s, args, loop=True, times=times) for s in args.seeds]
    base = {x["seed"]: x for x in loops}
    ablations = []
    for s in ablation_seeds:
        if s not in base:
            base[s] = run_seed(root, data, s, args, loop=False, times=times)
        ablations.append(run_ablation(root, s, args, base[s], times))
    text = tables(loops, ablations)
    print("\n" + text)
    out = args.out or root / "seeds.json"
    out.write_text(json.dumps({
        "command": " ".join(["python", "bench/seeds.py", *(argv or sys.argv[1:])]),
        "teacher_args": args.teacher_args, "student_args": args.student_args,
        "loops": loops, "ablations": ablations, "summary": summarize(loops, ablations),
        "job_seconds": times, "seconds": round(time.time() - t0, 1)}, indent=2))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
