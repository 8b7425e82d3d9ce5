"""The student round: model growth, noise defaults, the pseudo-labeled stream and its mixing,
resuming at each phase, the refusal without round N-1, and a tiny end-to-end teacher -> students
-> report run (slow)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import PRESETS, StudentConfig, parse_config
from pipeline.data import PseudoStream
from pipeline.layout import RunLayout
from pipeline.manifest import ManifestError, load_parent
from pipeline.rounds import default_magnitude, next_model
from pipeline.shards import encode_png, write_shards
from pipeline.storage import sha256_file
from pipeline.train import LocalReporter, WorkerContext, read_state, train_worker
from tests.builders import job_env
from tests.test_train import tiny_job

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def load_manifest(root: Path, run: str, round_: int) -> dict:
    """The manifest as a user reads it: the JSON file."""
    return json.loads(RunLayout(root, run).manifest_path(round_).read_text())


def test_students_grow_through_the_family() -> None:
    assert next_model("efficientnet_t0") == "efficientnet_t1"
    assert next_model("efficientnet_b3") == "efficientnet_b4"
    assert next_model("efficientnet_t3") == "efficientnet_t3"  # the largest stays


def test_randaugment_magnitude_by_student_size() -> None:
    assert default_magnitude("efficientnet_b0") == 0  # the paper: none for B0-B1
    assert default_magnitude("efficientnet_b4") == 15
    assert default_magnitude("efficientnet_b7") == 27
    assert default_magnitude("efficientnet_l2") == 27
    assert default_magnitude("efficientnet_t2") == 6


def test_student_defaults_follow_the_paper() -> None:
    cfg = parse_config(StudentConfig, "student", ["--run", "r"])
    # dropout and unlabel_ratio: None = by student size (tests/test_rounds.py checks the table)
    assert (cfg.dropout, cfg.drop_path, cfg.threshold, cfg.randaugment_n) == (None, 0.2, 0.3, 2)
    assert cfg.soft_labels and cfg.temperature == 1.0 and cfg.unlabel_ratio is None
    assert cfg.epochs is None and cfg.decay_epochs is None  # by student size, likewise
    assert cfg.randaugment_pixels == "official" and cfg.norm == "tf" and cfg.optimizer == "rmsprop"
    demo = parse_config(StudentConfig, "student", ["--run", "r", "--preset", "demo",
                                                   "--no-randaugment", "--dropout", "0"])
    assert demo.model == "next" and not demo.randaugment and demo.dropout == 0.0


def _pseudo_fixture(tmp: Path) -> tuple[list[str], Path]:
    """One shard of 4 images and its pseudo-label file with copies 0, 1, 2, 3."""
    img = np.zeros((8, 8, 3), np.uint8)
    ((shard, _),) = write_shards([(f"k{i}", encode_png(img + i), None) for i in range(4)],
                                 tmp / "unl", prefix="unl")
    out = tmp / "pseudo"
    out.mkdir()
    pq.write_table(pa.table({
        "key": ["k3", "k1", "k0", "k2"],  # not in shard order: matched by key
        "copies": pa.array([3, 1, 0, 2], pa.int32()),
        "topk_index": pa.array([[3, 0], [1, 2], [0, 1], [2, 3]], pa.list_(pa.int32())),
        "topk_prob": pa.array([[0.6, 0.2], [0.9, 0.1], [0.5, 0.5], [0.7, 0.3]],
                              pa.list_(pa.float16())),
    }), out / "unl-000000.parquet")
    return [str(shard)], out


def test_pseudo_stream_repeats_by_copies_and_builds_targets(tmp_path: Path) -> None:
    shards, out = _pseudo_fixture(tmp_path)
    mean = lambda img: float(img.float().mean())  # noqa: E731 - image i has value i
    ds = PseudoStream(shards, str(out), lambda x: x, num_classes=4, temperature=1.0,
                      shuffle_buffer=0)
    it = iter(ds)
    one_pass = [next(it) for _ in range(6)]  # 3 + 1 + 0 + 2 copies
    seen = sorted(round(mean(img)) for img, _ in one_pass)
    assert seen == [1, 2, 2, 3, 3, 3]
    for img, target in one_pass:
        assert target.shape == (4,) and float(target.sum()) == pytest.approx(1.0, abs=1e-3)
        if round(mean(img)) == 3:  # top-2 of k3 renormalised: 0.6/0.8, 0.2/0.8
            assert target.tolist() == pytest.approx([0.25, 0, 0, 0.75], abs=1e-3)
    hard = PseudoStream(shards, str(out), lambda x: x, num_classes=4, temperature=-1.0,
                        shuffle_buffer=0)
    img, target = next(iter(hard))  # shard order: k0 has no copies, so k1 comes first
    assert round(mean(img)) == 1 and target.tolist() == [0, 1, 0, 0]


def test_step_mixes_batches_with_the_unlabel_ratio(digits_info, tmp_path: Path) -> None:
    """A student step sees B labeled + ratio x B pseudo images, and its loss is labeled CE +
    weight x pseudo CE (docs/recipe.md)."""
    from pipeline.losses import soft_cross_entropy
    from pipeline.train import build_learner, pseudo_batch_size, pseudo_weight, train_step

    job = tiny_job(digits_info, tmp_path, batch_size=4)
    cfg = StudentConfig(**{**dataclasses.asdict(job.config), "unlabel_ratio": 3.0,
                           "pseudo_loss_weight": None, "soft_labels": True, "temperature": 1.0,
                           "label_smoothing": 0.0})
    job.config, job.role = cfg, "student"
    assert pseudo_batch_size(cfg) == 12 and pseudo_weight(cfg) == 3.0
    learner = build_learner(job, WorkerContext())
    torch.manual_seed(0)
    x_l, y_l = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    x_u = torch.randn(12, 3, 32, 32)
    t_u = torch.softmax(torch.randn(12, 10), dim=1)
    model = learner.model.eval()  # no dropout: the same forward twice
    with torch.no_grad():
        logits = model(torch.cat([x_l, x_u]))
        expected = torch.nn.functional.cross_entropy(logits[:4], y_l) + \
            3.0 * soft_cross_entropy(logits[4:], t_u)
    learner.optimizer.param_groups[0]["lr"] = 0.0  # measure, do not move
    out = train_step(model, learner.optimizer, (x_l, y_l), (x_u, t_u), cfg=cfg,
                     device=torch.device("cpu"))
    assert out["images"] == 16 and out["n"] == 4
    assert out["loss"] == pytest.approx(float(expected), rel=1e-4)


def test_teacher_config_has_no_pseudo_batches(digits_info, tmp_path: Path) -> None:
    from pipeline.train import pseudo_batch_size

    job = tiny_job(digits_info, tmp_path)
    with pytest.raises(TypeError, match="needs a StudentConfig"):
        pseudo_batch_size(job.config)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["finetune", "evaluate"])
def test_resume_at_each_phase_runs_only_what_is_left(digits_info, tmp_path: Path,
                                                     phase: str) -> None:
    job = tiny_job(digits_info, tmp_path, epochs=1, finetune_epochs=0.5, eval_every=5)
    train_worker(job, WorkerContext(), LocalReporter(tmp_path / "ck"))
    saved = torch.load(tmp_path / "ck" / "state.pt", weights_only=True)
    saved["state"]["phase"] = phase
    torch.save(saved, tmp_path / "ck" / "state.pt")
    rep = LocalReporter(tmp_path / "ck")
    train_worker(job, WorkerContext(), rep)
    expected = ["finetune", "evaluate"] if phase == "finetune" else ["evaluate"]
    assert [r["phase"] for r in rep.reports] == expected
    assert read_state(tmp_path / "ck")["phase"] == "done"


def test_student_refused_without_previous_round(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"needs round 0 .* run `python jobs/teacher.py"):
        load_parent(RunLayout(tmp_path, "r"), 1)
    env = job_env(None)
    p = subprocess.run([PY, str(ROOT / "jobs" / "student.py"), "--run", "r", "--round", "2",
                        "--root", str(tmp_path), "--preset", "demo"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 2
    assert "student: error: round 2 needs round 1 of run 'r'" in p.stderr
    assert "python jobs/student.py --run r --round 1" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "manifests").exists()


# ----------------------------------------------------------------------------- end to end


QUICK = ["--preset", "demo", "--loader-workers", "0", "--eval-every", "10"]


def _job(script: str, *args: str, ray_address: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, str(ROOT / "jobs" / script), *args], capture_output=True,
                          text=True, timeout=900, env=job_env(ray_address))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> Path:
    """prepare -> teacher (4 epochs) -> pseudo_label job -> student 1 -> student 2 (3 epochs),
    each job joining the module's Ray."""
    from pipeline.dataset import prepare_digits

    root = tmp_path_factory.mktemp("e2e")
    prepare_digits(root / "data", shard_size=150)
    p = _job("teacher.py", "--run", "e2e", "--data", str(root / "data"), "--root", str(root),
             *QUICK, "--epochs", "4", ray_address=ray_address)
    assert p.returncode == 0, p.stderr[-3000:]
    # the pseudo-label stages alone first: the student must pick up from them
    # a 4-epoch teacher is unsure of everything: keep every pseudo-label (threshold 0)
    p = _job("pseudo_label.py", "--run", "e2e", "--round", "1", "--root", str(root),
             "--threshold", "0", ray_address=ray_address)
    assert p.returncode == 0, p.stderr[-3000:]
    # The demo preset counts a student epoch over the pseudo-labels (1,077 here: 12 steps of
    # 32 + 96 images); an epoch of the labeled split, the official definition, is 6 steps.
    for n in (1, 2):
        p = _job("student.py", "--run", "e2e", "--round", str(n), "--root", str(root), *QUICK,
                 "--epochs", "3", "--finetune-epochs", "1", "--threshold", "0",
                 "--student-epoch", "labeled", ray_address=ray_address)
        assert p.returncode == 0, p.stderr[-3000:]
    return root


