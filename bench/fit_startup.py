"""What a Ray Train fit costs before and after its training function: Ray's ``TorchConfig``
against ours (``pipeline.process_group.TorchProcessGroup``).

    python bench/fit_startup.py                  # about 2 minutes on 2 CPU cores
    python bench/fit_startup.py --rounds 1 --no-warmup --json /tmp/x.json   # the test's check

Each fit is the cheapest there is: one training worker (one CPU) whose function only returns,
on a local Ray started here with 2 CPUs (so every second is start-up and teardown: the
controller actor, Ray Train's helper actors, the worker process and its process group). The two
configs alternate (which goes first alternates too), after one warm-up fit that starts what Ray
starts once per cluster; the figure is the median wall time of a fit with Ray's config over the
median with ours (above 1: ours starts faster). The report also says whether each fit's
controller process had torch's libraries mapped, which is the difference between the two.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def controllers_with_torch() -> list[bool]:
    """Run in a training worker: for each Ray Train controller of this worker's cluster, whether
    it has a torch library mapped. A controller is the raylet's child like the worker; scanning
    only the raylet's children keeps out the controllers of other clusters on the machine."""
    import os

    raylet = os.getppid()
    found = []
    for d in Path("/proc").iterdir():
        try:
            if (d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    == raylet and b"TrainController" in (d / "cmdline").read_bytes()):
                found.append("libtorch" in (d / "maps").read_text())
        except (OSError, ValueError, IndexError):
            continue
    return found


def _probe(config: dict) -> None:
    """The training function: records what :func:`controllers_with_torch` finds."""
    Path(config["out"]).write_text(repr(controllers_with_torch()))


def fit_seconds(config: str, storage: Path, name: str) -> tuple[float, str]:
    """Wall seconds of one fit with ``config`` ("ray" or "ours"), and what the probe saw."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.process_group import TorchProcessGroup

    out = storage / f"{name}.txt"
    start = time.perf_counter()
    TorchTrainer(_probe, train_loop_config={"out": str(out)},
                 torch_config=TorchProcessGroup() if config == "ours" else TorchConfig(),
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=name, storage_path=str(storage))).fit()
    return time.perf_counter() - start, out.read_text()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4,
                   help="fits of each config, alternating (default 4)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the warm-up fit (a quick check of the script, not a measurement)")
    p.add_argument("--json", type=Path, default=None,
                   help="merge the figure into this file (bench/latest.json)")
    args = p.parse_args(argv)

    import ray

    # Ray Train's preemption watcher is a helper process per fit that only a cloud's preemptible
    # nodes need; off, as in the test suite, so that the fit is what Ray Train always starts.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             logging_level="WARNING")
    times: dict[str, list[float]] = {"ray": [], "ours": []}
    try:
        with tempfile.TemporaryDirectory(prefix="ns-fit-bench-") as tmp:
            storage = Path(tmp)
            if not args.no_warmup:
                warm, _ = fit_seconds("ours", storage, "warmup")
                print(f"warm-up fit (starts Ray's once-per-cluster actors): {warm:.1f} s",
                      flush=True)
            for r in range(args.rounds):
                order = ("ray", "ours") if r % 2 == 0 else ("ours", "ray")
                for config in order:
                    s, seen = fit_seconds(config, storage, f"{config}{r}")
                    times[config].append(s)
                    print(f"round {r + 1}: {config:4s} {s:5.1f} s (controller mapped torch: "
                          f"{seen})", flush=True)
    finally:
        ray.shutdown()
    ray_s, ours_s = statistics.median(times["ray"]), statistics.median(times["ours"])
    figure = ray_s / ours_s
    print(f"one-worker fit, median of {args.rounds}: Ray's TorchConfig {ray_s:.1f} s, "
          f"TorchProcessGroup {ours_s:.1f} s; fit_startup_ray_config_over_ours {figure:.3f}")
    if args.json is not None:
        from bench.results import merge

        merge({"fit_startup_ray_config_over_ours": figure}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
