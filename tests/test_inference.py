"""Ray Data batch inference: the readers' blocks, the teacher actor, the plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import PseudoLabelConfig
from pipeline.dataset import load_dataset
from pipeline.images import decode_image
from pipeline.inference import (
    KIND_END,
    KIND_OK,
    InferenceError,
    TeacherPredictor,
    check_resources,
    data_context,
    data_settings,
    decode_images,
    decoded_dataset,
    inference_dataset,
    read_decode_shards,
    read_tasks,
    soft_labels,
)
from pipeline.shards import read_samples
from pipeline.storage import sha256_file
from pipeline.transforms import eval_transform, normalize


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
    pred = TeacherPredictor(str(teacher_model), sha256_file(teacher_model), topk=10,
                            batch_size=32, use_gpu=False, threads=1)
    x = np.random.default_rng(0).integers(0, 256, size=(40, 3, 32, 32), dtype=np.uint8)
    whole = pred.forward(x)
    alone = pred.forward(x[5:8])  # 3 rows, padded to the same 32-row shape
    for name in whole:
        np.testing.assert_array_equal(whole[name][5:8], alone[name])


def test_teacher_labels_with_the_folded_channels_last_network_as_the_plain_model_would(
        teacher_model: Path) -> None:
    from torch import nn

    from pipeline.checkpoint import load_model

    pred = TeacherPredictor(str(teacher_model), sha256_file(teacher_model), topk=10,
                            batch_size=32, use_gpu=False, threads=1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in pred.model.modules())
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in pred.model.parameters() if p.dim() == 4)
    plain, _ = load_model(teacher_model, sha256_file(teacher_model))
    x = np.random.default_rng(1).integers(0, 256, size=(32, 3, 32, 32), dtype=np.uint8)
    got = pred.forward(x)
    with torch.inference_mode():
        want = soft_labels(plain.eval()(pred.normalize(torch.from_numpy(x))), 10)
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_allclose(got["confidence"], want["confidence"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["entropy"], want["entropy"], rtol=1e-4, atol=1e-5)


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


def test_actor_requests_that_would_starve_or_never_schedule_are_refused() -> None:
    assert check_resources(PseudoLabelConfig(), {"CPU": 2.0}) == 0.0
    assert check_resources(PseudoLabelConfig(label_actors=2), {"CPU": 16.0, "GPU": 2.0}) == 1.0
    with pytest.raises(InferenceError, match="to read and decode shards"):
        check_resources(PseudoLabelConfig(label_actors=2), {"CPU": 2.0})
    with pytest.raises(InferenceError, match="GPUs"):
        check_resources(PseudoLabelConfig(gpus_per_actor=1), {"CPU": 8.0})


@pytest.mark.slow
def test_readers_hand_the_teacher_full_batches_from_a_stage_of_their_own(
        ray_address: str, digits_dir: Path, teacher_model: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    shards = load_dataset(digits_dir).split("unlabeled").shards
    cfg = PseudoLabelConfig(label_batch_size=64)
    settings = data_settings(32, cfg)
    processes = int(ray.cluster_resources()["CPU"])  # one actor x 1 CPU, the rest read
    assert settings["execution_options"].resource_limits.object_store_memory == \
        8 * processes * 64 * 3 * 32 * 32  # read-ahead bounded (uint8), whatever the corpus
    with data_context(**settings):
        ds = decoded_dataset(shards, 32, cfg, reader_cpus=1)
        sizes = [len(b["kind"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
        capsys.readouterr()
        inference_dataset(str(teacher_model), sha256_file(teacher_model), shards, 32,
                          cfg).explain()
    assert sum(sizes) == load_dataset(digits_dir).split("unlabeled").count + len(shards)
    assert max(sizes) == 64 and sum(n != 64 for n in sizes) <= read_tasks(len(shards), 1)
    plan = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[MapBatches(read_decode_shards)->StreamingRepartition" in plan
    assert "ActorPoolMapOperator[MapBatches(TeacherPredictor)]" in plan  # not fused with them


def test_teacher_labels_and_is_evaluated_on_the_same_pixels_of_a_large_jpeg(
        tmp_path: Path, digits_info) -> None:
    """A photo far larger than the test resolution is decoded reduced (pipeline/images.py) by
    the pseudo-label readers, the test stream, the FixRes fine-tune and the BatchNorm pass
    alike, so the teacher's test top-1 and its pseudo-labels come from the same tensors; with
    --no-jpeg-dct-scaling all of them decode in full."""
    import dataclasses
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_image

    from pipeline.batches import test_loader
    from pipeline.fixres import finetune_batches, norm_batches
    from pipeline.shards import write_shards
    from pipeline.train import WorkerContext
    from tests.test_train import tiny_job

    buf = io.BytesIO()
    Image.fromarray(load_sample_image("flower.jpg")).resize((1600, 1200)).save(buf, "JPEG")
    data = buf.getvalue()
    shards = [str(p) for p, _ in write_shards([("big", data, 1)], tmp_path / "s", prefix="p")]
    for scaling in (True, False):
        job = tiny_job(digits_info, tmp_path, jpeg_dct_scaling=scaling, eval_crop_fraction=0.875)
        job = dataclasses.replace(job, test={"shards": shards, "count": 1},
                                  labeled={"shards": shards, "count": 1}, norm_shards=None,
                                  model={**job.model, "test_resolution": 224})
        readers, _ = decode_images([data], 224, ["big"], 0.875, scaling)
        labeled = normalize()(torch.from_numpy(readers[0]))
        tested = next(iter(test_loader(job, WorkerContext())))[0][0]
        tuned = next(finetune_batches(job, WorkerContext()))[0][0]
        normed = next(norm_batches(job, WorkerContext()))[0]
        for other in (tested, tuned, normed):
            assert torch.equal(labeled, other)
        if scaling:
            reduced = labeled
    full = labeled
    assert not torch.equal(reduced, full)  # the default really decodes reduced ...
    assert (reduced - full).abs().mean() < 0.05  # ... and close: about a level of 255 / std