@pytest.mark.slow
def test_end_to_end_student_manifests(tiny_run: Path) -> None:
    root = tiny_run
    t = load_manifest(root, "e2e", 0)
    s1, s2 = load_manifest(root, "e2e", 1), load_manifest(root, "e2e", 2)
    assert [m["model"]["name"] for m in (t, s1, s2)] == [
        "efficientnet_t0", "efficientnet_t1", "efficientnet_t2"]
    assert s1["role"] == "student" and s1["status"] == "complete"
    assert s1["teacher"]["round"] == 0
    assert s1["teacher"]["checkpoint_sha256"] == t["checkpoint"]["sha256"]
    assert s2["teacher"]["checkpoint_sha256"] == s1["checkpoint"]["sha256"]
    assert s1["metrics"]["teacher_top1"] == t["metrics"]["top1"]
    for m in (s1, s2):
        assert sha256_file(root / m["checkpoint"]["uri"]) == m["checkpoint"]["sha256"]
        assert list(m["stages"]) == ["preflight", "pseudo_label", "select", "train", "finetune",
                                     "evaluate"]
        assert m["stages"]["preflight"]["labeled"]["bad"] == 0
        assert m["stages"]["evaluate"]["damaged_skipped"] == 0
        assert m["stages"]["train"]["damage"] == {"samples": 180, "bad": 0, "examples": []}
        assert all(st["status"] == "complete" for st in m["stages"].values())
        ft = m["stages"]["finetune"]
        assert 0 <= ft["top1_before"] <= 1 and 0 <= ft["top1_after"] <= 1
        assert m["pseudo_labels"]["rows"] == 1077
        assert m["pseudo_labels"]["selected_with_copies"] > 0
        assert len(m["history"]) == 3 and "pseudo_loss" in m["history"][0]
        assert m["config"]["randaugment_m"] == 5 and m["config"]["dropout"] == 0.3
    from tests.test_events import read_scalars

    tags = read_scalars(root / "artifacts" / "e2e" / "round-1" / "tensorboard")
    assert tags["pseudo/rows"] == [(0, 1077.0)] and "pseudo/confidence_median" in tags
    assert {"train/loss", "train/pseudo_loss", "fixres/top1_after", "final/top1"} <= set(tags)
    # round 1's pseudo-label stages were done by jobs/pseudo_label.py and not redone
    assert [e["event"] for e in s1["events"]][-1] == "restart"
    assert "resumes_training" in s1["events"][-1]
    # ... and the record names the cluster that trained it, not the labeling job's
    assert s1["cluster"]["num_workers"] == 1 and s1["cluster"]["nodes"] >= 1
    # Ray Train keeps the last 2 checkpoints (docs/design.md) of the 4 reported (3 epochs and
    # the fine-tune)
    for n in (1, 2):
        kept = list((root / "artifacts" / "e2e" / f"round-{n}" / "train").rglob("checkpoint_*"))
        assert len([k for k in kept if k.is_dir()]) == 2, kept


