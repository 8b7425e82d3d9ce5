"""jobs/prepare.py and pipeline/dataset.py: the three ways to make a dataset folder."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs.prepare import main as prepare_main
from pipeline.dataset import DatasetError, load_dataset
from pipeline.shards import encode_png, read_samples, write_shards

ROOT = Path(__file__).resolve().parent.parent


def test_digits_splits_and_truth(digits_dir: Path) -> None:
    info = load_dataset(digits_dir)
    assert info.classes == [str(i) for i in range(10)]
    assert info.counts() == {"labeled": 180, "unlabeled": 1077, "test": 540}
    for split in ("labeled", "test"):
        s = info.splits[split]
        samples = list(read_samples(s.shards))
        assert len(samples) == s.count
        assert sum(s.class_counts.values()) == s.count
        # stratified: every class present in proportion (digits has ~180 of each)
        assert min(s.class_counts.values()) >= 0.8 * s.count / 10
    unlab = list(read_samples(info.splits["unlabeled"].shards))
    assert len(unlab) == 1077 and all(x.label is None for x in unlab)
    truth = pd.read_parquet(info.unlabeled_truth)
    assert sorted(truth.key) == sorted(x.key for x in unlab)
    # no key appears in two splits (no label leaks into "unlabeled")
    keys = {sp: {x.key for x in read_samples(info.splits[sp].shards)} for sp in info.splits}
    assert not keys["labeled"] & keys["unlabeled"] and not keys["test"] & keys["unlabeled"]


def test_digits_cli_is_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert prepare_main(["digits", "--out", str(tmp_path / name), "--shard-size", "500"]) == 0
    a = sorted((tmp_path / "a").rglob("*.tar"))
    b = sorted((tmp_path / "b").rglob("*.tar"))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


@pytest.mark.slow
def test_digits_rerun_with_other_options_replaces_nothing_listed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A rerun with other fractions writes beside the shards dataset.json lists (a run reading
    them meanwhile keeps valid files), then names the ones no longer listed."""
    out = tmp_path / "d"
    assert prepare_main(["digits", "--out", str(out), "--shard-size", "500"]) == 0
    first = load_dataset(out)
    old = {p: Path(p).read_bytes() for s in first.splits.values() for p in s.shards}
    old[str(first.unlabeled_truth)] = first.unlabeled_truth.read_bytes()
    capsys.readouterr()
    assert prepare_main(["digits", "--out", str(out), "--shard-size", "500",
                         "--labeled-fraction", "0.2"]) == 0
    err = capsys.readouterr().err
    second = load_dataset(out)
    assert second.counts()["labeled"] == 360 and first.counts()["labeled"] == 180
    assert all(Path(p).read_bytes() == b for p, b in old.items())  # untouched
    now = {p for s in second.splits.values() for p in s.shards} | {str(second.unlabeled_truth)}
    assert not now & set(old)
    assert f"the {len(old)} files dataset.json listed before" in err
    # the same options again: the same names, nothing reported left behind
    assert prepare_main(["digits", "--out", str(out), "--shard-size", "500",
                         "--labeled-fraction", "0.2"]) == 0
    assert load_dataset(out).splits == second.splits
    assert "listed before" not in capsys.readouterr().err


