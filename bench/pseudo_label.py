"""Benchmark of the pseudo-label stage (Ray Data batch inference) on the bundled digits.

    python bench/pseudo_label.py                 # about 3-4 minutes on 2 CPU cores
    python bench/pseudo_label.py --repeat 3 --throughput-repeat 3   # smaller corpora, faster
    python bench/pseudo_label.py --json bench/latest.json   # what make bench runs
    python bench/pseudo_label.py --device cuda --num-cpus 16  # teacher on a GPU (gpu_check.sh)

(a) Throughput: images/s of ``label_shards`` (read tar -> decode -> teacher -> Parquet, through
    Ray Data) against the teacher's pure forward pass on already-decoded tensors, same network
    (``pipeline.inference.inference_model``: BatchNorm folded, channels_last), batch size and
    thread count as the actor, in a Ray actor with the same worker environment
    (``pipeline.runner.worker_env``, whose allocator settings more than double a CPU forward
    pass; the report also prints the forward pass in the driver without them), measured in the
    same run (just before and just after each stage run, averaged: the speed of a shared
    machine drifts over minutes).
    Reported end to end (the call's wall time: actor start-up included) and steady state (from
    the first finished shard to the last), at 1x, 10x and 40x the digits, and the fixed cost
    (wall time minus images / steady rate: Ray Data start-up, the actor's process start and
    model load). The readers decode ahead of the teacher within an object-store budget of 16
    batches here (~8,000 images at batch 512), so at 1x they finish before the teacher starts;
    40x (~43,000 images) is dominated by the rate the whole pipeline sustains.
(b) Memory: peak proportional set size (PSS: shared pages such as the object store counted once)
    of the driver and of the whole Ray process tree, sampled every 0.5 s, while labeling the
    digits unlabeled split (1x) and the same images repeated with new keys into 10x and 40x as
    many shards. Flat memory means the pipeline streams: nothing scales with the corpus.

The teacher is an untrained ``efficientnet_t0`` (throughput does not depend on the weights).
``--json`` merges the largest corpus's figures into that file (bench/results.py): end to end and
steady over forward, tree memory over 1x, and the bytes on disk per pseudo-label row; and
the teacher network's forward over the model's as loaded (nothing folded, contiguous tensors),
timed in the same kind of actor next to the first and the last of the forward timings.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline.checkpoint import save_model_file  # noqa: E402
from pipeline.config import PseudoLabelConfig  # noqa: E402
from pipeline.dataset import prepare_digits  # noqa: E402
from pipeline.images import decode_image  # noqa: E402
from pipeline.pseudo_label import label_shards  # noqa: E402
from pipeline.shards import ShardWriter, read_samples  # noqa: E402
from pipeline.transforms import eval_transform  # noqa: E402

MODEL = "efficientnet_t0"


# ----------------------------------------------------------------------------- memory


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])  # the name may contain spaces
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def _pss(pid: int) -> int:
    """Bytes of proportional set size (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def wait_for_actors_to_exit(timeout: float = 30.0) -> None:
    """Ray Data ends a run's actors ~1.5 s after the run returns, and ``ray.kill`` ends the
    forward-pass actor asynchronously; let them go before the next measurement (a run or a
    forward pass) so that one's memory and CPU are not counted in the next."""
    deadline = time.monotonic() + timeout
    while any(b"MapWorker" in c or b"ray::Forward" in c
              for c in map(_cmdline, _descendants(os.getpid()))):
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)