@pytest.mark.slow
def test_student_job_deals_pseudo_shards_from_the_manifest(tiny_run: Path, monkeypatch,
                                                          tmp_path: Path) -> None:
    """Select records each file's kept rows and copies; the student's start deals the shards by
    those counts without reading a file (thousands of reads on object storage)."""
    import pipeline.pseudo_files
    from pipeline.dataset import load_dataset
    from pipeline.manifest import load_round
    from pipeline.rounds import Plan
    from pipeline.train_stage import make_job

    layout = RunLayout(tiny_run, "e2e")
    rec = load_round(layout, 1)
    out = layout.pseudo_dir(1)
    for f in rec.pseudo_labels.files:
        copies = pq.read_table(out / f.name, columns=["copies"]).column("copies").to_numpy()
        assert (f.kept, f.copies) == (int((copies > 0).sum()), int(copies.sum()))
    info = load_dataset(tiny_run / "data")

    def no_reads(*_: object, **__: object) -> None:
        raise AssertionError("a pseudo-label file was read")

    monkeypatch.setattr(pipeline.pseudo_files, "read_table", no_reads)
    plan = Plan(cfg=StudentConfig(run="e2e", root=str(tiny_run), round=1), layout=layout,
                round_=1, info=info, parent=None, existing=rec)
    job = make_job(plan, rec)
    by_name = {f.name: f.copies for f in rec.pseudo_labels.files}
    names = pipeline.pseudo_files.pseudo_file_names(info.split("unlabeled").shards)
    assert job.pseudo["shards"] == [s for s in info.split("unlabeled").shards if by_name[names[s]]]
    assert job.pseudo["weights"] == [by_name[names[s]] for s in job.pseudo["shards"]]
    assert sum(job.pseudo["weights"]) == job.pseudo["count"] == rec.pseudo_labels.selected_with_copies
    # and the labeled shards by dataset.json's samples per shard
    counts = info.split("labeled").shard_counts
    assert counts is not None and job.labeled["weights"] == counts
    # RandAugment reaches the workers unless switched off or at magnitude 0 (B0/B1 students)
    on = dataclasses.replace(plan.cfg, randaugment_n=2, randaugment_m=9)
    assert make_job(dataclasses.replace(plan, cfg=on), rec).randaugment == {
        "num_ops": 2, "magnitude": 9, "pixels": on.randaugment_pixels}
    for off in (dataclasses.replace(on, randaugment=False),
                dataclasses.replace(on, randaugment_m=0)):
        assert make_job(dataclasses.replace(plan, cfg=off), rec).randaugment is None
    # A selection that kept nothing stops the round before training is recorded as started:
    # a rerun with a lower --threshold used to be refused as "started training", and only
    # --force (relabeling everything) got out.
    from pipeline.rounds import check_selection_in_use
    from pipeline.runner import RunError
    from pipeline.train_stage import train_stage

    empty = load_round(layout, 1)
    empty.status, empty.stages = "running", {k: v for k, v in empty.stages.items()
                                             if k in ("pseudo_label", "select")}
    empty.pseudo_labels.selected_with_copies = 0
    with pytest.raises(RunError, match="^selection kept no pseudo-labels; lower --threshold"):
        train_stage(dataclasses.replace(plan, existing=empty), empty, use_gpu=False)
    assert empty.stage("train") is None
    check_selection_in_use(empty, dataclasses.replace(plan.cfg, threshold=0.1).label_settings())
    # Training that ends in a phase other than done (nothing to fix in the input): exit 1, as a
    # lost worker; the final checkpoint is never made the round's model.pt. On a copy of the
    # run: train_stage records the round, and the module's other tests use it complete.
    import shutil

    import pipeline.train_stage as train_stage_module
    from pipeline.runner import TrainingCrash

    copy = tmp_path / "run"
    for folder in ("manifests", "artifacts"):
        shutil.copytree(tiny_run / folder, copy / folder)
    mine = RunLayout(copy, "e2e")
    halfway = tmp_path / "halfway"
    shutil.copytree(next(mine.artifact_dir(1).glob("train/checkpoint_*/state.pt")).parent,
                    halfway)
    saved = torch.load(halfway / "state.pt", weights_only=True)
    saved["state"]["phase"] = "train"
    torch.save(saved, halfway / "state.pt")
    monkeypatch.setattr(train_stage_module, "fit", lambda job, art, use_gpu: halfway)
    again = load_round(mine, 1)
    again.status, again.stages = "running", {k: v for k, v in again.stages.items()
                                             if k in ("pseudo_label", "select")}
    model = mine.model_path(1).read_bytes()
    with pytest.raises(TrainingCrash, match=r"^training ended in phase 'train', not done"):
        train_stage(dataclasses.replace(plan, layout=mine, existing=again), again,
                    use_gpu=False)
    assert mine.model_path(1).read_bytes() == model
    assert load_round(layout, 1).status == "complete"  # the module's run is untouched


