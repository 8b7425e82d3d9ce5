"""The whole Noisy Student loop on the bundled digits corpus (what `make demo` runs).

    prepare -> teacher (round 0) -> student round 1 -> student round 2 -> report

Each step is the same command a user would run (jobs/prepare.py, teacher.py, student.py,
report.py) in a subprocess, so the demo exercises exactly what the README shows. The steps share
one local Ray, as a user's jobs share the cluster of `ray start` (RAY_ADDRESS); with RAY_ADDRESS
already set they join that cluster instead. Steps already complete are skipped, so running it
again after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _common import ROOT

if TYPE_CHECKING:
    from pipeline.manifest import RoundRecord

PY = sys.executable
# 5% of the digits keep their labels (90 images, 9 per class): the setting self-training is for, a
# small labeled set beside a larger unlabeled one. With 10% the t0 teacher already reached 93-97%,
# 1-4 points below what a t1 student reached with the true labels of the unlabeled split.
LABELED_FRACTION = 0.05


def step(title: str, args: list[str], env: dict[str, str] | None = None) -> None:
    print(f"\n=== {title}: python {' '.join(args)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen([PY, *args], cwd=ROOT, env=env)
    try:
        proc.wait()
    except KeyboardInterrupt:
        # The step got the Ctrl-C too (one process group) and needs seconds to stop cleanly:
        # Ray Train aborts its run, the round is recorded as failed (subprocess.run would kill
        # it with SIGKILL after a quarter of a second). A second Ctrl-C ends it at once.
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
        raise
    if proc.returncode == 130:  # the step said it was interrupted (a Ctrl-C it alone received)
        raise KeyboardInterrupt
    if proc.returncode != 0:
        raise SystemExit(f"demo: {title} failed (exit {proc.returncode}); fix the error above "
                         "and run `make demo` again to continue")
    print(f"=== {title}: done in {time.time() - t0:.0f}s", flush=True)


@contextmanager
def shared_ray() -> Iterator[dict[str, str]]:
    """The environment for the steps: RAY_ADDRESS of a local Ray started here for all of them
    (stopped at the end), or of the cluster already named. Starting and stopping a Ray of its
    own in each job costs seconds of a small machine's CPU each time."""
    import ray

    from pipeline.runner import ray_session

    with ray_session() as started:
        env = dict(os.environ)
        if started:
            env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        yield env


def summary_table(root: Path, run: str) -> str:
    """round, model, parameters, test top-1, pseudo-labels kept, precision vs held-out truth."""
    from pipeline.report import load_run

    rep = load_run(root, run)
    df = rep.rounds
    cols = {"round": "round", "model": "model", "params": "parameters", "top1": "test top-1",
            "kept": "pseudo-labels kept", "precision": "precision (all)",
            "precision_copies": "precision (selected)"}
    present = [c for c in cols if c in df.columns]
    table = df[present].rename(columns=cols)
    return table.to_string(index=False, float_format=lambda x: f"{x:.4f}")


def fixres_rows(root: Path, run: str, rounds: int) -> list[dict[str, Any]]:
    """Per round with a FixRes fine-tune: resolutions, top-1 at the test resolution before and
    after it, how its BatchNorm statistics were treated, training seconds and the seconds the
    lower training resolution saved (measured per step at both resolutions)."""
    from pipeline.layout import RunLayout
    from pipeline.manifest import load_round

    layout = RunLayout(root, run)
    rows = []
    for n in range(rounds + 1):
        rec = load_round(layout, n)
        ft = rec.stage("finetune") if rec is not None else None
        if rec is None or ft is None:
            continue
        train = rec.stage("train")
        info = ft.info
        rows.append({"round": n, "model": rec.model.name,
                     "px": f"{rec.model.train_resolution}/{rec.model.test_resolution}",
                     "before": info.get("top1_before"), "after": info.get("top1_after"),
                     "batchnorm": info.get("batchnorm", "-"),
                     "train_s": train.seconds if train is not None else None,
                     "ratio": info.get("step_time_ratio"),
                     "saved_s": info.get("train_seconds_saved")})
    return rows


def fixres_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no round ran a FixRes fine-tune)"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}"

    lines = ["round  model            train/test px  top-1 before FT  after FT  BatchNorm"
             "                   train s  step time ratio  train s saved"]
    for r in rows:
        saved = "-" if r["saved_s"] is None else f"{r['saved_s']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        train_s = "-" if r["train_s"] is None else f"{r['train_s']:.0f}"
        lines.append(f"{r['round']:>5}  {r['model']:<16} {r['px']:>13}  {pct(r['before']):>15}  "
                     f"{pct(r['after']):>8}  {r['batchnorm']:<26} {train_s:>7}  {ratio:>15}  "
                     f"{saved:>13}")
    return "\n".join(lines)


def _at_least_0(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _folder(text: str) -> str:
    if not text:  # an unset shell variable: --root "$ROOT"
        raise argparse.ArgumentTypeError("is empty; give a folder, e.g. --root . for this one")
    return text


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=_folder, default=".",
                    help="where data/, manifests/, artifacts/ go (default: this folder)")
    ap.add_argument("--run", default="demo", help="run name (default demo)")
    ap.add_argument("--rounds", type=_at_least_0, default=2,
                    help="student rounds after the teacher (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.runner import RunError

    try:
        return run_demo(args)
    except KeyboardInterrupt:  # the step's own line came first; each step resumes
        print("demo: interrupted; run `make demo` (or the same command) again to continue",
              file=sys.stderr)
        return 130
    except RunError as e:  # its shared Ray could not start (the steps report their own)
        print(f"demo: error: {e}", file=sys.stderr)
        return 2


def run_demo(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    data = root / "data" / "digits-5pct"  # named by its split: not mistaken for a 10% one
    t0 = time.time()
    if not (data / "dataset.json").exists():
        step("prepare", ["jobs/prepare.py", "digits", "--out", str(data), "--labeled-fraction",
                         str(LABELED_FRACTION)])
    else:
        print(f"=== prepare: {data} exists, reusing it")
    from pipeline.layout import RunLayout
    from pipeline.manifest import load_round

    layout = RunLayout(root, args.run)
    common = ["--run", args.run, "--root", str(root), "--preset", "demo", "--seed",
              str(args.seed)]
    todo: list[tuple[str, list[str]]] = []
    for n in range(args.rounds + 1):
        title = "teacher" if n == 0 else f"student round {n}"
        if _complete(load_round(layout, n)):
            print(f"=== {title}: round {n} is complete, skipping")
        elif n == 0:
            todo.append((title, ["jobs/teacher.py", *common, "--data", str(data)]))
        else:
            todo.append((title, ["jobs/student.py", *common, "--round", str(n)]))
    if todo:
        with shared_ray() as env:
            for title, cmd in todo:
                step(title, cmd, env)
    step("report", ["jobs/report.py", "--run", args.run, "--root", str(root)])
    print(f"\nNoisy Student on digits ({time.time() - t0:.0f}s in all):\n")
    print(summary_table(root, args.run))
    print("\nFixRes fine-tune (top-1 at the test resolution; step time ratio = measured seconds "
          "per training step at the training resolution / at the test one; saved = training "
          "steps x the difference):\n")
    print(fixres_table(fixres_rows(root, args.run, args.rounds)))
    print(f"\nreport: {root / 'reports' / args.run / 'report.md'}")
    return 0


def _complete(rec: RoundRecord | None) -> bool:
    return rec is not None and rec.status == "complete"


if __name__ == "__main__":
    sys.exit(main())
