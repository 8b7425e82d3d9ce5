"""Class-balanced selection: small hand-made tables, plus one realistic random table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.config import PseudoLabelConfig
from pipeline.inference import KIND_END
from pipeline.pseudo_files import PseudoFileError
from pipeline.pseudo_label import ShardAssembler
from pipeline.select import (
    ClassStats,
    SelectionPlan,
    apply_selection,
    class_stats,
    default_k,
    merge_stats,
    plan_selection,
    select_pseudo_labels,
)
from pipeline.storage import sha256_file
from tests.builders import fake_label_batch


def table(labels, confidences, shard: str = "s0", keys=None) -> pd.DataFrame:
    """A pseudo-label table with the columns selection reads (soft-label columns are not needed)."""
    n = len(labels)
    return pd.DataFrame(
        {
            "key": keys if keys is not None else [f"{shard}-{i:06d}" for i in range(n)],
            "shard": [shard] * n,
            "label": np.asarray(labels, dtype=np.int32),
            "confidence": np.asarray(confidences, dtype=np.float32),
        }
    )


def select(df: pd.DataFrame, num_classes: int, k: int | None = None, seed: int = 0, **kw):
    plan = plan_selection(class_stats(df, num_classes, **kw), k=k, seed=seed)
    return apply_selection(df, plan), plan


def random_table(n: int, num_classes: int, seed: int, shards: int = 1) -> pd.DataFrame:
    """Skewed class sizes and confidences piled up near 1, like a real teacher's output."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(num_classes, 0.5))
    labels = rng.choice(num_classes, size=n, p=weights)
    conf = 1.0 - rng.beta(0.5, 4.0, size=n) * 0.8
    shard = rng.integers(0, shards, size=n)
    return pd.DataFrame(
        {
            "key": [f"img{i:08d}" for i in range(n)],
            "shard": [f"shard-{s:04d}" for s in shard],
            "label": labels.astype(np.int32),
            "confidence": conf.astype(np.float32),
        }
    )


# --- statistics ----------------------------------------------------------------------------------


def test_threshold_filters_rows_below_it():
    df = table([0, 0, 0, 1, 1], [0.1, 0.29, 0.3, 0.31, 0.95])
    stats = class_stats(df, num_classes=2, threshold=0.3)
    assert stats.counts.tolist() == [1, 2]
    assert stats.total.tolist() == [3, 2]
    copies, _ = select(df, 2, k=2)
    assert copies.tolist() == [0, 0, 2, 1, 1]


def test_histogram_bins_confidence_on_threshold_to_one():
    df = table([0, 0, 0, 0], [0.3, 0.64, 0.66, 1.0])
    stats = class_stats(df, num_classes=1, threshold=0.3, num_bins=2)
    # [0.3, 0.65) -> bin 0; [0.65, 1] -> bin 1 (1.0 is in the top bin, not past it).
    # (0.65 itself is avoided: as float32 it is 0.6499999762, just below the edge.)
    assert stats.hist.tolist() == [[2, 2]]


def test_confidence_slightly_above_one_goes_to_top_bin():
    df = table([0], [np.float32(1.0) + np.float32(1e-6)])
    assert class_stats(df, 1, num_bins=8).hist[0, -1] == 1


def test_merge_is_commutative_and_associative():
    parts = [random_table(300, 5, seed=s) for s in range(3)]
    a, b, c = (class_stats(p, 5, num_bins=64) for p in parts)
    left = a.merge(b).merge(c)
    right = a.merge(b.merge(c))
    swapped = c.merge(a).merge(b)
    whole = class_stats(pd.concat(parts), 5, num_bins=64)
    for other in (right, swapped, merge_stats([b, c, a]), whole):
        np.testing.assert_array_equal(left.hist, other.hist)
        np.testing.assert_array_equal(left.total, other.total)


def test_merge_refuses_different_settings():
    df = table([0], [0.9])
    with pytest.raises(ValueError, match="different settings"):
        class_stats(df, 2).merge(class_stats(df, 2, threshold=0.5))
    with pytest.raises(ValueError, match="different settings"):
        class_stats(df, 2).merge(class_stats(df, 3))


