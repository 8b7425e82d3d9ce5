"""The report's pure statistics, on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.report import calibration_bins, expected_calibration_error, median_from_histogram
from tests.test_report_tables import ECE_0, TEST_PRED_0


def test_ece_of_hand_computed_example():
    label, pred, conf = (np.array(x) for x in zip(*TEST_PRED_0, strict=True))
    assert expected_calibration_error(conf, label == pred) == pytest.approx(ECE_0)
    sums = calibration_bins(conf, label == pred)
    assert sums[0].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 2]
    assert expected_calibration_error(sums=sums) == pytest.approx(ECE_0)


def test_ece_bins_are_half_open_on_the_left_and_keep_zero_and_one():
    count, _, _ = calibration_bins(np.array([0.0, 1.0, 0.5]), np.array([True, True, True]))
    assert count[0] == 1 and count[-1] == 1 and count[7] == 1  # 0.5 in (7/15, 8/15]
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([1, 1])) == 0.0
    assert math.isnan(expected_calibration_error(np.array([]), np.array([])))


def test_median_from_fine_histogram_is_within_one_bin():
    rng = np.random.default_rng(0)
    values = rng.beta(5, 1, size=10_001)
    hist = np.bincount(np.minimum((values * 1000).astype(int), 999), minlength=1000)
    assert abs(median_from_histogram(hist)[0] - np.median(values)) <= 1e-3
    assert np.isnan(median_from_histogram(np.zeros((2, 1000)))).all()



@pytest.mark.parametrize("rows", [
    {"key": [], "label": []},  # no rows
    {"key": ["a", None], "label": [-1, 3]},  # none usable: no label, no key
])
def test_a_truth_index_with_no_usable_rows_is_empty_not_a_crash(tmp_path, rows):
    """A truth partition with no keys (an empty file, unusable rows, or a hash partition of a
    multi-pass scan that no key falls into) indexed one element too many and raised."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.report.stats import _TruthIndex

    path = tmp_path / "truth.parquet"
    pq.write_table(pa.table({"key": pa.array(rows["key"], pa.string()),
                             "label": pa.array(rows["label"], pa.int64())}), path)
    index = _TruthIndex.load(path, 0, 1)
    assert index.lookup(np.array([1, 2], dtype=np.uint64)).tolist() == [-1, -1]
    one = pa.table({"key": ["a", "b", "c"], "label": [0, 1, 2]})
    pq.write_table(one, path)
    parts = [_TruthIndex.load(path, p, 8) for p in range(8)]  # some partitions get no key
    assert sum(len(i.hashes) for i in parts) == 3
