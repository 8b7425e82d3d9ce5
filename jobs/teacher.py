"""Round 0: train the teacher on the labeled split with Ray Train.

    python jobs/teacher.py --run r1 --data data/digits --preset demo
    ray job submit --working-dir . -- python jobs/teacher.py --run r1 --data $PWD/data/digits \
        --root $PWD

Writes manifests/<run>/round-0.json and artifacts/<run>/round-0/ under --root. Running the same
command again continues from the last epoch checkpoint; a complete round needs --force.
"""

from __future__ import annotations

import sys

from _common import run_job


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import TrainConfig, parse_config
    from pipeline.rounds import run_round

    def body() -> int:
        cfg = parse_config(TrainConfig, "teacher", argv, description=__doc__)
        rec = run_round(cfg)
        print(f"teacher: round 0 of {cfg.run!r} complete: test top-1 {rec.metrics.top1:.4f}"
              f" ({rec.model.name}); manifest {cfg.root}/manifests/{cfg.run}/round-0.json")
        return 0

    return run_job("teacher", body)


if __name__ == "__main__":
    sys.exit(main())