def test_merge_stats_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        merge_stats([])


def test_label_outside_classes_is_a_clear_error():
    with pytest.raises(ValueError, match="num_classes"):
        class_stats(table([0, 3], [0.9, 0.9]), num_classes=3)


def test_missing_column_is_a_clear_error():
    with pytest.raises(ValueError, match="missing"):
        class_stats(pd.DataFrame({"label": [0]}), num_classes=1)


def test_stats_arrays_are_read_only():
    stats = class_stats(table([0], [0.9]), 1)
    with pytest.raises(ValueError):
        stats.hist[0, 0] = 5


# --- default K -----------------------------------------------------------------------------------


def test_default_k_is_median_of_nonempty_classes():
    assert default_k(np.array([0, 10, 20, 1000, 0])) == 20
    assert default_k(np.array([3, 4])) == 4  # 3.5 rounds up
    assert default_k(np.array([0, 1, 0])) == 1
    assert default_k(np.array([0, 0])) == 0
    assert default_k(np.array([], dtype=np.int64)) == 0


def test_plan_uses_default_k_when_unset():
    df = table([0] * 5 + [1] * 10 + [2] * 20, [0.9] * 35)
    plan = plan_selection(class_stats(df, 4))
    assert plan.k == 10


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_plan_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        plan_selection(class_stats(table([0], [0.9]), 1), k=k)


# --- top-K and duplication -----------------------------------------------------------------------


def test_top_k_keeps_exactly_the_most_confident_rows():
    rng = np.random.default_rng(0)
    conf = rng.permutation(np.linspace(0.31, 0.99, 50))  # distinct, more than a bin apart
    df = table([0] * 50, conf)
    copies, plan = select(df, 1, k=7)
    expected = np.zeros(50, dtype=np.int32)
    expected[np.argsort(-conf)[:7]] = 1
    np.testing.assert_array_equal(copies, expected)
    assert plan.keep_frac[0] == 1.0  # K fell on a bin edge: no random boundary


def test_boundary_bin_is_kept_in_part():
    # All 100 rows share one bin, so which 40 survive is a hash draw; 40 in expectation.
    df = table([0] * 100, [0.8] * 100)
    copies, plan = select(df, 1, k=40, num_bins=16)
    assert plan.keep_frac[0] == pytest.approx(0.4)
    assert set(np.unique(copies)) <= {0, 1}
    assert abs(int(copies.sum()) - 40) <= 15  # ~3 binomial standard deviations (sqrt(24) ~ 4.9)


def test_small_class_is_duplicated_up_to_k():
    n, k = 7, 100
    copies, plan = select(table([0] * n, np.linspace(0.4, 0.9, n)), 1, k=k)
    low, high = math.floor(k / n), math.ceil(k / n)
    assert set(copies.tolist()) <= {low, high}
    assert abs(int(copies.sum()) - k) <= n  # each row rounds by less than one copy
    assert plan.copy_factor[0] == pytest.approx(k / n)


def test_copies_sum_to_k_on_average_over_seeds():
    n, k = 7, 100
    df = table([0] * n, [0.9] * n)
    sums = [int(select(df, 1, k=k, seed=s)[0].sum()) for s in range(200)]
    assert abs(np.mean(sums) - k) < 0.5


def test_exact_multiple_has_no_random_rounding():
    copies, _ = select(table([0] * 4, [0.5, 0.6, 0.7, 0.8]), 1, k=12)
    assert copies.tolist() == [3, 3, 3, 3]


def test_class_with_exactly_k_rows_is_used_once_each():
    copies, _ = select(table([0] * 5, [0.5, 0.6, 0.7, 0.8, 0.9]), 1, k=5)
    assert copies.tolist() == [1] * 5


