"""pipeline.fs against a real S3 server (moto, tests/s3server.py): the path interface, whole-object
writes, listing and globs, pickling to workers, and the one-line errors."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.fs import S3Path, StorageError, location, read_table, s3_filesystem
from pipeline.shards import Sample, expand_shards, read_shard, write_shards
from pipeline.storage import atomic_write_bytes, atomic_write_json, sha256_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bucket(s3) -> str:
    return s3.make_bucket("fs-tests")


def test_location_picks_the_path_type() -> None:
    assert isinstance(location("s3://b/k"), S3Path)
    assert location("data/x") == Path("data/x")
    with pytest.raises(StorageError, match="unsupported location"):
        location("gs://b/k")
    with pytest.raises(StorageError, match="no bucket"):
        location("s3:///k")
    # A slash short: a local folder named "s3:" got the whole run, without a word
    for typo in ("s3:/b/k", "s3:b/k", "S3:/b/k"):
        with pytest.raises(StorageError, match=rf"^{typo}: not a location this tool reads \(a "
                                               r"URI needs '://'\); did you mean s3://b/k\?$"):
            location(typo)
    with pytest.raises(StorageError, match="use a local path or s3://bucket/key"):
        location("gs:/b/k")
    assert location("data:v1/x") == Path("data:v1/x")  # a colon in a local name stays allowed


def test_a_local_folder_that_cannot_be_removed_whole_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--force removes the old round's folder; a file it could not remove was ignored, and the
    training state left behind was resumed from (S3 raised, the local disk did not)."""
    import os

    from pipeline.fs import rmtree

    folder = tmp_path / "round-1"
    (folder / "train" / "checkpoint_1").mkdir(parents=True)
    (folder / "train" / "checkpoint_1" / "state.pt").write_bytes(b"x")
    (folder / "model.pt").write_bytes(b"y")
    unlink = os.unlink

    def stuck(path, *args, **kwargs):
        if str(path).endswith("state.pt"):
            raise PermissionError(13, "Permission denied")
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", stuck)
    with pytest.raises(StorageError, match=r"^cannot remove .*state\.pt \(Permission denied\); "
                                           rf"remove {folder} by hand"):
        rmtree(folder)
    monkeypatch.setattr(os, "unlink", unlink)
    rmtree(folder)
    assert not folder.exists()
    rmtree(folder)  # nothing there: nothing to do


def test_an_s3_error_is_told_by_its_status_not_by_a_403_in_the_key() -> None:
    """A shard named lab-000403.tar (the README's brace patterns) made a connection failure
    read "access denied"; a missing bucket whose name has 403 in it too."""
    from pipeline.fs import explain

    where = S3Path("s3://b/data/lab-000403.tar")
    down = OSError("When getting information for key 'data/lab-000403.tar' in bucket 'b': AWS "
                   "Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, "
                   "Couldn't connect to server")
    assert "cannot reach the object store" in str(explain(down, where))
    denied = OSError("When getting information for key 'data/lab-000403.tar' in bucket 'b': "
                     "AWS Error UNKNOWN (HTTP status 403) during HeadObject operation: No "
                     "response body.")
    assert "access denied by the object store" in str(explain(denied, where))
    bucket = S3Path("s3://run-403/x.json")
    gone = OSError("Bucket 'run-403' not found")
    assert "bucket 'run-403' does not exist" in str(explain(gone, bucket))


def test_pure_path_operations() -> None:
    p = S3Path("s3://b/runs//a/model.pt", endpoint=False)
    assert str(p) == "s3://b/runs/a/model.pt"
    assert (p.name, p.stem, p.suffix) == ("model.pt", "model", ".pt")
    assert p.parent == S3Path("s3://b/runs/a", endpoint=False)
    assert S3Path("s3://b/runs", endpoint=False) / "a" / "model.pt" == p
    assert p.relative_to(S3Path("s3://b/runs", endpoint=False)).as_posix() == "a/model.pt"
    assert p.with_suffix(".json").name == "model.json"
    with pytest.raises(ValueError):
        p.relative_to(S3Path("s3://other/runs", endpoint=False))
    with pytest.raises(TypeError):  # no __fspath__: builtins.open cannot be handed an object
        open(p)  # noqa: SIM115