def test_digits_refuses_to_replace_another_dataset(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    src = tmp_path / "src"
    for c in ("cat", "dog"):
        (src / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(src / c / f"{i}.png")
    out = tmp_path / "digits"  # named like the bundled corpus, and still not it
    assert prepare_main(["imagefolder", str(src), "--out", str(out)]) == 0
    before = (out / "dataset.json").read_bytes()
    assert prepare_main(["digits", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"prepare: error: {out} holds the dataset 'digits', which prepare digits "
                       "would replace; give it an --out of its own")
    assert (out / "dataset.json").read_bytes() == before
    assert not (out / "unlabeled").exists()


def test_shard_size_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["digits"], ["imagefolder", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            prepare_main([*command, "--out", str(tmp_path / "o"), "--shard-size", "0"])
        assert e.value.code == 2
        assert "argument --shard-size: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_digits_bad_fractions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = prepare_main(["digits", "--out", str(tmp_path), "--labeled-fraction", "0.8",
                       "--test-fraction", "0.3"])
    assert rc == 2
    assert "sum to less than 1" in capsys.readouterr().err


def _image_tree(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(
                root / cls / f"img.{i}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(
        root / "cat" / "x.bmp")


def test_imagefolder_labeled_and_unlabeled(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    _image_tree(src)
    out = tmp_path / "ds"
    assert prepare_main(["imagefolder", str(src), "--out", str(out), "--split", "labeled"]) == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "1 files skipped" in err
    info = load_dataset(out)
    assert info.classes == ["cat", "dog"]
    s = info.splits["labeled"]
    assert s.count == 7 and s.class_counts == {"cat": 4, "dog": 3}
    samples = list(read_samples(s.shards))
    assert {x.key for x in samples} >= {"cat_img_0", "dog_img_2", "cat_x"}  # dots replaced
    assert {x.image_format for x in samples} == {"png"}  # bmp re-encoded
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (src / "cat").glob("*.png"):
        (flat / p.name).write_bytes(p.read_bytes())
    assert prepare_main(["imagefolder", str(flat), "--out", str(out), "--split", "unlabeled"]) == 0
    info = load_dataset(out)
    assert info.splits["unlabeled"].count == 3 and info.splits["labeled"].count == 7
    assert all(x.label is None for x in read_samples(info.splits["unlabeled"].shards))


def test_imagefolder_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_main(["imagefolder", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "contains no files" in capsys.readouterr().err
    junk = tmp_path / "junk" / "a"
    junk.mkdir(parents=True)
    (junk / "x.png").write_bytes(b"nope")
    assert prepare_main(["imagefolder", str(tmp_path / "junk"), "--out", str(tmp_path / "o")]) == 2
    assert "none of the 1 files is a readable image" in capsys.readouterr().err
    assert not (tmp_path / "o" / "dataset.json").exists()


def test_register_existing_shards(tmp_path: Path, digits_dir: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    info = load_dataset(digits_dir)
    out = tmp_path / "reg"
    lab, test = (Path(info.splits[s].shards[0]).parent for s in ("labeled", "test"))
    rc = prepare_main([  # <split>/<hash>/<split>-NNNNNN.tar
        "register", "--labeled", str(lab / "labeled-{000000..000001}.tar"),
        "--unlabeled", str(digits_dir / "unlabeled" / "*" / "*.tar"),
        "--test", str(test / "test-00000{0,1,2,3,4,5}.tar"), "--out", str(out)])
    assert rc == 0
    reg = load_dataset(out)
    assert reg.counts() == info.counts()
    assert reg.classes == info.classes
    assert reg.splits["labeled"].class_counts == info.splits["labeled"].class_counts
    assert reg.splits["unlabeled"].class_counts is None
    assert not list(out.rglob("*.tar"))  # described in place, not copied
    assert "warning" not in capsys.readouterr().err  # the digits' shards mix the classes


def test_register_warns_of_shards_written_class_by_class(tmp_path: Path, digits_dir: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    image = encode_png(np.zeros((4, 4, 3), np.uint8))
    samples = [(f"k{c}_{i}", image, c) for c in range(3) for i in range(20)]  # sorted by class
    write_shards(iter(samples), tmp_path / "lab", prefix="lab", maxcount=20)
    rc = prepare_main(["register", "--labeled", str(tmp_path / "lab" / "*.tar"),
                       "--unlabeled", str(digits_dir / "unlabeled" / "*" / "*.tar"),
                       "--test", str(digits_dir / "test" / "*" / "*.tar"), "--out", str(tmp_path / "r")])
    assert rc == 0  # a warning, not a refusal: the shards are usable
    err = capsys.readouterr().err
    assert ("register: warning: labeled: its shards each hold mostly one class (the median "
            "shard 100% of one, the split 33% of its largest)") in err


def test_register_errors(tmp_path: Path, digits_dir: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    unl = str(digits_dir / "unlabeled" / "*" / "*.tar")
    rc = prepare_main(["register", "--labeled", str(tmp_path / "nope-*.tar"), "--unlabeled", unl,
                       "--test", unl, "--out", str(tmp_path / "o")])
    # a glob that matches nothing is said so (it said "no such shard ;", naming nothing)
    assert rc == 2 and "nope-*.tar': the pattern matches no file; check the path or pattern" \
        in capsys.readouterr().err
    rc = prepare_main(["register", "--labeled", f"{tmp_path}/{{a,b}}.tar", "--unlabeled", unl,
                       "--test", unl, "--out", str(tmp_path / "o")])
    assert rc == 2 and f"no such shard {tmp_path}/a.tar (and 1 more); check" in \
        capsys.readouterr().err
    rc = prepare_main(["register", "--labeled", unl, "--unlabeled", unl, "--test", unl,
                       "--out", str(tmp_path / "o")])
    assert rc == 2 and "carry no labels" in capsys.readouterr().err
    mixed = tmp_path / "mixed"
    write_shards([("a", encode_png(np.zeros((4, 4, 3), np.uint8)), 1),
                  ("b", encode_png(np.zeros((4, 4, 3), np.uint8)), None)], mixed)
    rc = prepare_main(["register", "--labeled", str(mixed / "*.tar"), "--unlabeled", unl,
                       "--test", unl, "--out", str(tmp_path / "o")])
    assert rc == 2 and "have no label" in capsys.readouterr().err
    lab = str(digits_dir / "labeled" / "*" / "*.tar")
    test = str(digits_dir / "test" / "*" / "*.tar")
    # an unlabeled pool may mix labeled and unlabeled samples: registered, all of them counted
    rc = prepare_main(["register", "--labeled", lab, "--unlabeled", str(mixed / "*.tar"),
                       "--test", test, "--out", str(tmp_path / "m")])
    assert rc == 0 and load_dataset(tmp_path / "m").splits["unlabeled"].count == 2
    # a split with no usable sample is refused, with the reason of the first one
    dotted = tmp_path / "dotted"
    dotted.mkdir()
    with tarfile.open(dotted / "d.tar", "w") as tar:
        info = tarfile.TarInfo("img.001.jpg")  # WebDataset: key 'img', suffix '001.jpg'
        info.size = 4
        tar.addfile(info, io.BytesIO(b"abcd"))
    rc = prepare_main(["register", "--labeled", lab, "--unlabeled", str(dotted / "d.tar"),
                       "--test", test, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "no usable sample in 1 shard(s); e.g." in err and "has no image" in err
    # a test shard also listed as labeled: what load_dataset refuses is never written
    rc = prepare_main(["register", "--labeled", test, "--unlabeled", unl, "--test", test,
                       "--out", str(tmp_path / "o")])
    assert rc == 2 and "is in both the labeled and the test split" in capsys.readouterr().err
    assert not (tmp_path / "o" / "dataset.json").exists()


def test_imagefolder_takes_a_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    import os

    from PIL import Image

    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (90, 0, 0)).save(src / c / "ok.png")
    raw = os.path.join(os.fsencode(src / "a"), b"bad\xff.png")  # Latin-1 era name
    with open(raw, "wb") as f:
        f.write((src / "a" / "ok.png").read_bytes())
    assert prepare_main(["imagefolder", str(src), "--out", str(tmp_path / "d")]) == 0
    info = load_dataset(tmp_path / "d")
    keys = sorted(s.key for s in read_samples(info.splits["labeled"].shards))
    assert len(keys) == 3 and all(k.isascii() for k in keys)


def test_imagefolder_classes_are_folders_of_images(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """What a real photo tree holds besides classes: hidden folders (.git, notebook checkpoints)
    and folders of notes are not classes, and say so."""
    from PIL import Image

    src = tmp_path / "src"
    for folder, name in (("cat", "a.JPG"), ("dog", "b.png"), (".git", "HEAD"),
                         (".ipynb_checkpoints", "x-checkpoint.ipynb"), ("docs", "README.md"),
                         ("dog/.thumbs", "c.png")):
        (src / folder).mkdir(parents=True, exist_ok=True)
        if name.lower().endswith((".jpg", ".png")):
            Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(
                src / folder / name, format="JPEG" if name.endswith("JPG") else "PNG")
        else:
            (src / folder / name).write_text("not an image")
    # a class folder that is a link to where its images live is followed; a loop is not
    elsewhere = tmp_path / "elsewhere" / "bird"
    elsewhere.mkdir(parents=True)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(elsewhere / "c.png")
    (src / "bird").symlink_to(elsewhere)
    (src / "cat" / "loop").symlink_to(src)
    assert prepare_main(["imagefolder", str(src), "--out", str(tmp_path / "o")]) == 0
    info = load_dataset(tmp_path / "o")
    assert info.classes == ["bird", "cat", "dog"] and info.splits["labeled"].count == 3
    err = capsys.readouterr().err
    assert f"{src / 'docs'} holds no image files; not a class" in err
    assert ".git" not in err and "thumbs" not in err


def test_imagefolder_long_names_and_a_replaced_unlabeled_split(tmp_path: Path,
                                                              digits_dir: Path) -> None:
    """A file deep in folders with a long name gets a short key (tar member names are short);
    an unlabeled split replaced by imagefolder drops the held-out labels of the old one."""
    import shutil

    from PIL import Image

    src = tmp_path / "pool" / ("2019 summer holiday photos " * 3) / "more"
    src.mkdir(parents=True)
    long = src / ("IMG_20190812_153012_HDR_copy_copy_copy_" * 3 + ".png")
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(long)
    data = tmp_path / "d"
    shutil.copytree(digits_dir, data)
    assert load_dataset(data).unlabeled_truth is not None
    assert prepare_main(["imagefolder", str(tmp_path / "pool"), "--out", str(data),
                         "--split", "unlabeled"]) == 0
    info = load_dataset(data)
    assert info.unlabeled_truth is None and info.splits["unlabeled"].count == 1
    (sample,) = read_samples(info.splits["unlabeled"].shards)
    assert len(sample.key) <= 70 and sample.key.endswith("copy_copy_")


def test_load_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="has no dataset.json; create one"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": []}))
    with pytest.raises(DatasetError, match="not a valid dataset description"):
        load_dataset(tmp_path)


def test_load_dataset_refuses_a_shard_listed_twice_or_shared_with_test(tmp_path: Path) -> None:
    def write(splits: dict[str, list[str]]) -> None:
        (tmp_path / "dataset.json").write_text(json.dumps({"classes": ["a"], "splits": {
            name: {"shards": shards, "count": 1} for name, shards in splits.items()}}))

    write({"labeled": ["l.tar"], "unlabeled": ["u0.tar", "u1.tar", "u0.tar"], "test": ["t.tar"]})
    with pytest.raises(DatasetError, match=rf"the unlabeled split lists shard {tmp_path}/u0.tar "
                                           r"twice; remove the repeated entry$"):
        load_dataset(tmp_path)
    write({"labeled": ["l.tar"], "unlabeled": ["u.tar", "./t.tar"], "test": ["t.tar"]})
    with pytest.raises(DatasetError, match=r"shard .*/t.tar is in both the unlabeled and the test "
                                           r"split, so test images would be trained on"):
        load_dataset(tmp_path)
    # the labeled images may be offered as unlabeled ones too: not a mistake
    write({"labeled": ["l.tar"], "unlabeled": ["l.tar", "u.tar"], "test": ["t.tar"]})
    assert load_dataset(tmp_path).split("unlabeled").shards[0] == str(tmp_path / "l.tar")


def test_cli_help_runs() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare.py"), "--help"],
                         capture_output=True, text=True, check=True)
    assert "digits" in out.stdout and "register" in out.stdout


def test_imagefolder_numbers_classes_in_numeric_order_and_takes_a_subset_split(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Folders 1, 2, 10 are classes 0, 1, 2 (as register would number labels 1, 2, 10 in
    order); a later split may hold some of the dataset's classes, with the dataset's indices."""
    from PIL import Image

    for split, classes in (("train", ["1", "10", "2"]), ("val", ["10"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(np.full((4, 4, 3), int(c), np.uint8)).save(
                tmp_path / split / c / "a.png")
    out = tmp_path / "ds"
    assert prepare_main(["imagefolder", str(tmp_path / "train"), "--out", str(out)]) == 0
    assert load_dataset(out).classes == ["1", "2", "10"]
    assert prepare_main(["imagefolder", str(tmp_path / "val"), "--out", str(out), "--split",
                         "test"]) == 0
    assert "test: no images of class(es) ['1', '2']" in capsys.readouterr().err
    # a class folder whose every file is skipped (here a text file named .png) is named too
    (tmp_path / "val2" / "10").mkdir(parents=True)
    Image.fromarray(np.full((4, 4, 3), 10, np.uint8)).save(tmp_path / "val2" / "10" / "a.png")
    (tmp_path / "val2" / "2").mkdir()
    (tmp_path / "val2" / "2" / "b.png").write_text("not an image")
    assert prepare_main(["imagefolder", str(tmp_path / "val2"), "--out", str(tmp_path / "ds2"),
                         "--split", "labeled"]) == 0
    assert ("labeled: no images of class(es) ['2']; a model cannot learn a class it never sees"
            in capsys.readouterr().err)
    assert load_dataset(tmp_path / "ds2").splits["labeled"].class_counts == {"2": 0, "10": 1}
    info = load_dataset(out)
    assert info.splits["test"].class_counts == {"1": 0, "2": 0, "10": 1}
    assert [s.label for s in read_samples(info.splits["test"].shards)] == [2]


def _photo_tree(root: Path, n: int) -> None:
    """n small JPEGs in two class folders, one truncated and one not an image."""
    from PIL import Image

    rng = np.random.default_rng(2)
    for i in range(n):
        folder = root / ("a", "b")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(
            folder / f"{i}.jpg", quality=90)
    whole = (root / "a" / "0.jpg").read_bytes()
    (root / "a" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "b" / "notes.txt").write_text("not an image")


def test_imagefolder_workers_write_the_same_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Two worker processes give the shards one process gives, byte for byte, skip the same
    files, and print progress with a rate and the time left."""
    import pipeline.dataset as dataset

    src = tmp_path / "src"
    _photo_tree(src, 20)
    monkeypatch.setattr(dataset, "FILES_PER_WORKER", 1)  # a pool even for a few files
    assert prepare_main(["imagefolder", str(src), "--out", str(tmp_path / "one"),
                         "--workers", "1", "--shard-size", "8"]) == 0
    one = capsys.readouterr().err
    monkeypatch.setattr(dataset, "PROGRESS_SECONDS", 0.0)
    assert prepare_main(["imagefolder", str(src), "--out", str(tmp_path / "two"),
                         "--workers", "2", "--shard-size", "8"]) == 0
    two = capsys.readouterr().err
    assert "checking 22 files with 1 process\n" in one
    assert "checking 22 files with 2 processes" in two
    for err in (one, two):
        assert "cut.jpg: cannot decode image" in err and "notes.txt: cannot decode" in err
    assert "files/s, about" in two and "files/s" not in one
    shards = sorted((tmp_path / "one" / "labeled").glob("*.tar"))
    assert len(shards) == 3  # 20 images, 8 a shard
    for a in shards:
        assert a.read_bytes() == (tmp_path / "two" / "labeled" / a.name).read_bytes()


def _exit_on_3(item: str) -> str:
    import os

    if item == "3":
        os._exit(1)  # what the kernel's out-of-memory killer leaves behind
    return item


def _record(item: str) -> str:
    with open(item.split("|")[0], "a") as f:
        f.write(item + "\n")
    return item


def test_ordered_map_keeps_order_bounds_what_is_in_flight_and_names_a_dead_worker(
        tmp_path: Path) -> None:
    import time

    from pipeline.dataset import _ordered_map

    log = tmp_path / "log"
    items = [f"{log}|{i}" for i in range(40)]
    results = _ordered_map(_record, items, 2)
    assert next(results) == items[0]
    time.sleep(1.0)  # plenty for two workers to run far ahead if nothing held them back
    assert len(log.read_text().splitlines()) <= 4 * 2 + 1
    assert list(results) == items[1:]
    with pytest.raises(DatasetError, match="worker process died .* fewer --workers than 2"):
        list(_ordered_map(_exit_on_3, [str(i) for i in range(8)], 2))


@pytest.mark.slow
def test_pool_workers_end_when_prepare_is_killed(tmp_path: Path) -> None:
    """kill -9 of prepare left its worker processes blocked for ever, writing results that no
    one would read (seen after a user killed `prepare imagefolder`)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "run.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "from pipeline.dataset import _ordered_map\n"
        "from test_prepare import _record\n"
        "if __name__ == '__main__':  # spawn imports this module again in each worker\n"
        f"    items = [{str(tmp_path / 'log')!r} + f'|{{i}}' for i in range(1000)]\n"
        "    for _ in _ordered_map(_record, items, 2):\n"
        "        time.sleep(60)  # a slow caller: the workers fill the pipe and block\n")
    proc = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "log").exists():
            time.sleep(0.2)
        time.sleep(2)
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
                   .read_text().split()]
        assert workers
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    def running(pid: int) -> bool:  # a zombie waits for a reaper that may not come: ended
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(map(running, workers)):
        time.sleep(0.2)
    left = [w for w in workers if running(w)]
    for w in left:  # clean up whatever the old code left behind
        os.kill(w, signal.SIGKILL)
    assert not left


def test_imagefolder_max_short_side_shrinks_large_images_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """--max-short-side: larger images come out upright, RGB, aspect kept, shorter side exactly
    the limit, as JPEG at --jpeg-quality, close to a Lanczos resize of what the stages decode;
    smaller ones keep their bytes; dataset.json records it; worker processes agree."""
    from PIL import Image

    import pipeline.dataset as dataset
    from pipeline.images import decode_image

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    y, x = np.mgrid[0:60, 0:80]
    smooth = np.stack([x * 3, y * 4, (x + y) * 2], -1).astype(np.uint8)  # 80x60, JPEG-friendly
    Image.fromarray(smooth).save(src / "a" / "wide.jpg", quality=95)
    rgba = np.dstack([smooth[:40, :30], np.full((40, 30), 128, np.uint8)])  # 30x40, half alpha
    Image.fromarray(rgba, "RGBA").save(src / "a" / "tall.png")
    rotated = Image.fromarray(smooth)
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored landscape, shown portrait (rotate 90 clockwise)
    rotated.save(src / "b" / "phone.jpg", quality=95, exif=exif)
    Image.fromarray(smooth[:10, :14]).save(src / "b" / "small.png")  # shorter side 10 <= 12
    monkeypatch.setattr(dataset, "FILES_PER_WORKER", 1)
    for workers in ("1", "2"):
        assert prepare_main(["imagefolder", str(src), "--out", str(tmp_path / workers),
                             "--max-short-side", "12", "--jpeg-quality", "80",
                             "--workers", workers]) == 0
    err = capsys.readouterr().err
    assert "3 resized to a shorter side of 12 px" in err
    info = load_dataset(tmp_path / "1")
    assert info.splits["labeled"].resized == {"max_short_side": 12, "jpeg_quality": 80,
                                              "images": 3}
    assert json.loads((tmp_path / "1" / "dataset.json").read_text())["splits"]["labeled"][
        "resized"]["images"] == 3
    samples = {s.key: s for s in read_samples(info.splits["labeled"].shards)}
    assert samples["b_small"].image == (src / "b" / "small.png").read_bytes()
    assert samples["b_small"].image_format == "png"
    shapes = {}
    for key, name in (("a_wide", "a/wide.jpg"), ("a_tall", "a/tall.png"),
                      ("b_phone", "b/phone.jpg")):
        s = samples[key]
        assert s.image_format == "jpg" and s.image[:2] == b"\xff\xd8"
        with Image.open(io.BytesIO(s.image)) as im:
            assert im.info.get("exif") is None or 0x0112 not in im.getexif()  # no orientation
        got = decode_image(s.image)
        shapes[key] = tuple(got.shape[1:])
        full = decode_image((src / name).read_bytes())  # upright, alpha on white
        want = np.asarray(Image.fromarray(full.permute(1, 2, 0).numpy()).resize(
            (got.shape[2], got.shape[1]), Image.Resampling.LANCZOS), np.float32)
        assert np.abs(got.permute(1, 2, 0).numpy() - want).mean() < 6  # JPEG's loss only
    assert shapes == {"a_wide": (12, 16), "a_tall": (16, 12), "b_phone": (16, 12)}
    for a in sorted((tmp_path / "1" / "labeled").glob("*.tar")):
        assert a.read_bytes() == (tmp_path / "2" / "labeled" / a.name).read_bytes()


def test_imagefolder_shrinks_a_jpeg_above_the_pixel_limit_it_would_otherwise_skip(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A large scan above PIL's pixel limit (lowered here to 1,000; one process, so the limit
    holds in the reader): skipped as a possible bomb without --max-short-side; with it, read
    at 1/8 scale (within the limit) and shrunk; a PNG that large is still skipped."""
    from PIL import Image

    from pipeline.images import decode_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    Image.new("RGB", (160, 120), (30, 140, 220)).save(src / "a" / "scan.jpg", quality=95)
    Image.new("RGB", (160, 120), (30, 140, 220)).save(src / "a" / "scan.png")
    Image.new("RGB", (20, 20), (0, 0, 0)).save(src / "a" / "small.png")
    assert prepare_main(["imagefolder", str(src), "--out", str(tmp_path / "kept")]) == 0
    err = capsys.readouterr().err
    assert "scan.jpg: cannot decode image (Image size (19200 pixels) exceeds limit" in err
    assert load_dataset(tmp_path / "kept").counts()["labeled"] == 1
    assert prepare_main(["imagefolder", str(src), "--out", str(tmp_path / "shrunk"),
                         "--max-short-side", "12"]) == 0
    err = capsys.readouterr().err
    assert "scan.jpg" not in err and "scan.png: cannot decode image" in err
    assert "2 resized to a shorter side of 12 px" in err  # the scan and small.png
    info = load_dataset(tmp_path / "shrunk")
    scan = {s.key: s for s in read_samples(info.splits["labeled"].shards)}["a_scan"]
    got = decode_image(scan.image)  # what every stage reads: within the limit now
    assert tuple(got.shape) == (3, 12, 16)
    assert np.abs(got.float().mean((1, 2)).numpy() - [30, 140, 220]).max() < 6


def test_imagefolder_resize_options_are_checked(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    _photo_tree(src, 2)
    for args, says in ((["--jpeg-quality", "80"], "give --max-short-side too"),
                       (["--max-short-side", "8", "--jpeg-quality", "100"], "must be 1..95")):
        assert prepare_main(["imagefolder", str(src), "--out", str(tmp_path / "o"), *args]) == 2
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        prepare_main(["imagefolder", str(src), "--out", str(tmp_path / "o"),
                      "--max-short-side", "0"])
    assert e.value.code == 2
    assert "argument --max-short-side: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_imagefolder_shards_mix_the_classes(tmp_path: Path) -> None:
    """Files are written in a random order, not class folder by class folder: a training
    stream reads a shard at a time through a bounded shuffle buffer, so class-sorted shards
    would give it runs of one class."""
    from PIL import Image

    from pipeline.data import LabeledStream

    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(30):
            Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(src / cls / f"{i}.png")
    assert prepare_main(["imagefolder", str(src), "--out", str(tmp_path / "o"),
                         "--shard-size", "10"]) == 0
    info = load_dataset(tmp_path / "o")
    shards = info.splits["labeled"].shards
    assert len(shards) == 6
    assert all({s.label for s in read_samples([shard])} == {0, 1} for shard in shards)
    stream = iter(LabeledStream(shards, lambda x: x, shuffle_buffer=10, seed=1))
    labels = [next(stream)[1] for _ in range(120)]
    windows = [set(labels[i:i + 8]) for i in range(0, 120, 8)]
    assert sum(w == {0, 1} for w in windows) >= 12  # of 15 batches of 8; sorted shards: ~3
    again = tmp_path / "again"
    assert prepare_main(["imagefolder", str(src), "--out", str(again), "--shard-size", "10"]) == 0
    assert [x.key for x in read_samples(load_dataset(again).splits["labeled"].shards)] == [
        x.key for x in read_samples(shards)]  # the same seed, the same order
    other = tmp_path / "other"
    assert prepare_main(["imagefolder", str(src), "--out", str(other), "--shard-size", "10",
                         "--seed", "1"]) == 0
    assert [x.key for x in read_samples(load_dataset(other).splits["labeled"].shards)] != [
        x.key for x in read_samples(shards)]


def test_imagefolder_rerun_keeps_the_listed_shards_and_resumes_after_finished_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A prepare killed half-way leaves the dataset it was replacing as it was (dataset.json
    and every shard it lists, byte for byte); run again, it reads only the files after its
    finished shards and ends with the shards an uninterrupted run writes."""
    import pipeline.dataset as dataset

    old_src, src = tmp_path / "old", tmp_path / "src"
    _photo_tree(old_src, 6)
    _photo_tree(src, 24)  # + cut.jpg and notes.txt: 26 files, 24 images
    out = tmp_path / "ds"
    assert prepare_main(["imagefolder", str(old_src), "--out", str(out), "--shard-size", "5"]) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    listed = load_dataset(out).splits["labeled"].shards

    real, calls = dataset._read_job, []

    def dies_after_13(path: str, **kw):  # noqa: ANN003, ANN202
        calls.append(path)
        if len(calls) > 13:
            raise KeyboardInterrupt  # what Ctrl-C or a kill leaves: no clean-up of ours runs
        return real(path, **kw)

    monkeypatch.setattr(dataset, "_read_job", dies_after_13)
    assert prepare_main(["imagefolder", str(src), "--out", str(out), "--shard-size", "5"]) == 130
    assert "prepare: interrupted; run the same command again to continue" in (
        capsys.readouterr().err)
    for p, data in before.items():
        assert p.read_bytes() == data, p  # the old dataset still holds together
    assert load_dataset(out).splits["labeled"].shards == listed
    records = list((out / "labeled").glob("*.progress.json"))
    assert len(records) == 1
    done = json.loads(records[0].read_text())
    assert len(done["shards"]) == 2 and done["shards"] == [5, 5]
    assert 10 <= done["consumed"] <= 13

    calls.clear()
    monkeypatch.setattr(dataset, "_read_job", lambda path, **kw: calls.append(path)
                        or real(path, **kw))
    capsys.readouterr()
    assert prepare_main(["imagefolder", str(src), "--out", str(out), "--shard-size", "5"]) == 0
    err = capsys.readouterr().err
    assert len(calls) == 26 - done["consumed"]  # nothing finished is read again
    assert "2 shards of an interrupted run of this prepare are complete" in err
    assert "the 2 shards it listed before" in err and "left where they are" in err
    assert "cut.jpg: cannot decode image" in err and "notes.txt: cannot decode" in err
    assert not list((out / "labeled").glob("*.progress.json"))
    for p, data in before.items():
        if p.suffix == ".tar":
            assert p.read_bytes() == data  # not listed any more, but not deleted either

    clean = tmp_path / "clean"
    assert prepare_main(["imagefolder", str(src), "--out", str(clean), "--shard-size", "5"]) == 0
    resumed, fresh = load_dataset(out).splits["labeled"], load_dataset(clean).splits["labeled"]
    assert resumed.count == fresh.count == 24 and resumed.class_counts == fresh.class_counts
    assert [Path(p).name for p in resumed.shards] == [Path(p).name for p in fresh.shards]
    for a, b in zip(resumed.shards, fresh.shards, strict=True):
        assert Path(a).read_bytes() == Path(b).read_bytes()


def test_imagefolder_unusable_progress_record_starts_over(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    src = tmp_path / "src"
    _photo_tree(src, 8)
    assert prepare_main(["imagefolder", str(src), "--out", str(tmp_path / "a"),
                         "--shard-size", "3"]) == 0
    shards = load_dataset(tmp_path / "a").splits["labeled"].shards
    record = Path(shards[0]).with_name(Path(shards[0]).name.rsplit("-", 1)[0] + ".progress.json")
    record.write_text("{not json")
    other = record.with_name("labeled-0123456789.progress.json")
    other.write_text("{}")
    assert prepare_main(["imagefolder", str(src), "--out", str(tmp_path / "a"),
                         "--shard-size", "3"]) == 0
    err = capsys.readouterr().err
    assert f"{record} cannot be used (damaged, or its shards are gone); starting over" in err
    assert (f"{other} is left from an unfinished prepare of other files or options; its shards "
            "(labeled-0123456789-*.tar) are not used") in err
    assert load_dataset(tmp_path / "a").splits["labeled"].count == 8
    assert [Path(p).read_bytes() for p in load_dataset(tmp_path / "a").splits["labeled"].shards
            ] == [Path(p).read_bytes() for p in shards]


def brace(paths: Iterable[object]) -> str:
    """Several paths as one brace pattern, as a user would list them."""
    return "{" + ",".join(str(p) for p in paths) + "}"


@pytest.mark.slow
def test_register_with_worker_processes_counts_as_one_process(
        tmp_path: Path, digits_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Shards read by two worker processes give the dataset.json one process gives, the same
    damage line, and a key two shards share is still found."""
    import pipeline.dataset as dataset

    monkeypatch.setattr(dataset, "SHARDS_PER_WORKER", 1)
    monkeypatch.setattr(dataset, "PROGRESS_SECONDS", 0.0)
    test = sorted((digits_dir / "test").glob("*/*.tar"))
    broken = tmp_path / "broken.tar"
    broken.write_bytes(test[0].read_bytes()[:5000])  # a truncated copy: keys it shares, damage
    args = ["--labeled", str(digits_dir / "labeled" / "*" / "*.tar"),
            "--unlabeled", str(digits_dir / "unlabeled" / "*" / "*.tar"),
            "--test", brace(test[1:])]
    out: dict[str, str] = {}
    for workers in ("1", "2"):
        assert prepare_main(["register", *args, "--out", str(tmp_path / workers),
                             "--workers", workers]) == 0
        out[workers] = capsys.readouterr().err
    one, two = ({k: v for k, v in json.loads((tmp_path / w / "dataset.json").read_text()).items()
                 if k != "name"} for w in ("1", "2"))  # the name is the folder's
    assert one == two and one["splits"]["unlabeled"]["count"] == load_dataset(
        digits_dir).splits["unlabeled"].count
    assert "shards read" in out["2"] and "shards/s, about" in out["2"]  # progress, per shard
    assert "register: unlabeled: reading 11 shards with 2 processes" in out["2"]
    assert "processes" not in out["1"]
    bad = ["--labeled", str(digits_dir / "labeled" / "*" / "*.tar"), "--unlabeled",
           brace([broken, *(digits_dir / "unlabeled").glob("*/*.tar")]),
           "--test", brace(test[1:])]
    assert prepare_main(["register", *bad, "--out", str(tmp_path / "b"), "--workers", "2"]) == 0
    assert "register: unlabeled: 1 damaged samples will be skipped (e.g. " in (
        capsys.readouterr().err)
    dup = ["--labeled", str(digits_dir / "labeled" / "*" / "*.tar"), "--unlabeled",
           str(digits_dir / "unlabeled" / "*" / "*.tar"),
           "--test", brace([broken, *test])]
    assert prepare_main(["register", *dup, "--out", str(tmp_path / "d"), "--workers", "2"]) == 2
    assert "is in two shards" in capsys.readouterr().err


def test_the_last_line_names_dataset_json_by_its_absolute_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The same path for a new folder and an extended one (load_dataset makes it absolute)."""
    src = tmp_path / "src"
    _photo_tree(src, 2)
    monkeypatch.chdir(tmp_path)
    for split in ("labeled", "test"):
        assert prepare_main(["imagefolder", "src", "--out", "rel", "--split", split]) == 0
        assert f"prepare: wrote {tmp_path / 'rel' / 'dataset.json'} (" in capsys.readouterr().out


def test_dataset_json_records_samples_per_shard(tmp_path: Path, digits_dir: Path) -> None:
    """Every way of making a dataset records each shard's usable samples (training deals the
    shards by them), by shard, so that a hand-edited shard list keeps what still applies."""
    src = tmp_path / "src"
    _photo_tree(src, 11)
    assert prepare_main(["imagefolder", str(src), "--out", str(tmp_path / "f"),
                         "--shard-size", "4"]) == 0
    assert load_dataset(tmp_path / "f").splits["labeled"].shard_counts == [4, 4, 3]
    digits = load_dataset(digits_dir)
    for split in digits.splits.values():
        assert split.shard_counts == [sum(1 for _ in read_samples([s])) for s in split.shards]
    assert prepare_main(["register", "--labeled", str(digits_dir / "labeled" / "*" / "*.tar"),
                         "--unlabeled", str(digits_dir / "unlabeled" / "*" / "*.tar"),
                         "--test", str(digits_dir / "test" / "*" / "*.tar"),
                         "--out", str(tmp_path / "r")]) == 0
    registered = load_dataset(tmp_path / "r")
    assert all(registered.splits[s].shard_counts == digits.splits[s].shard_counts
               for s in digits.splits)
    # edited by hand: a shard removed keeps the others' counts; one added without a count
    # leaves the split's counts unknown (training deals its shards round-robin then)
    file = tmp_path / "r" / "dataset.json"
    doc = json.loads(file.read_text())
    removed = doc["splits"]["test"]["shards"].pop(0)
    assert removed in doc["splits"]["test"]["shard_counts"]
    doc["splits"]["labeled"]["shards"].append(removed)
    file.write_text(json.dumps(doc))
    edited = load_dataset(tmp_path / "r")
    assert edited.splits["test"].shard_counts == digits.splits["test"].shard_counts[1:]
    assert edited.splits["labeled"].shard_counts is None


def test_register_says_what_it_replaced_and_refuses_an_empty_pattern(
        tmp_path: Path, digits_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    out = tmp_path / "d"
    shutil.copytree(digits_dir, out)
    one = sorted((out / "unlabeled").glob("*/*.tar"))[0]
    assert prepare_main(["register", "--labeled", str(out / "labeled" / "*" / "*.tar"),
                         "--unlabeled", str(one), "--test", str(out / "test" / "*" / "*.tar"),
                         "--out", str(out)]) == 0
    assert ("register: replaced the dataset.json that was in "
            f"{out} (labeled 180 -> 180, unlabeled 1077 -> 100, test 540 -> 540); its held-out "
            "labels of the unlabeled split are dropped") in capsys.readouterr().err
    before = (out / "dataset.json").read_bytes()
    assert prepare_main(["register", "--labeled", "", "--unlabeled", str(one), "--test",
                         str(one), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == ("prepare: error: --labeled is empty; give shard "
                                               "paths, a glob or a brace pattern")
    assert (out / "dataset.json").read_bytes() == before
