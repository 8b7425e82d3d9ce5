"""The noise ablation of the paper on the digits corpus, plus a ceiling, from one teacher.

    python bench/ablation.py --root /tmp/abl [--seeds 0] [--teacher-run demo]

Needs round 0 of ``--teacher-run`` under ``--root`` (run `make demo` or jobs/teacher.py first).
For each variant it copies that teacher into a run of its own and trains a round-1 student with
the demo preset:

    all noise        RandAugment + dropout + stochastic depth (the demo's student)
    no RandAugment   dropout + stochastic depth only
    no noise         none of the three (the paper: barely beats its teacher)
    ceiling          all noise, but the unlabeled images carry their held-out TRUE labels

Prints one table: variant, seed, student model, test top-1, teacher top-1, gain.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.layout import RunLayout  # noqa: E402
from pipeline.manifest import load_round, save_round  # noqa: E402

VARIANTS = {
    "all noise": [],
    "no RandAugment": ["--no-randaugment"],
    "no noise": ["--no-randaugment", "--dropout", "0", "--drop-path", "0"],
    "ceiling (true labels)": ["--truth-labels"],
}


def copy_teacher(root: Path, src_run: str, dst_run: str) -> None:
    rec = load_round(RunLayout(root, src_run), 0)
    rec.run = dst_run
    save_round(RunLayout(root, dst_run), rec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--teacher-run", default="demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    root = args.root.resolve()
    teacher = load_round(RunLayout(root, args.teacher_run), 0)
    if teacher is None or teacher.status != "complete":
        raise SystemExit(f"ablation: run {args.teacher_run!r} has no complete round 0 under "
                         f"{root}; run `make demo` (or jobs/teacher.py) first")
    rows = []
    for seed in args.seeds:
        for name in args.variants:
            run = f"abl-{name.split()[0]}-{name.split()[1] if ' ' in name else ''}-s{seed}"
            run = run.replace("(", "").replace("--", "-")
            done = load_round(RunLayout(root, run), 1)
            if done is None or done.status != "complete":
                copy_teacher(root, args.teacher_run, run)
                t0 = time.time()
                cmd = [sys.executable, str(ROOT / "jobs" / "student.py"), "--run", run,
                       "--round", "1", "--root", str(root), "--preset", "demo", "--seed",
                       str(seed), *VARIANTS[name]]
                print(f"=== {name}, seed {seed}: {' '.join(cmd[1:])}", flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                print(f"=== {name}, seed {seed}: {time.time() - t0:.0f}s", flush=True)
            rec = load_round(RunLayout(root, run), 1)
            rows.append({"variant": name, "seed": seed, "model": rec.model.name,
                         "top1": rec.metrics.top1, "teacher_top1": teacher.metrics.top1,
                         "gain": rec.metrics.top1 - teacher.metrics.top1})
    print("\n| variant | seed | student | test top-1 | teacher top-1 | gain |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seed']} | {r['model']} | {r['top1']:.4f} | "
              f"{r['teacher_top1']:.4f} | {r['gain']:+.4f} |")
    (root / "ablation.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