@dataclass
class MemorySampler:
    """Peak PSS of this process and of its whole process tree (Ray's processes included)."""

    every: float = 0.5
    driver_peak: int = 0
    tree_peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> tuple[int, int]:
        import os

        me = os.getpid()
        driver = _pss(me)
        total = sum(_pss(p) for p in _descendants(me))
        return driver, total

    def _loop(self) -> None:
        while not self._stop.is_set():
            driver, total = self.sample()
            self.driver_peak = max(self.driver_peak, driver)
            self.tree_peak = max(self.tree_peak, total)
            self._stop.wait(self.every)

    def __enter__(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- setup


def make_corpus(work: Path, repeats: list[int]) -> tuple[list[str], dict[int, list[str]]]:
    """Digits (1x unlabeled shards) and, per repeat r, r copies of its images under new keys."""
    info = prepare_digits(work / "digits", shard_size=100)
    one = info.split("unlabeled").shards
    samples = list(read_samples(one))
    out = {}
    for repeat in sorted(set(repeats)):
        with ShardWriter(work / f"x{repeat}", prefix=f"x{repeat}", maxcount=100) as w:
            for r in range(repeat):
                for s in samples:
                    w.write(f"{s.key}_r{r}", s.image)
        out[repeat] = [str(p) for p in w.paths]
    return one, out


def make_model(work: Path) -> tuple[Path, str, torch.nn.Module]:
    from models import create_model

    torch.manual_seed(0)
    model = create_model(MODEL, 10).eval()
    path = work / "model.pt"
    sha = save_model_file(path, model.state_dict(), model_name=MODEL,
                          classes=[str(i) for i in range(10)], train_resolution=32,
                          test_resolution=32)
    return path, sha, model


# ----------------------------------------------------------------------------- measuring


def forward_rate(model: torch.nn.Module, images: torch.Tensor, batch_size: int, threads: int,
                 seconds: float, device: str = "cpu", as_loaded: bool = False) -> float:
    """Images/s of the bare forward pass on decoded tensors, full batches only, on the network
    the teacher actor runs (``pipeline.inference.inference_model``: BatchNorm folded,
    channels_last) or, ``as_loaded``, on the model as loaded (contiguous tensors, nothing
    folded). On a GPU the tensors are on it already and both run in the actor's bf16 autocast."""
    from pipeline.inference import inference_model

    torch.set_num_threads(threads)
    reps = -(-batch_size // len(images)) + 1
    pool = images.repeat(reps, 1, 1, 1).to(device)
    if as_loaded:
        model = model.eval().to(device)
    else:
        model = inference_model(copy.deepcopy(model), torch.device(device))  # folds in place
        pool = pool.contiguous(memory_format=torch.channels_last)
    cast: contextlib.AbstractContextManager = contextlib.nullcontext()
    if device == "cuda":
        cast = torch.autocast("cuda", dtype=torch.bfloat16)
    with torch.inference_mode(), cast:
        model(pool[:batch_size])  # warm-up: first call plans the kernels
        _sync(device)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            offset = (n // batch_size * 7) % (len(pool) - batch_size)
            model(pool[offset : offset + batch_size])
            n += batch_size
            if device == "cuda" and n % (8 * batch_size) == 0:
                _sync(device)  # the clock must see the work, not its queueing
        _sync(device)
    rate = n / (time.perf_counter() - start)
    model.to("cpu")
    return rate


def actor_forward_rate(model_path: Path, sha: str, images: torch.Tensor, batch_size: int,
                       threads: int, seconds: float, device: str = "cpu",
                       as_loaded: bool = False) -> float:
    """:func:`forward_rate` in a Ray actor, a process like the teacher actor's: the same Ray
    worker environment (``pipeline.runner.worker_env``: glibc's allocator keeps freed memory,
    without which a forward pass on a CPU spends much of its time in page faults) and the same
    model file. Ended after the measurement, so that it holds no CPU, GPU or memory while the
    stage runs."""
    import ray

    @ray.remote(num_cpus=0)
    class Forward:
        def rate(self, images: torch.Tensor) -> float:
            from pipeline.checkpoint import load_model

            model, _ = load_model(model_path, sha)
            return forward_rate(model, images, batch_size, threads, seconds, device, as_loaded)

    wait_for_actors_to_exit()  # the last run's readers and teacher, shutting down, share CPUs
    actor = Forward.options(num_gpus=1 if device == "cuda" else 0).remote()
    try:
        return ray.get(actor.rate.remote(ray.put(images)))
    finally:
        ray.kill(actor)
        wait_for_actors_to_exit()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def stage_run(name: str, model_path: Path, sha: str, shards: list[str], out: Path,
              cfg: PseudoLabelConfig, sampler: MemorySampler | None = None) -> dict:
    """label_shards, optionally under a memory sampler; end-to-end and steady-state images/s."""
    done: list[tuple[float, int]] = []

    def progress(line: str) -> None:
        if " done (" in line:
            done.append((time.perf_counter(), int(line.split(" done (")[1].split()[0])))

    shutil.rmtree(out, ignore_errors=True)
    wait_for_actors_to_exit()
    with sampler or contextlib.nullcontext():
        start = time.perf_counter()
        result = label_shards(model_path, sha, shards, out, cfg, progress=progress)
        wall = time.perf_counter() - start
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())  # every file it left
    return {"name": name, "rows": result["rows"], "wall": wall,
            "e2e_rate": result["rows"] / wall, "steady_rate": steady_rate(done),
            "bytes_per_row": disk / max(result["rows"], 1),
            "driver_peak": sampler.driver_peak if sampler else 0,
            "tree_peak": sampler.tree_peak if sampler else 0}


def steady_rate(done: list[tuple[float, int]], gap: float = 0.1) -> float:
    """Rows/s from the end of the first block of label rows the driver received to the last
    finished shard: after the first block the actor is warm and is the bottleneck.

    ``done``: (time, rows) per finished shard. The shards one block (512 rows, ~5 digits
    shards) completes are written one after another, milliseconds apart; the next block comes
    a batch's forward pass later. So the first block is the run of events less than ``gap``
    apart from the first, and the window starts at its last: counting its shards' rows in
    the window but not their time made the rate ~1% high at 40x, far more at 1x.
    """
    if len(done) < 2:
        return float("nan")
    first = 0
    while first + 1 < len(done) and done[first + 1][0] - done[first][0] < gap:
        first += 1
    if first == len(done) - 1:  # every shard in the first block: no window after it
        return float("nan")
    rows = sum(r for _, r in done[first + 1:])
    return rows / (done[-1][0] - done[first][0])


def mib(b: int) -> str:
    return f"{b / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    jobs_batch = PseudoLabelConfig().label_batch_size
    p.add_argument("--batch-size", type=int, default=jobs_batch,
                   help=f"the teacher's batch (default: the jobs' default, {jobs_batch})")
    p.add_argument("--repeat", type=int, default=10,
                   help="size of the middle corpus, x digits (default 10)")
    p.add_argument("--throughput-repeat", type=int, default=40,
                   help="size of the largest corpus, x digits (default 40: ~43,000 images, "
                        "where start-up is a small share of the wall time)")
    p.add_argument("--forward-seconds", type=float, default=6.0)
    p.add_argument("--work", type=Path, help="keep the corpus here (default: a temp dir)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="the teacher's device (cuda: one GPU actor, forward baseline on the GPU)")
    p.add_argument("--json", type=Path, default=None,
                   help="merge the figures into this file (make bench: bench/latest.json)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")

    import ray

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-pseudo-label-"))
    work.mkdir(parents=True, exist_ok=True)
    one, repeated = make_corpus(work, [args.repeat, args.throughput_repeat])
    big, huge = repeated[args.repeat], repeated[args.throughput_repeat]
    model_path, sha, model = make_model(work)
    tf = eval_transform(32)
    images = torch.stack([tf(decode_image(s.image)) for s in read_samples(one)])
    cfg = PseudoLabelConfig(label_batch_size=args.batch_size, label_actors=1,
                            cpus_per_actor=1, gpus_per_actor=1.0 if args.device == "cuda" else 0.0)
    threads = int(cfg.cpus_per_actor)

    from pipeline.runner import worker_env

    # The workers' environment of a job (pipeline.runner.ray_session), allocator settings included.
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": worker_env()})
    try:
        idle_driver, idle_tree = MemorySampler().sample()
        # For comparison only: the same forward pass in this process, which has glibc's
        # default allocator settings.
        driver_fwd = forward_rate(model, images, args.batch_size, threads, args.forward_seconds,
                                  args.device)
        # Throughput without the sampler (reading smaps costs CPU), then memory with it. The
        # forward pass is timed before and after every run: this machine's speed drifts by up
        # to 30% over minutes, so each run is compared with the forward rate of its own time.
        corpora = {"1x": one, f"{args.repeat}x": big, f"{args.throughput_repeat}x": huge}
        fwd_args = (model_path, sha, images, args.batch_size, threads, args.forward_seconds,
                    args.device)
        fwd = [actor_forward_rate(*fwd_args)]
        # The model as loaded (nothing folded, contiguous), next to the first and the last of
        # the actor network's timings: what inference_model gains over it.
        loaded = [actor_forward_rate(*fwd_args, as_loaded=True)]
        runs = []
        for name, shards in corpora.items():
            runs.append(stage_run(name, model_path, sha, shards, work / "out", cfg))
            fwd.append(actor_forward_rate(*fwd_args))
            runs[-1]["forward"] = (fwd[-2] + fwd[-1]) / 2
        loaded.append(actor_forward_rate(*fwd_args, as_loaded=True))
        for r in runs:
            m = stage_run(r["name"], model_path, sha, corpora[r["name"]], work / "out", cfg,
                          MemorySampler(every=0.5))
            r.update(driver_peak=m["driver_peak"], tree_peak=m["tree_peak"])
    finally:
        ray.shutdown()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report(args, fwd, loaded, runs, idle_driver, idle_tree, driver_fwd)
    if args.json is not None:
        from bench.results import merge

        merge(figures(runs, args.throughput_repeat, (fwd[0] + fwd[-1]) / sum(loaded)), args.json)
    return 0


def figures(runs: list[dict], repeat: int, over_loaded: float) -> dict[str, float]:
    """The latest.json figures of the largest corpus (named after its size: 40x by default),
    and the actor network's forward over the model's as loaded."""
    small, large = runs[0], runs[-1]
    return {"pseudo_label_teacher_forward_over_plain": over_loaded,
            f"pseudo_label_end_to_end_{repeat}x": large["e2e_rate"] / large["forward"],
            f"pseudo_label_steady_{repeat}x": large["steady_rate"] / large["forward"],
            f"memory_{repeat}x_over_1x": large["tree_peak"] / small["tree_peak"],
            "bytes_per_pseudo_label_row": large["bytes_per_row"]}


def report(args: argparse.Namespace, fwd: list[float], loaded: list[float], runs: list[dict],
           idle_driver: int, idle_tree: int, driver_fwd: float) -> None:
    print(f"\npseudo-label benchmark: {MODEL}, 32 px, batch {args.batch_size}, 1 actor x 1 CPU, "
          f"Ray with {args.num_cpus} CPUs")
    print("  teacher forward only (decoded tensors, 1 thread, in a Ray actor with the workers' "
          "environment), before and after each run: "
          + ", ".join(f"{f:,.0f}" for f in fwd) + " images/s")
    print(f"  the same forward pass in the driver, glibc's default allocator settings: "
          f"{driver_fwd:,.0f} images/s (the actor's before the first run: "
          f"{fwd[0] / driver_fwd:.2f} times that)")
    print("  the model as loaded (BatchNorm not folded, contiguous), in the actor, next to the "
          "first and the last of the above: " + ", ".join(f"{f:,.0f}" for f in loaded)
          + f" images/s: the teacher's network runs {(fwd[0] + fwd[-1]) / sum(loaded):.2f} "
          "times as fast")
    for r in runs:
        r["startup"] = r["wall"] - r["rows"] / r["steady_rate"]
        print(f"  stage {r['name']:>4}: {r['rows']:>6} images in {r['wall']:6.1f} s | end to end "
              f"{r['e2e_rate']:6,.0f} images/s = {r['e2e_rate'] / r['forward']:.2f} x forward | "
              f"steady {r['steady_rate']:6,.0f} images/s = "
              f"{r['steady_rate'] / r['forward']:.2f} x forward")
    print("  (steady state = first to last finished shard; with 11 shards the readers are done "
          "before the actor starts, so 1x measures the actor alone)")
    fixed = ", ".join(f"{r['name']} {r['startup']:.1f} s" for r in runs)
    print(f"  fixed cost (wall - images / steady rate: Ray Data start-up, actor start, model "
          f"load): {fixed}")
    print("  on disk: " + ", ".join(f"{r['name']} {r['bytes_per_row']:.1f} bytes/row"
                                    for r in runs))
    print(f"  memory, idle Ray: driver {mib(idle_driver)}, process tree {mib(idle_tree)}")
    for r in runs:
        print(f"  memory peak {r['name']:>4}: driver {mib(r['driver_peak'])}, process tree "
              f"{mib(r['tree_peak'])} (above idle: {mib(r['tree_peak'] - idle_tree)})")
    small = runs[0]
    for large in runs[1:]:
        print(f"  memory {large['name']:>4} / 1x: driver "
              f"{large['driver_peak'] / small['driver_peak']:.2f}, process tree "
              f"{large['tree_peak'] / small['tree_peak']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
