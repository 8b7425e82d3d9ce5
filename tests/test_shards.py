from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.images import decode_image
from pipeline.shards import (
    BadSample,
    Damage,
    Sample,
    ShardError,
    ShardWriter,
    encode_png,
    expand_shards,
    read_samples,
    read_shard,
    to_sample,
    write_shards,
)


def wds_samples(urls: list[str]) -> list[Sample]:
    """What webdataset's own reader makes of the shards (they must read back with it too)."""
    import webdataset as wds

    return [to_sample(raw) for raw in wds.DataPipeline(wds.SimpleShardList(urls),
                                                       wds.tarfile_to_samples())]


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (8, 6, 3), dtype=np.uint8) for _ in range(n)]


def _write(tmp: Path, n: int = 7, maxcount: int = 3, labeled: bool = True) -> list[Path]:
    imgs = _images(n)
    samples = [(f"k{i:03d}", encode_png(im), i % 4 if labeled else None) for i, im in enumerate(imgs)]
    return [p for p, _ in write_shards(samples, tmp, prefix="s", maxcount=maxcount)]


def test_round_trip_own_reader(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    assert [p.name for p in paths] == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    got = list(read_samples(paths))
    assert [s.key for s in got] == [f"k{i:03d}" for i in range(7)]
    assert [s.label for s in got] == [i % 4 for i in range(7)]
    img = decode_image(got[2].image)
    assert img.shape == (3, 8, 6)
    assert np.array_equal(img.permute(1, 2, 0).numpy(), _images(7)[2])


def test_round_trip_webdataset(tmp_path: Path) -> None:
    paths = [str(p) for p in _write(tmp_path)]
    got = list(wds_samples(paths))
    assert [s.key for s in got] == [f"k{i:03d}" for i in range(7)]
    assert [s.label for s in got] == [i % 4 for i in range(7)]
    assert got[0].shard == paths[0]


@pytest.mark.slow
def test_round_trip_ray_data(tmp_path: Path) -> None:
    import ray

    paths = [str(p) for p in _write(tmp_path)]
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = ray.data.read_webdataset(paths, decoder=None).take_all()
    finally:
        if started:
            ray.shutdown()
    samples = sorted((to_sample(r) for r in rows), key=lambda s: s.key)
    assert [s.key for s in samples] == [f"k{i:03d}" for i in range(7)]
    assert [s.label for s in samples] == [i % 4 for i in range(7)]
    assert decode_image(samples[3].image).shape == (3, 8, 6)


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = _write(tmp_path / "a")
    b = _write(tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_unlabeled_has_no_label(tmp_path: Path) -> None:
    paths = _write(tmp_path, labeled=False)
    assert all(s.label is None for s in read_samples(paths))


def test_dotted_key_refused(tmp_path: Path) -> None:
    with ShardWriter(tmp_path) as w, pytest.raises(ShardError, match="no '.'"):
        w.write("img.001", b"x")


def test_duplicate_key_refused(tmp_path: Path) -> None:
    with ShardWriter(tmp_path) as w:
        w.write("a", encode_png(_images(1)[0]))
        with pytest.raises(ShardError, match="duplicate"):
            w.write("a", encode_png(_images(1)[0]))


def test_failed_write_leaves_no_shard(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, prefix="x") as w:
        w.write("a", b"123")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _tar_with(tmp: Path, members: dict[str, bytes]) -> Path:
    path = tmp / "custom.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_reader_accepts_common_suffixes(tmp_path: Path) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_images(1)[0]).save(buf, format="JPEG")
    png = encode_png(_images(1)[0])
    path = _tar_with(tmp_path, {
        "a.jpg": buf.getvalue(), "a.cls": b"3",
        "b.jpeg": buf.getvalue(), "b.json": json.dumps({"label": 5}).encode(),
        "c.png": png,
    })
    for samples in (list(read_samples([path])), list(wds_samples([str(path)]))):
        assert [(s.key, s.label, s.image_format) for s in samples] == [
            ("a", 3, "jpg"), ("b", 5, "jpeg"), ("c", None, "png")]
        assert decode_image(samples[0].image).shape == (3, 8, 6)


def test_metadata_json_without_a_label_is_an_unlabeled_sample(tmp_path: Path) -> None:
    """img2dataset writes <key>.jpg, <key>.json (url, caption, size) and <key>.txt: an unlabeled
    pool, not damage. Labels that are not class indices stay damage."""
    from PIL import Image

    png = encode_png(_images(1)[0])
    tif = io.BytesIO()
    Image.fromarray(_images(1)[0]).save(tif, format="TIFF")
    path = _tar_with(tmp_path, {
        "000.jpg": png, "000.json": json.dumps({"url": "http://x", "caption": "a"}).encode(),
        "000.txt": b"a",
        "001.tif": tif.getvalue(), "001.cls": b"2",
        "002.png": png, "002.json": json.dumps({"label": 1.9}).encode(),
        "003.png": png, "003.cls": b"-1",
        "004.png": png, "004.json": b"{not json",
        "005.png": png, "005.json": json.dumps({"label": "4"}).encode(),
    })
    got = list(read_shard(path))
    assert [(type(s).__name__, s.key) for s in got] == [
        ("Sample", "000"), ("Sample", "001"), ("BadSample", "002"), ("BadSample", "003"),
        ("BadSample", "004"), ("Sample", "005")]
    assert got[0].label is None and got[1].label == 2 and got[1].image_format == "tif"
    assert decode_image(got[1].image).shape == (3, 8, 6)
    assert got[2].reason == "\"label\" in .json is not an integer: '1.9'"
    assert got[3].reason == "label -1 is negative; class indices start at 0"
    assert got[4].reason == ".json is not valid JSON"
    assert got[5].label == 4  # a number written as text


def test_keys_longer_than_a_tar_name_are_refused_by_name(tmp_path: Path) -> None:
    with ShardWriter(tmp_path) as w, pytest.raises(ShardError, match=r"is 120 bytes long; keys "
                                                                     r"may have at most 90"):
        w.write("k" * 120, encode_png(_images(1)[0]))


def test_sample_without_image_names_shard_and_key(tmp_path: Path) -> None:
    path = _tar_with(tmp_path, {"lonely.cls": b"1"})
    with pytest.raises(ShardError, match=r"custom\.tar, key lonely: sample has no image"):
        list(read_samples([path]))


def test_bad_label_text(tmp_path: Path) -> None:
    path = _tar_with(tmp_path, {"a.png": encode_png(_images(1)[0]), "a.cls": b"cat"})
    with pytest.raises(ShardError, match="not an integer"):
        list(read_samples([path]))


def test_expand_shards(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"t-{i:03d}.tar").write_bytes(b"")
    assert expand_shards(str(tmp_path / "t-{000..001}.tar")) == [
        str(tmp_path / "t-000.tar"), str(tmp_path / "t-001.tar")]
    assert len(expand_shards(str(tmp_path / "*.tar"))) == 3
    assert expand_shards(str(tmp_path / "t-{000,002}.tar"))[1].endswith("t-002.tar")
    # ** spans folders (as on S3); a path that exists is taken as it is, brackets and all
    deep = tmp_path / "deep" / "x" / "y"
    deep.mkdir(parents=True)
    for p in (tmp_path / "deep" / "a.tar", tmp_path / "deep" / "x" / "b.tar", deep / "c.tar"):
        p.write_bytes(b"")
    assert [Path(p).name for p in expand_shards(str(tmp_path / "deep" / "**" / "*.tar"))] == [
        "a.tar", "b.tar", "c.tar"]
    odd = tmp_path / "data [v2]"
    odd.mkdir()
    (odd / "lab.tar").write_bytes(b"")
    assert expand_shards(str(odd / "lab.tar")) == [str(odd / "lab.tar")]


def _write_raw_shard(path: Path, keys: list[str]) -> None:
    img = encode_png(np.full((8, 8, 3), 128, np.uint8))
    with tarfile.open(path, "w") as tar:
        for key in keys:
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(img)
            tar.addfile(info, io.BytesIO(img))


def test_read_shard_reports_damage_instead_of_raising(tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    _write_raw_shard(good, [f"k{i}" for i in range(6)])
    got = list(read_shard(good))
    assert [(type(s), s.index, s.key) for s in got] == [(Sample, i, f"k{i}") for i in range(6)]

    data = good.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 512 * 5 + 100])  # inside the 3rd member's header/data
    got = list(read_shard(cut))
    assert all(isinstance(s, Sample) for s in got[:-1]) and len(got) == 3
    assert isinstance(got[-1], BadSample) and "damaged shard" in got[-1].reason
    assert got[-1].key == "k2" and got[-1].index == 2  # the sample being read when it broke

    at_boundary = tmp_path / "boundary.tar"  # tarfile alone reads this silently as complete
    at_boundary.write_bytes(data[: 512 * 4])
    assert "end-of-archive" in list(read_shard(at_boundary))[-1].reason

    missing = list(read_shard(tmp_path / "nope.tar"))
    assert len(missing) == 1 and isinstance(missing[0], BadSample)
    not_tar = tmp_path / "text.tar"
    not_tar.write_text("hello")
    assert isinstance(list(read_shard(not_tar))[-1], BadSample)
    # A compressed shard (tarfile opens .tar.gz/.tar.xz too) whose stream is damaged: the
    # decompressor's own error (zlib.error is no OSError) escaped as a traceback.
    import gzip
    import lzma
    import zlib

    noise = encode_png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    with ShardWriter(tmp_path / "noisy", "n", maxcount=100) as w:
        for i in range(20):  # incompressible: a damaged block is found while reading it
            w.write(f"k{i}", noise, 0)
    data = Path(w.paths[0]).read_bytes()
    for name, compress in (("gz", gzip.compress), ("xz", lzma.compress)):
        whole = tmp_path / f"good.tar.{name}"
        whole.write_bytes(compress(data))
        assert [s.key for s in read_shard(whole)] == [f"k{i}" for i in range(20)]
        packed = bytearray(compress(data))
        packed[len(packed) // 2: len(packed) // 2 + 64] = bytes(64)
        broken = tmp_path / f"broken.tar.{name}"
        broken.write_bytes(packed)
        got = list(read_shard(broken))
        assert isinstance(got[-1], BadSample) and "damaged shard" in got[-1].reason, name
    assert issubclass(zlib.error, Exception) and not issubclass(zlib.error, OSError)


def test_bad_samples_keep_their_place_and_the_rest_is_read(tmp_path: Path) -> None:
    png = encode_png(_images(1)[0])
    path = _tar_with(tmp_path, {"a.png": png, "b.cls": b"1", "c.png": png, "c.cls": b"x",
                                "d.png": png})
    got = list(read_shard(path))
    assert [(type(s).__name__, s.key, s.index) for s in got] == [
        ("Sample", "a", 0), ("BadSample", "b", 1), ("BadSample", "c", 2), ("Sample", "d", 3)]
    assert "no image" in got[1].reason and "not an integer" in got[2].reason
    damage = Damage()
    assert [s.key for s in read_samples([path], damage)] == ["a", "d"]
    assert (damage.good, damage.count) == (2, 2)
    assert damage.to_dict()["examples"][0] == {"shard": str(path), "key": "b",
                                                "reason": got[1].reason}


def test_a_torn_shard_counts_the_samples_it_lost() -> None:
    """A tail stands for the rest of the shard (or of a reader's run of it) that dataset.json
    records: a shard torn after 10 of its 100 samples is 90 damaged, not 1."""
    from pipeline.shards import TAIL_REASON, tail_loss

    tail = BadSample("/d/a.tar", "k10", 10, f"{TAIL_REASON} (ReadError: truncated)")
    assert tail.is_tail and tail_loss(tail, 100).lost == 90
    assert tail_loss(tail, None).lost == 1  # count not recorded: one entry, as before
    assert tail_loss(tail, 5).lost == 1  # a stale count below what was read
    # runs of the shard: each reader counts its own run's loss, which adds up to the shard's
    runs = [(0, 40), (40, 70), (70, None)]
    assert [tail_loss(tail, 100, a, b).lost for a, b in runs] == [30, 30, 30]
    decode = BadSample("/d/a.tar", "k3", 3, "cannot decode image")
    assert not decode.is_tail and tail_loss(decode, 100) is decode
    damage = Damage()
    damage.ok(910)
    damage.bad(tail_loss(tail, 100))
    assert damage.to_dict()["samples"] == 1000 and damage.count == 90
    with pytest.raises(ShardError, match=r"labeled split: 90 of 1000 samples are damaged"):
        damage.check("labeled", 0.01)


def test_damage_limit_names_the_worst_shard() -> None:
    damage = Damage()
    damage.ok(97)
    damage.bad(BadSample("/d/a.tar", "k1", 0, "cannot decode image"))
    for i in range(2):
        damage.bad(BadSample("/d/b.tar", f"k{i}", i, "no image"))
    damage.check("labeled", 0.05)  # 3% is within the limit
    with pytest.raises(ShardError, match=r"labeled split: 3 of 100 samples are damaged .*"
                                         r"worst shard /d/b.tar \(2 bad"):
        damage.check("labeled", 0.01)
