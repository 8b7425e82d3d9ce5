"""Job output: Ray's known-harmless lines are dropped, ours pass, --verbose keeps everything."""

from __future__ import annotations

import io
import logging
import os
import sys

from pipeline.logs import _LineFilter, harmless, quiet_ray

RAY_LINES = [
    "\x1b[36m(TrainController pid=2760)\x1b[0m Requesting resources: {'CPU': 1.0} * 1",
    "(TrainController pid=2760) Attempting to start training worker group of size 1 with x",
    "(TrainController pid=2760) Started training worker group of size 1: ",
    "(TrainController pid=2760) - (ip=192.0.2.2, pid=2932) world_rank=0, local_rank=0",
    "(RayTrainWorker pid=2932) Setting up process group for: env:// [rank=0, world_size=1]",
    "Requesting resources: {'CPU': 1.0} * 1",  # without the prefix (RAY_DISABLE_..._PREFIX)
    "(TrainController pid=2760) [2026-12-01 21:46:53,529 E 2760 2789] core_worker.cc:2465: Actor "
    "with class name: 'PreemptionWatcher' and ID: 'b8' has constructor arguments in the object "
    "store and max_restarts > 0. If the arguments ...",
    # a resume: Ray Train's advice to delete the folder that holds the checkpoints
    "(TrainController pid=7) A run snapshot was found in storage folder at: '/r/artifacts/x/t'",
    "(TrainController pid=7) This snapshot contains a list of checkpoints reported via "
    "`ray.train.report` and will be loaded. This allows the latest checkpoint found in the "
    "snapshot to be accessible within your training function via `ray.train.get_checkpoint`.",
    "(TrainController pid=7) If you meant to start a brand new training job without any "
    "information about previous checkpoints found in this directory, please configure a new, "
    "unique `RunConfig(name)` or delete the existing folder at '/r/artifacts/x/t'.",
]
OURS = [
    "(RayTrainWorker pid=2932) [teacher] epoch 3/120 loss 0.6350 train top-1 0.969",
    "pseudo-label: unlabeled-000000.tar done (100 rows); shards 1/12, 11 left",
    "(RayTrainWorker pid=2932) ValueError: something real went wrong",
]


def test_known_lines_are_harmless_and_ours_are_not() -> None:
    assert all(harmless(line) for line in RAY_LINES)
    assert not any(harmless(line) for line in OURS)


def test_filter_passes_our_lines_whole_and_in_order() -> None:
    inner = io.StringIO()
    f = _LineFilter(inner)
    for line in RAY_LINES[:2] + OURS:
        f.write(line[:10])  # print() may hand a line over in pieces
        f.write(line[10:] + "\n")
    f.write("no newline yet")
    f.flush()
    assert inner.getvalue() == "\n".join(OURS) + "\nno newline yet"


def test_quiet_ray_restores_streams_levels_and_environment() -> None:
    before = (sys.stdout, sys.stderr, logging.getLogger("ray.data").level, dict(os.environ))
    with quiet_ray():
        assert isinstance(sys.stderr, _LineFilter)
        assert logging.getLogger("ray.data").level == logging.WARNING
    after = (sys.stdout, sys.stderr, logging.getLogger("ray.data").level, dict(os.environ))
    assert after == before
    with quiet_ray(verbose=True):
        assert not isinstance(sys.stderr, _LineFilter)


def test_quiet_console_lowers_only_console_handlers_and_only_inside() -> None:
    from pipeline.logs import quiet_console

    logger = logging.getLogger("test.quiet.console")
    console, file = logging.StreamHandler(io.StringIO()), logging.FileHandler(os.devnull)
    logger.handlers = [console, file]
    quiet_console("test.quiet.console")  # outside quiet_ray: nothing changes
    assert console.level == logging.NOTSET
    with quiet_ray():
        quiet_console("test.quiet.console")
        assert console.level == logging.WARNING and file.level == logging.NOTSET
    assert console.level == logging.NOTSET  # restored
    file.close()


def test_the_line_filter_loses_no_line_written_from_two_threads() -> None:
    """Ray forwards worker lines from a thread while the main thread prints: the filter's
    read-modify-write of its pending text lost one writer's lines now and then."""
    import io
    import sys
    import threading

    from pipeline.logs import _LineFilter

    out = io.StringIO()
    stream = _LineFilter(out)

    def write(tag: str) -> None:
        for i in range(2000):
            stream.write(f"{tag} {i}\n")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=write, args=(t,)) for t in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    stream.flush()
    lines = out.getvalue().splitlines()
    assert sorted(lines) == sorted(f"{t} {i}" for t in "ab" for i in range(2000))
