"""Shared fixtures: a small digits dataset, a quick teacher model, one local Ray per module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.dataset import DatasetInfo, prepare_digits

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s unless
# set), and a fit waits on those polls to see its workers start and finish: several seconds of a
# test's fit that trains for a few. Set here, before any Ray starts, so that the in-process Rays
# and every job subprocess (which inherit this environment) poll faster; users keep Ray's
# default, which suits fits of hours.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray Train starts a controller and five helper actors per fit (one of them once per cluster),
# each a Python process that imports Ray (about 3 CPU-seconds each on 2 cores, where the suite is
# CPU-bound). One of them, the preemption watcher, polls Ray for nodes being drained (spot
# instances); a test machine has none to drain, and Ray has this switch to leave it out. Users
# keep it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# The modules that take minutes (each runs jobs end to end), longest first, by `pytest
# --durations`. `make test` hands whole modules to its two processes in collection order
# (--dist loadfile --no-loadscope-reorder); xdist's own order, by number of tests, started
# test_faults (6 tests, the second longest) last, and the suite waited minutes on it alone.
LONGEST_FIRST = ["test_teacher_job.py", "test_faults.py", "test_student.py",
                 "test_s3_end_to_end.py", "test_pseudo_label.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the other modules, and every module's tests, keep their order


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled digits corpus as shards (default fractions, 100 samples a shard)."""
    out = tmp_path_factory.mktemp("digits")
    prepare_digits(out, shard_size=100)
    return out


@pytest.fixture(scope="session")
def digits_info(digits_dir: Path) -> DatasetInfo:
    from pipeline.dataset import load_dataset

    return load_dataset(digits_dir)


@pytest.fixture(scope="session")
def teacher_model(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> Path:
    """An untrained t0 made to give varied, confident predictions (tests.builders.make_teacher)."""
    from tests.builders import make_teacher

    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    make_teacher(path, digits_dir)
    return path


@pytest.fixture(scope="module")
def ray_address() -> str:
    """A local Ray of 2 CPUs for the module's tests; job subprocesses join it via RAY_ADDRESS
    (tests.builders.job_env), which spares each job starting and stopping a Ray of its own.
    With the dashboard: it serves the state API that Ray Train's placement-group cleaner polls."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                 logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def s3():
    """A local S3 server (tests/s3server.py), its AWS variables set in this process for the
    module, so that the code under test and the Ray workers started after it find it the way a
    user's jobs would (environment, not options)."""
    from pipeline.fs import s3_filesystem
    from tests.s3server import start_server

    server = start_server()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    s3_filesystem.cache_clear()
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3_filesystem.cache_clear()
        server.stop()
