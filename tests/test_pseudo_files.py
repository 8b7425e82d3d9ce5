"""The pseudo-label file format: names, metadata, atomic writes, resume decisions, summaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.inference import KIND_OK
from pipeline.pseudo_files import (
    PSEUDO_SCHEMA,
    PseudoFileError,
    build_table,
    file_meta,
    pending_shards,
    pseudo_file_names,
    read_selected,
    summarize_files,
    write_table,
    write_truth_files,
)
from pipeline.storage import sha256_file
from tests.builders import fake_label_batch

META = {"format": 1, "teacher_sha256": "t" * 64, "k": 3, "batch_size": 64, "crop_fraction": None,
        "jpeg_dct_scaling": True}


def _file(path: Path, rows: int = 5, meta: dict | None = None, copies: list[int] | None = None
          ) -> dict:
    batch = fake_label_batch("/d/a.tar", np.arange(rows), np.full(rows, KIND_OK))
    table = build_table(batch)
    if copies is not None:
        import pyarrow as pa

        table = table.set_column(table.schema.get_field_index("copies"), "copies",
                                 pa.array(copies, pa.int32()))
    sha = write_table(path, table, {**(meta or META), "bad_count": 1,
                                    "bad_examples": [{"shard": "a", "key": "x", "reason": "r"}]})
    return {"sha": sha, "batch": batch}


def test_pseudo_file_names_disambiguate_equal_stems() -> None:
    names = pseudo_file_names(["/a/x-000.tar", "/b/x-000.tar", "/b/y.tar"])
    assert names["/b/y.tar"] == "y.parquet"
    assert names["/a/x-000.tar"] != names["/b/x-000.tar"]
    assert all(n.startswith("x-000-") for s, n in names.items() if "x-000" in s)


def test_write_is_whole_with_schema_meta_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    made = _file(path)
    assert made["sha"] == sha256_file(path)
    table = pq.read_table(path)
    assert table.schema.remove_metadata() == PSEUDO_SCHEMA
    assert table["key"].to_pylist() == list(made["batch"]["key"])
    assert table["copies"].to_pylist() == [0] * 5  # select fills them in
    assert file_meta(path)["batch_size"] == 64
    assert not list(tmp_path.glob(".*tmp"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    assert file_meta(tmp_path / "junk.parquet") is None


def test_files_made_with_other_byte_settings_are_labeled_again(tmp_path: Path) -> None:
    # The batch size decides the last bits of the probabilities: a resume with another one must
    # not mix files of both.
    names = {f"/d/{s}.tar": f"{s}.parquet" for s in "abcd"}
    _file(tmp_path / "a.parquet")
    _file(tmp_path / "b.parquet", meta={**META, "batch_size": 128})
    _file(tmp_path / "c.parquet", meta={**META, "teacher_sha256": "o" * 64})
    said: list[str] = []
    assert pending_shards(tmp_path, names, META, said.append) == ["/d/b.tar", "/d/c.tar",
                                                                 "/d/d.tar"]
    assert len(said) == 2 and all("labeling it again" in s for s in said)
    # Large JPEGs decoded reduced or in full give other pixels; a file from before the setting
    # was recorded decoded in full.
    older = {k: v for k, v in META.items() if k != "jpeg_dct_scaling"}
    _file(tmp_path / "b.parquet", meta={**META, "jpeg_dct_scaling": False})
    _file(tmp_path / "c.parquet", meta=older)
    _file(tmp_path / "d.parquet")
    assert pending_shards(tmp_path, names, META, said.append) == ["/d/b.tar", "/d/c.tar"]
    full = {**META, "jpeg_dct_scaling": False}
    assert pending_shards(tmp_path, names, full, said.append) == ["/d/a.tar", "/d/d.tar"]


@pytest.mark.parametrize("setting,other", [("k", 5), ("crop_fraction", 0.5),
                                           ("batch_size", 128), ("jpeg_dct_scaling", False)])
def test_each_setting_the_docs_name_relabels_on_change(tmp_path: Path, setting: str,
                                                       other: object) -> None:
    """README and docs/design.md: a resume with another top-k, batch size, crop fraction or
    JPEG decoding labels the shard again."""
    assert META[setting] != other
    _file(tmp_path / "a.parquet")
    assert pending_shards(tmp_path, {"/d/a.tar": "a.parquet"}, META, print) == []
    assert pending_shards(tmp_path, {"/d/a.tar": "a.parquet"}, {**META, setting: other},
                          print) == ["/d/a.tar"]


def test_summary_counts_rows_and_damage_and_names_missing_files(tmp_path: Path) -> None:
    _file(tmp_path / "a.parquet", rows=5)
    _file(tmp_path / "b.parquet", rows=3)
    out = summarize_files(tmp_path, ["a.parquet", "b.parquet"])
    assert out["rows"] == 8 and out["bad_samples"]["count"] == 2
    assert [f["rows"] for f in out["files"]] == [5, 3]
    with pytest.raises(PseudoFileError, match=r"c\.parquet is missing.*rerun the pseudo_label"):
        summarize_files(tmp_path, ["a.parquet", "c.parquet"])


def test_read_selected_keeps_rows_with_copies(tmp_path: Path) -> None:
    made = _file(tmp_path / "a.parquet", copies=[0, 2, 1, 0, 3])
    got = read_selected(tmp_path / "a.parquet")
    keys = list(made["batch"]["key"])
    assert sorted(got) == sorted([keys[1], keys[2], keys[4]])
    copies, idx, prob = got[keys[4]]
    assert copies == 3 and idx.tolist() == made["batch"]["topk_index"][4].tolist()
    np.testing.assert_allclose(prob, made["batch"]["topk_prob"][4].astype(np.float32))


def test_truth_files_are_one_hot_single_copies_and_refuse_unknown_keys(tmp_path: Path) -> None:
    rows = write_truth_files({"a.parquet": ["k1", "k2"]}, {"k1": 3, "k2": 7}, tmp_path)
    assert rows == 2
    t = pq.read_table(tmp_path / "a.parquet").to_pydict()
    assert t["copies"] == [1, 1] and t["topk_index"] == [[3], [7]]
    with pytest.raises(PseudoFileError, match="1 keys have no held-out label"):
        write_truth_files({"b.parquet": ["k1", "zz"]}, {"k1": 3}, tmp_path)



def test_confidence_summary_mean_and_binned_median(tmp_path: Path) -> None:
    from pipeline.pseudo_files import confidence_summary

    a, b = _file(tmp_path / "a.parquet", rows=5), _file(tmp_path / "b.parquet", rows=4)
    conf = np.concatenate([a["batch"]["confidence"], b["batch"]["confidence"]])
    got = confidence_summary([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    assert got["mean"] == pytest.approx(float(conf.mean()), rel=1e-6)
    assert abs(got["median"] - float(np.median(conf))) <= 1e-3 + 1e-9  # within one bin
    assert confidence_summary([]) == {"mean": None, "median": None}
    # an even count: the mean of the two middle values, not the lower one
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"confidence": pa.array([0.1, 0.2, 0.8, 0.9], pa.float32())}),
                   tmp_path / "even.parquet")
    assert confidence_summary([tmp_path / "even.parquet"])["median"] == pytest.approx(0.5,
                                                                                      abs=1e-3)
