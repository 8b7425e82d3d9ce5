"""Pseudo-label and select stages: pure parts without Ray, then end-to-end runs on digits.

The Ray tests share one local Ray (2 CPUs) per module; the job subprocesses join it through
RAY_ADDRESS instead of starting their own.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import manifest as mf
from pipeline.checkpoint import CheckpointError, save_model_file
from pipeline.dataset import load_dataset, prepare_digits
from pipeline.pseudo_label import (
    KIND_BAD,
    KIND_END,
    KIND_OK,
    PSEUDO_SCHEMA,
    PseudoLabelConfig,
    PseudoLabelError,
    ShardAssembler,
    TeacherPredictor,
    _data_context,
    _data_settings,
    decoded_dataset,
    inference_dataset,
    label_shards,
    pseudo_file_names,
    read_decode_shards,
    read_shard,
    read_tasks,
    run_pseudo_label_stages,
    select_pseudo_labels,
    soft_labels,
)
from pipeline.select import apply_selection, class_stats, plan_selection
from pipeline.shards import ShardWriter, decode_image, encode_png, read_samples
from pipeline.transforms import eval_transform, normalize

REPO = Path(__file__).resolve().parent.parent
CLASSES = [str(i) for i in range(10)]


# ============================================================================ helpers


def make_teacher(path: Path, digits_dir: Path) -> str:
    """An untrained t0 made to give varied, confident predictions (no training: seconds, not
    minutes): batch-norm statistics from real images, a random classifier centred on them."""
    from models import create_model
    from pipeline.shards import decode_image

    torch.manual_seed(0)
    model = create_model("efficientnet_t0", 10)
    shards = load_dataset(digits_dir).split("labeled").shards
    x = torch.stack([eval_transform(32)(decode_image(s.image))
                     for s in list(read_samples(shards))[:64]])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass gives the batch statistics
    model.train()
    with torch.no_grad():
        model(x)
        model.eval()
        feats = model.avgpool(model.features(x)).flatten(1)  # (64, F)
        lin = model.classifier[1]
        w = torch.randn_like(lin.weight) * 3 / feats.std(0).mean() / feats.shape[1] ** 0.5
        lin.weight.copy_(w)
        lin.bias.copy_(-(feats.mean(0) @ w.T))
    return save_model_file(path, model.state_dict(), model_name="efficientnet_t0",
                           classes=CLASSES, train_resolution=32, test_resolution=32)


def make_round0(root: Path, run: str, dataset: Path, model_src: Path,
                sha: str | None = None, status: str = "complete") -> dict:
    """A finished round 0 written directly (no teacher job needed): model under artifacts/,
    its uri relative to root."""
    model = mf.artifact_dir(root, run, 0) / "model.pt"
    model.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_src, model)
    m = mf.new_manifest(run=run, round_=0, role="teacher", config={},
                        model={"name": "efficientnet_t0"}, cluster={},
                        data={"dataset": str(dataset)})
    m["checkpoint"] = {"uri": model.relative_to(root).as_posix(),
                       "sha256": sha or mf.sha256_file(model)}
    if status == "complete":
        mf.mark_complete(m)
    mf.save_manifest(root, m)
    return m


def new_round1(root: Path, run: str) -> dict:
    prev = mf.load_manifest(root, run, 0)
    return mf.new_manifest(run=run, round_=1, role="student", config={}, model={},
                           data=prev["data"], cluster={},
                           teacher={"round": 0, "checkpoint_sha256": prev["checkpoint"]["sha256"]})


def run_job(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "pseudo_label.py"), *args],
                            cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def read_all(out_dir: Path) -> dict[str, pd.DataFrame]:
    return {p.name: pq.read_table(p).to_pandas() for p in sorted(out_dir.glob("*.parquet"))}


def fake_label_batch(shard: str, index: np.ndarray, kind: np.ndarray, n: int = 0,
                     k: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """What the teacher stage hands the driver, for testing the driver side without Ray."""
    rng = np.random.default_rng(seed)
    m = len(index)
    p = rng.dirichlet(np.ones(k), size=m).astype(np.float32)
    order = np.argsort(-p, axis=1)
    return {
        "shard": np.array([shard] * m, dtype=object), "index": index.astype(np.int64),
        "key": np.array([f"s{os.path.basename(shard)[:-4]}k{i:04d}" for i in index], dtype=object),
        "kind": kind.astype(np.int8),
        "error": np.array(["broken" if x == KIND_BAD else "" for x in kind], dtype=object),
        "n": np.full(m, n, np.int64), "label": order[:, 0].astype(np.int32),
        "confidence": p.max(1), "entropy": -(p * np.log(p)).sum(1).astype(np.float32),
        "topk_index": order.astype(np.int32),
        "topk_prob": np.take_along_axis(p, order, 1).astype(np.float16),
    }


# ============================================================================ pure parts


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    make_teacher(path, digits_dir)
    return path



def test_soft_labels_are_a_distribution_over_topk_when_k_is_all_classes() -> None:
    logits = torch.randn(64, 10) * 3
    out = soft_labels(logits, topk=10)
    p = logits.softmax(1).numpy()
    assert out["topk_prob"].dtype == np.float16 and out["topk_index"].dtype == np.int32
    np.testing.assert_allclose(out["topk_prob"].astype(np.float64).sum(1), 1.0, atol=5e-3)
    np.testing.assert_array_equal(out["label"], p.argmax(1))
    np.testing.assert_allclose(out["confidence"], p.max(1), rtol=1e-5)
    np.testing.assert_allclose(out["entropy"], -(p * np.log(p)).sum(1), rtol=1e-4)
    assert (np.diff(out["topk_prob"].astype(np.float32), axis=1) <= 0).all()  # sorted
    assert soft_labels(logits, topk=3)["topk_index"].shape == (64, 3)


def test_teacher_outputs_do_not_depend_on_batch_mates(teacher_model: Path) -> None:
    pred = TeacherPredictor(str(teacher_model), mf.sha256_file(teacher_model), topk=10,
                            batch_size=32, use_gpu=False, threads=1)
    x = np.random.default_rng(0).integers(0, 256, size=(40, 3, 32, 32), dtype=np.uint8)
    whole = pred.forward(x)
    alone = pred.forward(x[5:8])  # 3 rows, padded to the same 32-row shape
    for name in whole:
        np.testing.assert_array_equal(whole[name][5:8], alone[name])


def _write_shard(path: Path, keys: list[str], bad_key: str | None = None) -> None:
    img = encode_png(np.full((8, 8, 3), 128, np.uint8))
    with tarfile.open(path, "w") as tar:
        for key in keys:
            data = b"\x89PNG not really" if key == bad_key else img
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_read_shard_counts_damage_instead_of_raising(tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    _write_shard(good, [f"k{i}" for i in range(6)])
    rows = list(read_shard(str(good)))
    assert [(r[0], r[1], r[2]) for r in rows] == [(KIND_OK, i, f"k{i}") for i in range(6)]

    data = good.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 512 * 5 + 100])  # inside the 3rd member's header/data
    rows = list(read_shard(str(cut)))
    assert [r[0] for r in rows[:-1]] == [KIND_OK] * (len(rows) - 1)
    assert rows[-1][0] == KIND_BAD and "damaged shard" in rows[-1][3]

    at_boundary = tmp_path / "boundary.tar"  # tarfile alone reads this silently as complete
    at_boundary.write_bytes(data[: 512 * 4])
    rows = list(read_shard(str(at_boundary)))
    assert rows[-1][0] == KIND_BAD and "end-of-archive" in rows[-1][3]

    missing = list(read_shard(str(tmp_path / "nope.tar")))
    assert len(missing) == 1 and missing[0][0] == KIND_BAD


def test_readers_cut_consecutive_shards_into_full_batches_with_end_rows(
        digits_dir: Path) -> None:
    shards = load_dataset(digits_dir).split("unlabeled").shards[:3]
    blocks = list(read_decode_shards({"item": np.array(shards, dtype=object)}, 32, 64))
    sizes = [len(b["kind"]) for b in blocks]
    samples = {s: list(read_samples([s])) for s in shards}
    assert sum(sizes) == sum(len(v) for v in samples.values()) + len(shards)  # + an end row each
    assert set(sizes[:-1]) == {64} and 0 < sizes[-1] <= 64  # full batches across shard ends
    rows = {c: np.concatenate([b[c] for b in blocks]) for c in blocks[0]}
    position = np.array([shards.index(s) for s in rows["shard"]])
    assert (np.diff(position) >= 0).all()  # shard after shard, as given
    for shard in shards:
        mine = rows["shard"] == shard
        assert rows["kind"][mine].tolist() == [KIND_OK] * len(samples[shard]) + [KIND_END]
        assert rows["n"][mine][-1] == len(samples[shard])
        assert rows["key"][mine][:-1].tolist() == [s.key for s in samples[shard]]
        assert rows["index"][mine][:-1].tolist() == list(range(len(samples[shard])))
    first = samples[shards[0]][0]  # uint8 here, normalised by the teacher: the eval transform
    assert rows["image"].dtype == np.uint8
    np.testing.assert_array_equal(normalize()(torch.from_numpy(rows["image"][:1]))[0],
                                  eval_transform(32)(decode_image(first.image)))


def test_read_tasks_are_few_and_bounded() -> None:
    assert read_tasks(11, 1) == 4  # several per reader CPU, so the load balances
    assert read_tasks(3, 8) == 3  # never more tasks than shards
    assert read_tasks(431, 1) == 7  # at most 64 shards each
    assert read_tasks(10_000, 14) == 157


def test_pseudo_file_names_disambiguate_equal_stems() -> None:
    names = pseudo_file_names(["/a/x-000.tar", "/b/x-000.tar", "/b/y.tar"])
    assert names["/b/y.tar"] == "y.parquet"
    assert names["/a/x-000.tar"] != names["/b/x-000.tar"]
    assert all(n.startswith("x-000-") for s, n in names.items() if "x-000" in s)


def test_assembler_writes_a_shard_only_when_complete_in_tar_order(tmp_path: Path) -> None:
    done = []
    asm = ShardAssembler(tmp_path, {"/d/a.tar": "a.parquet", "/d/b.tar": "b.parquet"},
                         {"format": 1, "teacher_sha256": "x", "k": 3},
                         lambda s, rows, bad: done.append((s, rows, bad)))
    kinds = np.array([KIND_OK] * 5 + [KIND_BAD])
    # Rows arrive out of order and the end row before the last rows, as Ray Data may deliver.
    asm.add(fake_label_batch("/d/a.tar", np.array([3, 4, 5]), kinds[3:]))
    asm.add(fake_label_batch("/d/a.tar", np.array([0]), np.array([KIND_END]), n=6))
    assert not (tmp_path / "a.parquet").exists()
    asm.add(fake_label_batch("/d/b.tar", np.array([0]), np.array([KIND_END]), n=0))
    asm.add(fake_label_batch("/d/a.tar", np.array([2, 0, 1]), kinds[[2, 0, 1]]))
    assert done == [("/d/b.tar", 0, 0), ("/d/a.tar", 5, 1)] and not asm.in_flight
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.schema.remove_metadata() == PSEUDO_SCHEMA
    assert table["key"].to_pylist() == [f"sak{i:04d}" for i in range(5)]
    assert pq.read_table(tmp_path / "b.parquet").num_rows == 0
    assert not list(tmp_path.glob(".*tmp"))


def _synthetic_files(out: Path, shards: int = 4, rows: int = 300) -> None:
    rng = np.random.default_rng(1)
    names = {f"/d/s{i}.tar": f"s{i}.parquet" for i in range(shards)}
    asm = ShardAssembler(out, names, {"format": 1, "teacher_sha256": "x", "k": 3},
                         lambda *a: None)
    for i, shard in enumerate(names):
        # Skewed classes so that balancing both trims and duplicates.
        batch = fake_label_batch(shard, np.arange(rows), np.zeros(rows, np.int8), seed=i)
        batch["label"] = rng.choice(3, size=rows, p=[0.6, 0.3, 0.1]).astype(np.int32)
        asm.add(batch)
        asm.add(fake_label_batch(shard, np.array([0]), np.array([KIND_END]), n=rows))


def test_select_writes_copies_consistent_with_plan_and_counts(tmp_path: Path) -> None:
    _synthetic_files(tmp_path)
    cfg = PseudoLabelConfig(threshold=0.4, seed=3)
    result = select_pseudo_labels(tmp_path, 3, cfg, classes=["a", "b", "c"],
                                  progress=lambda _: None)
    tables = read_all(tmp_path)
    df = pd.concat(tables.values(), ignore_index=True)
    plan = plan_selection(class_stats(df, 3, 0.4), k=None, seed=3)
    np.testing.assert_array_equal(df["copies"].to_numpy(), apply_selection(df, plan))
    assert result["k"] == plan.k and result["rows"] == len(df) == 1200
    for c, name in enumerate(["a", "b", "c"]):
        rows = df[df["label"] == c]
        assert result["per_class"][name] == {"kept": int((rows["copies"] > 0).sum()),
                                             "copies": int(rows["copies"].sum())}
        above = int((rows["confidence"] >= 0.4).sum())
        kept = result["per_class"][name]["kept"]
        assert kept <= above and (rows["copies"][rows["confidence"] < 0.4] == 0).all()
        if above > plan.k:  # trimmed to about K, duplicated classes about K copies
            assert abs(kept - plan.k) <= 3 * np.sqrt(plan.k)
        else:
            assert kept == above and abs(result["per_class"][name]["copies"] - plan.k) <= \
                3 * np.sqrt(plan.k) + 1
    assert result["kept"] == sum(v["kept"] for v in result["per_class"].values())
    assert {f["name"]: f["sha256"] for f in result["files"]} == {
        p.name: mf.sha256_file(p) for p in tmp_path.glob("*.parquet")}
    again = select_pseudo_labels(tmp_path, 3, cfg, classes=["a", "b", "c"],
                                 progress=lambda _: None)
    assert again == result  # idempotent: same plan, files untouched


def test_actor_requests_that_would_starve_or_never_schedule_are_refused() -> None:
    from pipeline.pseudo_label import _check_resources

    assert _check_resources(PseudoLabelConfig(), {"CPU": 2.0}) == 0.0
    assert _check_resources(PseudoLabelConfig(num_actors=2), {"CPU": 16.0, "GPU": 2.0}) == 1.0
    with pytest.raises(PseudoLabelError, match="to read and decode shards"):
        _check_resources(PseudoLabelConfig(num_actors=2), {"CPU": 2.0})
    with pytest.raises(PseudoLabelError, match="GPUs"):
        _check_resources(PseudoLabelConfig(gpus_per_actor=1), {"CPU": 8.0})


def test_missing_or_unfinished_teacher_round_says_what_to_run(tmp_path: Path,
                                                              digits_dir: Path) -> None:
    cfg = PseudoLabelConfig()
    with pytest.raises(PseudoLabelError, match=r"python jobs/teacher.py --run r1 --data"):
        run_pseudo_label_stages(tmp_path, "r1", 1, cfg, {})
    with pytest.raises(PseudoLabelError, match=r"python jobs/student.py --run r1 --round 1`"):
        run_pseudo_label_stages(tmp_path, "r1", 2, cfg, {})
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    make_round0(tmp_path, "r2", digits_dir, model, sha="0" * 64, status="running")
    with pytest.raises(PseudoLabelError, match=r"round 0 of run 'r2' is running, not complete"):
        run_pseudo_label_stages(tmp_path, "r2", 1, cfg, {})


def test_teacher_with_wrong_hash_is_refused(tmp_path: Path, digits_dir: Path,
                                            teacher_model: Path) -> None:
    make_round0(tmp_path, "r", digits_dir, teacher_model, sha="f" * 64)
    with pytest.raises(CheckpointError, match=r"sha256 .* but its manifest records ffffffffffff"):
        run_pseudo_label_stages(tmp_path, "r", 1, PseudoLabelConfig(), new_round1(tmp_path, "r"))
    with pytest.raises(CheckpointError, match="sha256"):
        label_shards(teacher_model, "f" * 64, [], tmp_path / "out", PseudoLabelConfig())


def test_job_user_errors_are_one_line_and_exit_2(tmp_path: Path, digits_dir: Path) -> None:
    missing = run_job(["--run", "nope", "--round", "1", "--root", str(tmp_path)])
    _, err = missing.communicate(timeout=120)
    assert missing.returncode == 2, err
    assert err.strip().count("\n") == 0 and "python jobs/teacher.py --run nope" in err
    make_round0(tmp_path, "r", digits_dir, REPO / "pyproject.toml", sha="e" * 64)
    changed = run_job(["--run", "r", "--round", "1", "--root", str(tmp_path)])
    _, err = changed.communicate(timeout=120)
    assert changed.returncode == 2 and "sha256 mismatch" in err and "Traceback" not in err


# ============================================================================ with Ray


@pytest.fixture(scope="module")
def ray_address() -> str:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_round_labels_every_image_then_selects(ray_address: str, tmp_path: Path,
                                               digits_dir: Path, teacher_model: Path) -> None:
    make_round0(tmp_path, "r", digits_dir, teacher_model)
    m = run_pseudo_label_stages(tmp_path, "r", 1, PseudoLabelConfig(), new_round1(tmp_path, "r"),
                                progress=lambda _: None)
    unlabeled = load_dataset(digits_dir).split("unlabeled")
    out = mf.artifact_dir(tmp_path, "r", 1) / "pseudo"
    tables = read_all(out)
    assert sorted(tables) == sorted(Path(s).stem + ".parquet" for s in unlabeled.shards)
    for name in tables:
        assert pq.read_schema(out / name).remove_metadata() == PSEUDO_SCHEMA
    for shard in unlabeled.shards:  # matched by key, in the shard's own order
        df = tables[Path(shard).stem + ".parquet"]
        assert df["key"].tolist() == [s.key for s in read_samples([shard])]
        assert (df["shard"] == shard).all()
    df = pd.concat(tables.values(), ignore_index=True)
    assert len(df) == unlabeled.count and m["pseudo_labels"]["rows"] == unlabeled.count
    probs = np.stack(df["topk_prob"].to_numpy()).astype(np.float64)  # k = 10 = all classes
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-2)
    assert (df["label"] == np.stack(df["topk_index"].to_numpy())[:, 0]).all()
    assert df["label"].nunique() > 3  # the test teacher is not constant
    saved = mf.load_manifest(tmp_path, "r", 1)
    assert saved["stages"]["pseudo_label"]["status"] == "complete"
    assert saved["stages"]["pseudo_label"]["bad_samples"] == {"count": 0, "examples": []}
    pl = saved["pseudo_labels"]
    assert pl["uri"] == "artifacts/r/round-1/pseudo" and pl["threshold"] == 0.3
    for c, name in enumerate(CLASSES):
        rows = df[df["label"] == c]
        assert pl["per_class"][name] == {"kept": int((rows["copies"] > 0).sum()),
                                         "copies": int(rows["copies"].sum())}
    assert pl["selected_with_copies"] == int(df["copies"].sum()) > 0
    again = run_pseudo_label_stages(tmp_path, "r", 1, PseudoLabelConfig(), saved,
                                    progress=lambda _: None)
    assert again["stages"] == saved["stages"]  # complete stages are skipped
    # a different threshold is not silently ignored: selection (cheap) runs again, labels stay
    stricter = run_pseudo_label_stages(tmp_path, "r", 1, PseudoLabelConfig(threshold=0.9),
                                       again, progress=lambda _: None)
    assert stricter["pseudo_labels"]["threshold"] == 0.9
    assert stricter["stages"]["pseudo_label"] == saved["stages"]["pseudo_label"]
    assert stricter["events"][-1]["event"] == "reselect"
    kept_09 = int((pd.concat(read_all(out).values())["confidence"] >= 0.9).sum())
    assert stricter["pseudo_labels"]["kept"] <= kept_09


@pytest.mark.slow
def test_readers_hand_the_teacher_full_batches_from_a_stage_of_their_own(
        ray_address: str, digits_dir: Path, teacher_model: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    shards = load_dataset(digits_dir).split("unlabeled").shards
    cfg = PseudoLabelConfig(batch_size=64)
    settings = _data_settings(32, cfg)
    processes = int(ray.cluster_resources()["CPU"])  # one actor x 1 CPU, the rest read
    assert settings["execution_options"].resource_limits.object_store_memory == \
        8 * processes * 64 * 3 * 32 * 32  # read-ahead bounded (uint8), whatever the corpus
    with _data_context(**settings):
        ds = decoded_dataset(shards, 32, cfg, reader_cpus=1)
        sizes = [len(b["kind"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
        capsys.readouterr()
        inference_dataset(str(teacher_model), mf.sha256_file(teacher_model), shards, 32,
                          cfg).explain()
    assert sum(sizes) == load_dataset(digits_dir).split("unlabeled").count + len(shards)
    assert max(sizes) == 64 and sum(n != 64 for n in sizes) <= read_tasks(len(shards), 1)
    plan = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[MapBatches(read_decode_shards)->StreamingRepartition" in plan
    assert "ActorPoolMapOperator[MapBatches(TeacherPredictor)]" in plan  # not fused with them


@pytest.fixture(scope="module")
def damaged_dir(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> Path:
    """A copy of digits where one image does not decode and one shard is cut in half."""
    out = tmp_path_factory.mktemp("damaged")
    shutil.copytree(digits_dir, out, dirs_exist_ok=True)
    shards = load_dataset(out).split("unlabeled").shards
    samples = list(read_samples([shards[0]]))
    Path(shards[0]).unlink()
    with ShardWriter(Path(shards[0]).parent, prefix="tmp") as w:
        for s in samples:
            w.write(s.key, b"garbage" if s.key == samples[7].key else s.image)
    os.replace(w.paths[0], shards[0])
    data = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(data[: len(data) // 2 + 700])
    return out


@pytest.mark.slow
def test_corrupt_image_and_truncated_shard_are_skipped_and_counted(
        ray_address: str, tmp_path: Path, damaged_dir: Path, teacher_model: Path,
        digits_dir: Path) -> None:
    shards = load_dataset(damaged_dir).split("unlabeled").shards
    result = label_shards(teacher_model, mf.sha256_file(teacher_model), shards, tmp_path,
                          PseudoLabelConfig(batch_size=64), progress=lambda _: None)
    bad = result["bad_samples"]
    assert bad["count"] == 2
    reasons = {Path(b["shard"]).name: b for b in bad["examples"]}
    corrupt = reasons[Path(shards[0]).name]
    assert corrupt["key"] == list(read_samples([shards[0]]))[7].key
    assert "cannot decode" in corrupt["reason"]
    assert "damaged shard" in reasons[Path(shards[1]).name]["reason"]
    cut = pq.read_table(tmp_path / (Path(shards[1]).stem + ".parquet")).num_rows
    original = load_dataset(digits_dir).split("unlabeled")
    full_cut = sum(1 for _ in read_samples([original.shards[1]]))
    assert 0 < cut < full_cut
    # Every image is accounted for: labeled, the one corrupt image, or lost with the cut tail.
    assert result["rows"] == original.count - 1 - (full_cut - cut)
    assert sum(f["rows"] for f in result["files"]) == result["rows"]


@pytest.fixture(scope="module")
def small_shards_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits in shards of 10, so that a kill lands between the first and the last file."""
    out = tmp_path_factory.mktemp("small")
    prepare_digits(out, shard_size=10)
    return out