@pytest.mark.slow
def test_demo_skips_complete_rounds_and_prints_both_tables(
        tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """jobs/demo.py (make demo) on a run whose rounds are complete: it reuses the dataset and
    the rounds, reports, and prints the summary and FixRes tables from the manifests."""
    import shutil

    if str(ROOT / "jobs") not in sys.path:  # demo.py imports its neighbours by name
        sys.path.insert(0, str(ROOT / "jobs"))
    import demo

    root = tmp_path / "r"
    for folder in ("manifests", "artifacts"):
        shutil.copytree(tiny_run / folder, root / folder)
    (root / "data").mkdir()
    (root / "data" / "digits-5pct").symlink_to(tiny_run / "data")
    assert demo.main(["--root", str(root), "--run", "e2e", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert f"=== prepare: {root / 'data' / 'digits-5pct'} exists, reusing it" in out
    for n, title in enumerate(["teacher", "student round 1", "student round 2"]):
        assert f"=== {title}: round {n} is complete, skipping" in out
    summary, fixres = out.split("Noisy Student on digits")[1].split("FixRes fine-tune")
    lines = fixres.splitlines()
    for n in range(3):
        m = load_manifest(root, "e2e", n)
        row = next(line.split() for line in summary.splitlines()
                   if line.split()[:2] == [str(n), m["model"]["name"]])
        assert f"{m['metrics']['top1']:.4f}" in row
        ft = m["stages"].get("finetune")
        got = [line.split() for line in lines if line.split()[:2] == [str(n), m["model"]["name"]]]
        if ft is None:
            assert not got
            continue
        assert got[0][3:5] == [f"{100 * ft['top1_before']:.2f}", f"{100 * ft['top1_after']:.2f}"]
    assert (root / "reports" / "e2e" / "report.md").is_file()


@pytest.mark.slow
def test_complete_student_round_needs_force(tiny_run: Path, ray_address: str) -> None:
    layout = RunLayout(tiny_run, "e2e")
    files = {f: f.read_bytes() for f in [layout.manifest_path(1),
                                         *layout.artifact_dir(1).rglob("*")] if f.is_file()}
    before = files[layout.manifest_path(1)]
    p = _job("student.py", "--run", "e2e", "--round", "1", "--root", str(tiny_run), *QUICK,
             ray_address=ray_address)
    assert p.returncode == 2 and "already has a complete round 1" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "pass --force" in p.stderr
    # its student trained on these pseudo-labels: the stages alone may not change them either
    p = _job("pseudo_label.py", "--run", "e2e", "--round", "1", "--root", str(tiny_run),
             "--threshold", "0.9", ray_address=ray_address)
    assert p.returncode == 2 and "is complete and its student was trained on" in p.stderr
    assert "Traceback" not in p.stderr
    assert layout.manifest_path(1).read_bytes() == before
    # nothing of the round changed: model, predictions, pseudo-label files (their copies too)
    assert {f: f.read_bytes() for f in files} == files
    assert {f for f in layout.artifact_dir(1).rglob("*") if f.is_file()} == set(files) - {
        layout.manifest_path(1)}


@pytest.mark.slow
def test_report_on_the_run(tiny_run: Path) -> None:
    from pipeline.report import load_run

    rep = load_run(tiny_run, "e2e")
    assert list(rep.rounds["round"]) == [0, 1, 2]
    assert rep.rounds.loc[rep.rounds["round"] == 1, "pseudo_labels"].item() == 1077
    per1 = rep.per_class[rep.per_class["round"] == 1]
    assert len(per1) == 10 and per1["pseudo_labeled"].sum() == 1077
    assert rep.flips is not None and len(rep.flips) >= 1
    p = _job("report.py", "--run", "e2e", "--root", str(tiny_run))
    assert p.returncode == 0, p.stderr[-2000:]
    out = tiny_run / "reports" / "e2e"
    assert (out / "report.md").stat().st_size > 0
    pngs = list(out.glob("*.png"))
    assert len(pngs) >= 4 and all(x.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for x in pngs)


def test_presets_build_valid_configs() -> None:
    from pipeline.config import TrainConfig

    for role, cls in (("teacher", TrainConfig), ("student", StudentConfig)):
        for values in PRESETS[role].values():
            cfg = cls(**values)
            assert cfg.epochs > 0 and cfg.batch_size > 0