def test_class_with_zero_rows_is_handled():
    df = table([0, 0, 2, 2, 2], [0.9, 0.8, 0.7, 0.6, 0.5])
    copies, plan = select(df, 4, k=3)
    assert plan.counts.tolist() == [2, 0, 3, 0]
    summary = plan.to_dict()["per_class"]
    assert summary["1"] == {"kept": 0, "copies": 0}
    assert summary["3"] == {"kept": 0, "copies": 0}
    assert copies[2:].tolist() == [1, 1, 1]
    # A class with no rows in the statistics selects nothing even if a stray row shows up later.
    assert apply_selection(table([1], [0.99]), plan).tolist() == [0]


def test_class_with_only_rows_below_threshold_is_empty():
    df = table([0, 1, 1], [0.9, 0.1, 0.2])
    copies, plan = select(df, 2, k=2)
    assert plan.counts.tolist() == [1, 0]
    assert copies.tolist() == [2, 0, 0]


def test_kept_count_per_class_is_close_to_k_on_a_realistic_table():
    num_classes, k = 20, 300
    df = random_table(40_000, num_classes, seed=1)
    copies, plan = select(df, num_classes, k=k)
    stats_counts = plan.counts
    labels = df["label"].to_numpy()
    conf = df["confidence"].to_numpy()
    for c in range(num_classes):
        mine = labels == c
        kept = int((copies[mine] > 0).sum())
        used = int(copies[mine].sum())
        if stats_counts[c] > k:
            assert abs(kept - k) <= 5, (c, kept)  # boundary bins are small at 4096 bins
            assert used == kept
            # Nothing kept is less confident than anything dropped, beyond one bin's width.
            kept_conf = conf[mine & (copies > 0)]
            dropped = conf[mine & (copies == 0) & (conf >= 0.3)]
            assert kept_conf.min() >= dropped.max() - (0.7 / 4096) - 1e-6
        elif stats_counts[c] > 0:
            assert kept == stats_counts[c]
            assert abs(used - k) <= 3 * math.sqrt(stats_counts[c]) + 1, (c, used)


def test_kept_count_is_exact_without_ties():
    # Distinct confidences, each class bigger than K: every bin has at most one row per class.
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 60)
    conf = rng.permutation(0.3 + 0.7 * (np.arange(240) + 0.5) / 240)
    copies, _ = select(table(labels, conf), 4, k=25)
    for c in range(4):
        assert int(copies[labels == c].sum()) == 25


# --- determinism ---------------------------------------------------------------------------------


