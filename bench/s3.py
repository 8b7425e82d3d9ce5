"""Benchmark: pseudo-labeling shards read from S3 against the same shards on local disk.

    python bench/s3.py                       # 10x and 40x the digits; a few minutes on 2 cores
    python bench/s3.py --repeats 10          # the smaller corpus only

The S3 server is moto on 127.0.0.1 (tests/s3server.py, the one the tests use), so the ratio
measures what reading through pyarrow's S3 client and an HTTP object server costs this pipeline
(one ranged GET per 8 MiB block of a shard, the Parquet files uploaded whole), not the bandwidth
of a real object store, which is usually higher than one Python server's. Both sides write their
pseudo-label files to the same kind of place they read from (local disk, or the bucket), as a run
with ``--root`` there would. After one discarded warm-up run, runs alternate local/S3 (which
side goes first alternates too), at the jobs' teacher batch; the ratio is of the mean
end-to-end images/s of each side (label_shards' wall time, start-up included), S3 over local:
1.0 means no cost.

Writes ``pseudo_label_s3_over_local_<N>x`` into bench/latest.json (other keys are kept).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pseudo_label import make_corpus, make_model  # noqa: E402

from bench.results import LATEST, merge  # noqa: E402
from pipeline.config import PseudoLabelConfig  # noqa: E402
from pipeline.fs import S3Path, rmtree, s3_filesystem  # noqa: E402
from pipeline.pseudo_label import label_shards  # noqa: E402
from tests.s3server import start_server  # noqa: E402


def run(model_path: Path, sha: str, shards: list[str], out: Path | S3Path,
        cfg: PseudoLabelConfig) -> dict[str, float]:
    """One label_shards call into an emptied ``out``: rows and end-to-end images/s."""
    rmtree(out)
    start = time.perf_counter()
    result = label_shards(model_path, sha, shards, out, cfg, progress=lambda _: None)
    return {"rows": result["rows"], "e2e_rate": result["rows"] / (time.perf_counter() - start)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, nargs="+", default=[10, 40],
                   help="corpus sizes, x the digits' 1,077 unlabeled images (default 10 40)")
    p.add_argument("--rounds", type=int, default=2, help="local/S3 pairs per size (default 2)")
    p.add_argument("--num-cpus", type=int, default=2)
    jobs_batch = PseudoLabelConfig().label_batch_size
    p.add_argument("--batch-size", type=int, default=jobs_batch,
                   help=f"the teacher's batch (default: the jobs' default, {jobs_batch})")
    p.add_argument("--json", type=Path, default=LATEST, help="figures file to update")
    args = p.parse_args(argv)

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    server = start_server()
    os.environ.update(server.env())
    s3_filesystem.cache_clear()
    results: dict[int, dict[str, list[dict]]] = {}
    try:
        server.make_bucket("bench")
        _, corpora = make_corpus(work, args.repeats)
        model_path, sha, _ = make_model(work)
        remote: dict[int, list[str]] = {}
        for repeat, shards in corpora.items():
            remote[repeat] = []
            for s in shards:
                dest = S3Path(f"s3://bench/x{repeat}/{Path(s).name}")
                dest.upload(s)
                remote[repeat].append(str(dest))
        cfg = PseudoLabelConfig(label_batch_size=args.batch_size, label_actors=1,
                                cpus_per_actor=1)
        # Started after the AWS variables are set: the workers inherit them.
        from pipeline.runner import worker_env

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": worker_env()})  # as a job's workers have it
        try:
            # A discarded warm-up run: the first call in a process pays imports (ray.data) and
            # Ray Data's first set-up, which would count against whichever side went first.
            smallest = min(args.repeats)
            run(model_path, sha, corpora[smallest], work / "out", cfg)
            for repeat in args.repeats:
                results[repeat] = {"local": [], "s3": []}
                for i in range(args.rounds):  # the side that goes first alternates
                    sides = [("local", corpora[repeat], work / "out"),
                             ("s3", remote[repeat], S3Path("s3://bench/out"))]
                    for side, shards, out in sides[:: 1 if i % 2 == 0 else -1]:
                        results[repeat][side].append(run(model_path, sha, shards, out, cfg))
        finally:
            ray.shutdown()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print("\npseudo-labeling from S3 (moto on 127.0.0.1) vs local disk, end to end, "
          f"{args.num_cpus} CPUs, batch {args.batch_size}")
    print(f"{'corpus':>8} {'images':>8} {'local img/s':>12} {'S3 img/s':>10} {'S3/local':>9}")
    figures = {}
    for repeat, r in results.items():
        local = sum(x["e2e_rate"] for x in r["local"]) / len(r["local"])
        s3 = sum(x["e2e_rate"] for x in r["s3"]) / len(r["s3"])
        figures[f"pseudo_label_s3_over_local_{repeat}x"] = s3 / local
        print(f"{repeat:>7}x {r['local'][0]['rows']:>8,} {local:>12,.0f} {s3:>10,.0f} "
              f"{s3 / local:>9.2f}")
    merge(figures, args.json)
    print(f"wrote {', '.join(figures)} to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
