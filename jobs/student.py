"""Round N >= 1: pseudo-label with round N-1's model, select, train a noised student, FixRes.

    python jobs/student.py --run r1 --round 1 --preset demo
    ray job submit --working-dir . -- python jobs/student.py --run r1 --round 1 --root $PWD

Reads manifests/<run>/round-<N-1>.json (it must be complete) and writes round-<N>.json. Running the
same command again continues at the first stage that is not complete.
"""

from __future__ import annotations

import sys

from _common import run_job


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import StudentConfig, parse_config
    from pipeline.rounds import run_round

    def body() -> int:
        cfg = parse_config(StudentConfig, "student", argv, description=__doc__)
        rec = run_round(cfg)
        met = rec.metrics
        teacher = "n/a" if met.teacher_top1 is None else f"{met.teacher_top1:.4f}"
        print(f"student: round {cfg.round} of {cfg.run!r} complete: test top-1 "
              f"{met.top1:.4f} ({rec.model.name}), teacher {teacher}; "
              f"manifest {cfg.root}/manifests/{cfg.run}/round-{cfg.round}.json")
        return 0

    return run_job("student", body)


if __name__ == "__main__":
    sys.exit(main())