def test_write_read_list_delete(s3, bucket: str) -> None:
    base = S3Path(f"s3://{bucket}/t1")
    assert not (base / "a.txt").exists()
    atomic_write_bytes(base / "a.txt", b"hello")
    atomic_write_json(base / "sub" / "b.json", {"x": 1})
    assert (base / "a.txt").read_bytes() == b"hello"
    assert (base / "a.txt").is_file() and (base / "sub").is_dir() and base.exists()
    assert (base / "a.txt").stat().st_size == 5
    import hashlib

    assert sha256_file(base / "a.txt") == hashlib.sha256(b"hello").hexdigest()
    assert [p.name for p in base.iterdir()] == ["a.txt", "sub"]
    assert [p.name for p in base.glob("*.txt")] == ["a.txt"]
    assert [str(p) for p in base.glob("*/*.json")] == [f"s3://{bucket}/t1/sub/b.json"]
    assert [p.name for p in base.rglob("*.json")] == ["b.json"]
    with (base / "a.txt").open("rb") as f:
        f.seek(1)
        assert f.read(3) == b"ell"
    with (base / "c.txt").open("w") as f:
        f.write("text")
    assert (base / "c.txt").read_text() == "text"
    for mode in ("w", "wb"):  # a block that raises leaves no object (it left the part written)
        with pytest.raises(RuntimeError), (base / f"torn-{mode}").open(mode) as f:
            f.write('{"a": ' if mode == "w" else b'{"a": ')
            raise RuntimeError("stopped mid-write")
        assert not (base / f"torn-{mode}").exists()
    with (base / "d.bin").open("wb") as f:
        f.write(b"bytes")
    assert (base / "d.bin").read_bytes() == b"bytes"
    (base / "a.txt").unlink()
    assert not (base / "a.txt").exists()
    (base / "a.txt").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (base / "a.txt").read_bytes()


def test_pickled_path_keeps_its_endpoint(s3, bucket: str) -> None:
    p = S3Path(f"s3://{bucket}/x")
    q = pickle.loads(pickle.dumps(p))
    assert q == p and q.endpoint == s3.endpoint


def test_shards_written_to_and_read_from_s3_match_local(s3, bucket: str, tmp_path: Path) -> None:
    import numpy as np

    from pipeline.shards import encode_png

    rng = np.random.default_rng(0)
    samples = [(f"k{i:03d}", encode_png(rng.integers(0, 255, (8, 8, 3), np.uint8)), i % 3)
               for i in range(25)]
    local = write_shards(samples, tmp_path, prefix="s", maxcount=10)
    remote = write_shards(samples, f"s3://{bucket}/shards", prefix="s", maxcount=10)
    assert [str(p) for p, _ in remote] == [f"s3://{bucket}/shards/s-{i:06d}.tar"
                                           for i in range(3)]
    for (lp, _), (rp, _) in zip(local, remote, strict=True):
        assert rp.read_bytes() == lp.read_bytes()  # the same bytes, uploaded whole
        got = [(s.key, s.label, s.image) for s in read_shard(str(rp)) if isinstance(s, Sample)]
        want = [(s.key, s.label, s.image) for s in read_shard(lp)]
        assert got == want and len(got) > 0
    assert expand_shards(f"s3://{bucket}/shards/s-{{000000..000001}}.tar") == [
        f"s3://{bucket}/shards/s-000000.tar", f"s3://{bucket}/shards/s-000001.tar"]
    assert expand_shards(f"s3://{bucket}/shards/s-*.tar") == [str(p) for p, _ in remote]
    assert not list(S3Path(f"s3://{bucket}/shards").glob("*.tmp"))


def test_parquet_on_s3(s3, bucket: str) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"a": [1, 2, 3]}), buf)
    atomic_write_bytes(f"s3://{bucket}/p/t.parquet", buf.getvalue())
    assert read_table(f"s3://{bucket}/p/t.parquet").column("a").to_pylist() == [1, 2, 3]