@pytest.mark.slow
def test_two_actors_give_the_same_files_as_one(ray_address: str, tmp_path: Path,
                                               small_shards_dir: Path,
                                               teacher_model: Path) -> None:
    # Two actors take batches in whatever order they finish, interleaving rows of many shards:
    # the files must still be whole, in tar order, and bit for bit those of a single actor.
    shards = load_dataset(small_shards_dir).split("unlabeled").shards
    sha = mf.sha256_file(teacher_model)
    results = {}
    for actors in (1, 2):
        cfg = PseudoLabelConfig(batch_size=32, num_actors=actors, cpus_per_actor=0.5)
        results[actors] = label_shards(teacher_model, sha, shards, tmp_path / str(actors), cfg,
                                       progress=lambda _: None)
    one, two = read_all(tmp_path / "1"), read_all(tmp_path / "2")
    assert len(one) == len(shards) and sorted(one) == sorted(two)
    for name, df in one.items():
        pd.testing.assert_frame_equal(two[name], df)
    assert results[1]["files"] == results[2]["files"]  # same names, rows and sha256


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted_run(ray_address: str, tmp_path: Path,
                                                    small_shards_dir: Path,
                                                    teacher_model: Path) -> None:
    for run in ("killed", "whole"):
        make_round0(tmp_path, run, small_shards_dir, teacher_model)
    env = {"RAY_ADDRESS": ray_address}
    args = ["--round", "1", "--root", str(tmp_path), "--batch-size", "16"]
    out = mf.artifact_dir(tmp_path, "killed", 1) / "pseudo"
    total = len(load_dataset(small_shards_dir).split("unlabeled").shards)
    job = run_job(["--run", "killed", *args], env=env)
    deadline = time.monotonic() + 150
    while job.poll() is None and time.monotonic() < deadline:
        if len(list(out.glob("*.parquet"))) >= 1:
            job.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    job.wait(timeout=30)
    done_at_kill = len(list(out.glob("*.parquet")))
    assert job.returncode == -signal.SIGKILL, job.stderr.read()
    assert 1 <= done_at_kill < total
    for path in out.glob("*.parquet"):  # a file with its final name is always whole
        assert pq.read_table(path).num_rows > 0

    rerun = run_job(["--run", "killed", *args], env=env)
    stdout, stderr = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, stderr
    assert f"{done_at_kill} of {total} shards already done" in stdout

    whole = run_job(["--run", "whole", *args], env=env)
    _, stderr = whole.communicate(timeout=240)
    assert whole.returncode == 0, stderr
    killed = read_all(out)
    uninterrupted = read_all(mf.artifact_dir(tmp_path, "whole", 1) / "pseudo")
    assert sorted(killed) == sorted(uninterrupted) and len(killed) == total
    for name, df in uninterrupted.items():
        pd.testing.assert_frame_equal(killed[name], df)
    m = mf.load_manifest(tmp_path, "killed", 1)
    assert m["pseudo_labels"]["files"] == mf.load_manifest(tmp_path, "whole", 1)[
        "pseudo_labels"]["files"]  # same names, rows and sha256
    assert m["teacher"]["checkpoint_sha256"] == mf.sha256_file(teacher_model)
    assert [e["stage"] for e in m["events"] if e["event"] == "resume"] == ["pseudo_label"]