def test_same_seed_same_result_other_seed_other_result():
    df = random_table(5_000, 10, seed=2)
    a, _ = select(df, 10, k=200, seed=7)
    b, _ = select(df, 10, k=200, seed=7)
    c, _ = select(df, 10, k=200, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_result_does_not_depend_on_row_order():
    df = random_table(5_000, 10, seed=3)
    copies, _ = select(df, 10, k=200)
    order = np.random.default_rng(0).permutation(len(df))
    shuffled, _ = select(df.iloc[order].reset_index(drop=True), 10, k=200)
    np.testing.assert_array_equal(copies[order], shuffled)


def test_shards_give_the_same_result_as_the_whole_table():
    num_classes, k = 10, 150
    df = random_table(6_000, num_classes, seed=4, shards=3)
    whole, _ = select(df, num_classes, k=k, seed=5)

    parts = [part for _, part in df.groupby("shard", sort=False)]
    stats = merge_stats(class_stats(p, num_classes) for p in reversed(parts))
    plan = plan_selection(stats, k=k, seed=5)
    by_part = pd.concat(
        [pd.Series(apply_selection(p, plan), index=p.index) for p in parts]
    ).sort_index()
    np.testing.assert_array_equal(whole, by_part.to_numpy())


def test_same_key_in_two_shards_draws_independently():
    # WebDataset keys are often only unique per shard; the shard name separates their draws.
    keys = [f"{i:06d}" for i in range(200)]
    a = table([0] * 200, [0.9] * 200, shard="a", keys=keys)
    b = table([0] * 200, [0.9] * 200, shard="b", keys=keys)
    plan = plan_selection(class_stats(pd.concat([a, b]), 1), k=200)
    assert not np.array_equal(apply_selection(a, plan), apply_selection(b, plan))


def test_empty_shard_is_handled():
    empty = table([], [])
    stats = class_stats(empty, 3)
    assert stats.counts.tolist() == [0, 0, 0]
    assert stats.rows == 0
    full = table([0, 1], [0.9, 0.8])
    merged = merge_stats([stats, class_stats(full, 3)])
    np.testing.assert_array_equal(merged.hist, class_stats(full, 3).hist)
    plan = plan_selection(merged, k=2)
    out = apply_selection(empty, plan)
    assert out.dtype == np.int32 and out.shape == (0,)


def test_all_empty_selects_nothing():
    plan = plan_selection(class_stats(table([], []), 3))
    assert plan.k == 0
    assert plan.to_dict()["selected_with_copies"] == 0


# --- plan summary --------------------------------------------------------------------------------


def test_plan_to_dict_is_json_and_matches_expectations():
    df = table([0] * 10 + [1] * 2, np.linspace(0.35, 0.95, 12))
    plan = plan_selection(class_stats(df, 3), k=4, seed=9)
    assert isinstance(plan, SelectionPlan)
    summary = json.loads(json.dumps(plan.to_dict()))
    assert summary["threshold"] == pytest.approx(0.3)
    assert summary["k"] == 4
    assert summary["per_class"] == {
        "0": {"kept": 4, "copies": 4},
        "1": {"kept": 2, "copies": 4},
        "2": {"kept": 0, "copies": 0},
    }
    assert summary["kept"] == 6
    assert summary["selected_with_copies"] == 8


def test_copies_dtype_and_alignment():
    df = table([0, 1, 0], [0.9, 0.2, 0.8])
    df.index = [10, 5, 7]  # a non-default index must not matter: output follows row order
    copies, _ = select(df, 2, k=2)
    assert copies.dtype == np.int32
    assert copies.tolist() == [1, 0, 1]


def test_class_stats_is_a_dataclass_type():
    assert isinstance(class_stats(table([0], [0.9]), 1), ClassStats)


def test_selection_does_not_depend_on_where_the_shards_live() -> None:
    rng = np.random.default_rng(5)
    n = 400
    df = pd.DataFrame({"key": [f"k{i}" for i in range(n)], "label": rng.integers(0, 4, n),
                       "confidence": rng.uniform(0.3, 1.0, n).astype(np.float32)})
    plan = plan_selection(class_stats(df.assign(shard="a/s-0.tar"), 4), k=150, seed=1)
    here = apply_selection(df.assign(shard="/data/v1/s-0.tar"), plan)
    there = apply_selection(df.assign(shard="/mnt/other/s-0.tar"), plan)
    other_shard = apply_selection(df.assign(shard="/data/v1/s-1.tar"), plan)
    np.testing.assert_array_equal(here, there)
    assert not np.array_equal(here, other_shard)  # the shard name still counts


# ----------------------------------------------------------------------------- over the files


def read_all(out_dir: Path) -> dict[str, pd.DataFrame]:
    return {p.name: pq.read_table(p).to_pandas() for p in sorted(out_dir.glob("*.parquet"))}


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
        p.name: sha256_file(p) for p in tmp_path.glob("*.parquet")}
    # Per file, what the training readers are dealt by (without reading the files again).
    assert {f["name"]: (f["kept"], f["copies"]) for f in result["files"]} == {
        name: (int((t["copies"] > 0).sum()), int(t["copies"].sum())) for name, t in tables.items()}
    assert sum(f["copies"] for f in result["files"]) == result["selected_with_copies"]
    again = select_pseudo_labels(tmp_path, 3, cfg, classes=["a", "b", "c"],
                                 progress=lambda _: None)
    assert again == result  # idempotent: same plan, files untouched


def test_select_without_files_says_which_stage_to_run(tmp_path: Path) -> None:
    with pytest.raises(PseudoFileError, match="no pseudo-label files .* run the pseudo_label"):
        select_pseudo_labels(tmp_path, 3, PseudoLabelConfig(), progress=lambda _: None)