def test_missing_bucket_and_bad_credentials_are_one_clear_line(s3, bucket: str,
                                                               monkeypatch) -> None:
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket' does not exist; create it"):
        S3Path("s3://no-such-bucket/x").check_bucket()
    # --data in a missing bucket: said so, not "has no dataset.json; create one with prepare"
    from pipeline.dataset import DatasetError, load_dataset

    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket' does not exist"):
        load_dataset("s3://no-such-bucket/data/digits")
    with pytest.raises(DatasetError, match=r"has no dataset.json; create one"):
        load_dataset(f"s3://{bucket}/data/none")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    s3_filesystem.cache_clear()
    try:
        with pytest.raises(StorageError, match=r"access denied .* check the credentials"):
            S3Path(f"s3://{bucket}/x").check_bucket()
        with pytest.raises(StorageError, match=r"access denied"):
            S3Path(f"s3://{bucket}/x").write_bytes(b"no")
    finally:
        s3_filesystem.cache_clear()


def _prepare(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare.py"), *args],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_prepare_digits_to_s3_and_register_there(s3, bucket: str) -> None:
    from pipeline.dataset import load_dataset

    p = _prepare("digits", "--out", f"s3://{bucket}/digits", "--shard-size", "400")
    assert p.returncode == 0, p.stderr[-2000:]
    info = load_dataset(f"s3://{bucket}/digits")
    assert isinstance(info.path, S3Path)
    assert info.counts() == {"labeled": 180, "unlabeled": 1077, "test": 540}
    assert all(s.startswith(f"s3://{bucket}/digits/") for s in info.split("unlabeled").shards)
    # the stored shard paths are relative: the description moves with its folder
    raw = (info.path / "dataset.json").read_text()
    assert "s3://" not in raw
    p = _prepare("register", "--labeled", f"s3://{bucket}/digits/labeled/*/*.tar",
                 "--unlabeled",  # <split>/<hash>/<split>-{...}: a brace pattern on S3
                 info.split("unlabeled").shards[0][:-len("000000.tar")] + "{000000..000002}.tar",
                 "--test", f"s3://{bucket}/digits/test/*/*.tar", "--out", f"s3://{bucket}/reg")
    assert p.returncode == 0, p.stderr[-2000:]
    reg = load_dataset(f"s3://{bucket}/reg")
    assert reg.counts() == info.counts()
    assert reg.split("labeled").class_counts == info.split("labeled").class_counts


def test_prepare_errors_on_s3_exit_2(s3, bucket: str) -> None:
    import os

    missing = _prepare("digits", "--out", "s3://no-such-bucket/digits")
    assert missing.returncode == 2 and "bucket 'no-such-bucket' does not exist" in missing.stderr
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "wrong"}
    refused = _prepare("digits", "--out", f"s3://{bucket}/digits2", env=env)
    assert refused.returncode == 2 and "access denied" in refused.stderr
    p = _prepare("register", "--labeled", f"s3://{bucket}/nothing/*.tar", "--unlabeled",
                 f"s3://{bucket}/nothing/u.tar", "--test", f"s3://{bucket}/nothing/t.tar",
                 "--out", f"s3://{bucket}/reg2")
    assert p.returncode == 2 and "the pattern matches no file" in p.stderr
    for proc in (missing, refused, p):
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_prepare_imagefolder_to_s3(s3, bucket: str, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from pipeline.dataset import load_dataset
    from pipeline.shards import read_samples

    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), np.uint8)).save(
                tmp_path / "src" / cls / f"{i}.png")
    p = _prepare("imagefolder", str(tmp_path / "src"), "--out", f"s3://{bucket}/folder",
                 "--split", "labeled", "--shard-size", "4")
    assert p.returncode == 0, p.stderr[-2000:]
    info = load_dataset(f"s3://{bucket}/folder")
    assert info.classes == ["cat", "dog"] and info.split("labeled").count == 6
    labels = sorted(s.label for s in read_samples(info.split("labeled").shards))
    assert labels == [0, 0, 0, 1, 1, 1]


@pytest.mark.slow
def test_prepare_imagefolder_from_s3_with_workers(s3, bucket: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An image tree kept on S3 is read where it is, by worker processes that find the server
    as the parent does (environment), into the shards a local copy of the tree gives; hidden
    objects are skipped and a broken one is named."""
    import numpy as np
    from PIL import Image

    import pipeline.dataset as dataset
    from pipeline.dataset import load_dataset, prepare_imagefolder
    from pipeline.shards import read_samples

    rng = np.random.default_rng(3)
    local = tmp_path / "tree"
    for cls in ("cat", "dog"):
        for i in range(4):
            path = local / cls / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), np.uint8)).save(path)
    (local / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    for p in sorted(local.rglob("*")):
        if p.is_file():
            (location(f"s3://{bucket}/tree") / p.relative_to(local).as_posix()).write_bytes(
                p.read_bytes())
    location(f"s3://{bucket}/tree/.DS_Store").write_bytes(b"finder")
    location(f"s3://{bucket}/tree/cat/.thumbs/x.jpg").write_bytes(b"hidden")
    monkeypatch.setattr(dataset, "FILES_PER_WORKER", 1)
    from_s3 = prepare_imagefolder(f"s3://{bucket}/tree", tmp_path / "a", shard_size=3,
                                  workers=2, max_short_side=20)
    from_disk = prepare_imagefolder(local, tmp_path / "b", shard_size=3, workers=1,
                                    max_short_side=20)
    assert from_s3.classes == ["cat", "dog"] and from_s3.split("labeled").count == 8
    assert from_s3.split("labeled").resized == {"max_short_side": 20, "jpeg_quality": 90,
                                                "images": 8}
    a = [(x.key, x.label, x.image) for x in read_samples(from_s3.split("labeled").shards)]
    b = [(x.key, x.label, x.image) for x in read_samples(from_disk.split("labeled").shards)]
    assert a == b and len(a) == 8
    assert load_dataset(tmp_path / "a").split("labeled").class_counts == {"cat": 4, "dog": 4}
    p = _prepare("imagefolder", f"s3://{bucket}/tree/dog", "--out", str(tmp_path / "c"),
                 "--split", "unlabeled")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"s3://{bucket}/tree/dog/broken.png: cannot decode image" in p.stderr
    missing = _prepare("imagefolder", "s3://no-such-bucket/tree", "--out", str(tmp_path / "d"))
    assert missing.returncode == 2 and "bucket 'no-such-bucket' does not exist" in missing.stderr
    empty = _prepare("imagefolder", f"s3://{bucket}/nothing-here", "--out", str(tmp_path / "d"))
    assert empty.returncode == 2 and "contains no files" in empty.stderr


def test_round_lock_on_s3_refuses_a_second_holder_and_takes_over_a_dead_ones(
        s3, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No exclusive create on S3: written when absent, read back after a pause; the same
    refusals and take-over as on a local disk."""
    import json
    import os
    import socket
    import subprocess
    import sys

    import pipeline.lock
    from pipeline.layout import RunLayout
    from pipeline.lock import LockError, round_lock

    monkeypatch.setattr(pipeline.lock, "REMOTE_SETTLE", 0.05)
    layout = RunLayout(S3Path(f"s3://{bucket}/locks"), "r")
    with round_lock(layout, 1) as path:
        assert isinstance(path, S3Path) and json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(LockError, match=rf"round 1 of run 'r' is being run by pid "
                                            rf"{os.getpid()} on host .* delete {path}"), \
                round_lock(layout, 1):
            pass
    assert not path.exists()  # released
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    path.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(),
                                "started_at": "then", "command": "teacher.py"}))
    with round_lock(layout, 1):  # left by a process that no longer runs: taken over
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_missing_shards_are_found_with_one_listing_per_folder(s3, bucket: str,
                                                              tmp_path: Path) -> None:
    """The check the preflight makes even when it reads nothing (--preflight-limit)."""
    from pipeline.rounds import missing_shards

    base = f"s3://{bucket}/ms"
    for name in ("a/1.tar", "a/2.tar", "b/1.tar", "a/sub/x.tar"):
        atomic_write_bytes(S3Path(f"{base}/{name}"), b"x")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.tar").write_bytes(b"x")
    (tmp_path / "a" / "d.tar").mkdir()  # a folder is not a shard
    shards = [f"{base}/a/1.tar", f"{base}/a/3.tar", f"{base}/a/sub", f"{base}/b/1.tar",
              f"{base}/c/1.tar", str(tmp_path / "a" / "1.tar"), str(tmp_path / "a" / "d.tar"),
              str(tmp_path / "none" / "1.tar")]
    assert missing_shards(shards) == [f"{base}/a/3.tar", f"{base}/a/sub", f"{base}/c/1.tar",
                                      str(tmp_path / "a" / "d.tar"),
                                      str(tmp_path / "none" / "1.tar")]
