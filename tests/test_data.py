"""Worker data streams: shard shares per reader, equal step counts, and the damage policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import LabeledStream, assign_shards, steps_per_epoch
from pipeline.shards import ShardError, encode_png, write_shards


def _shards(tmp: Path, labels: list[int], bad: set[int] = frozenset(), maxcount: int = 4
            ) -> list[str]:
    img = encode_png(np.full((8, 8, 3), 100, np.uint8))
    samples = [(f"k{i:02d}", b"garbage" if i in bad else img, label)
               for i, label in enumerate(labels)]
    return [str(p) for p, _ in write_shards(samples, tmp, prefix="s", maxcount=maxcount)]


def _as_float(img: torch.Tensor) -> torch.Tensor:
    return img.float()


def test_assign_shards_partition_and_wrap() -> None:
    shards = [f"s{i}" for i in range(5)]
    parts = [assign_shards(shards, r, 2, exhaustive=True) for r in range(2)]
    assert parts == [["s0", "s2", "s4"], ["s1", "s3"]]
    # more readers than shards: evaluation leaves some empty, training wraps around
    assert assign_shards(shards[:2], 3, 4, exhaustive=True) == []
    assert assign_shards(shards[:2], 3, 4, exhaustive=False) == ["s1"]
    assert all(assign_shards(shards[:1], r, 8, exhaustive=False) for r in range(8))
    with pytest.raises(ValueError, match="no shards"):
        assign_shards([], 0, 1, exhaustive=False)


def test_steps_per_epoch_equal_for_all_ranks() -> None:
    assert steps_per_epoch(180, 32, 1) == 6
    assert steps_per_epoch(180, 32, 2) == 3
    assert steps_per_epoch(5, 32, 4) == 1


def test_eval_stream_skips_and_counts_damage_then_checks_the_limit(tmp_path: Path) -> None:
    shards = _shards(tmp_path, [0, 1, 2, 9, 1, 0, 2, 1], bad={2})  # k02 garbage, k03 label 9
    stream = LabeledStream(shards, _as_float, train=False, num_classes=3, damage_limit=0.3,
                           split="test")
    got = [key for _, _, key in stream]
    assert got == ["k00", "k01", "k04", "k05", "k06", "k07"]  # 2 of 8 damaged: within 30%
    strict = LabeledStream(shards, _as_float, train=False, num_classes=3, damage_limit=0.1,
                           split="test")
    with pytest.raises(ShardError, match=r"test split: 2 of 8 samples are damaged .* worst "
                                         r"shard .*s-000000\.tar \(2 bad"):
        list(strict)


def test_training_stream_stops_after_its_first_pass_past_the_limit(tmp_path: Path) -> None:
    shards = _shards(tmp_path, [0] * 6, bad={1, 4})
    ok = iter(LabeledStream(shards, _as_float, num_classes=1, damage_limit=0.5,
                            shuffle_buffer=0))
    assert len([next(ok) for _ in range(12)]) == 12  # endless: passes repeat, damage skipped
    strict = iter(LabeledStream(shards, _as_float, num_classes=1, damage_limit=0.2,
                                shuffle_buffer=0))
    with pytest.raises(ShardError, match=r"labeled split: 2 of 6"):
        for _ in range(12):
            next(strict)


def test_truncated_labeled_shard_is_a_counted_loss_not_a_traceback(tmp_path: Path) -> None:
    shards = _shards(tmp_path, [0] * 8, maxcount=8)
    data = Path(shards[0]).read_bytes()
    Path(shards[0]).write_bytes(data[: len(data) // 2])
    stream = LabeledStream(shards, _as_float, train=False, num_classes=1, damage_limit=1.0)
    n = len(list(stream))
    assert 0 < n < 8
    with pytest.raises(ShardError, match="damaged"):
        list(LabeledStream(shards, _as_float, train=False, num_classes=1, damage_limit=0.0))


def test_evaluation_does_not_reseed_the_trainer(tmp_path: Path) -> None:
    shards = _shards(tmp_path, [0, 1])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(LabeledStream(shards, _as_float, train=False))
    assert torch.equal(torch.rand(3), expected)


def test_training_streams_record_their_first_pass_and_wrapped_readers_count_once(
        tmp_path: Path) -> None:
    from pipeline.data import merge_damage

    shards = _shards(tmp_path / "s", [0] * 6, bad={1}, maxcount=6)  # one shard, 1 of 6 bad
    folder = tmp_path / "damage"
    for rank in range(2):  # two ranks, one shard: both wrap around onto it
        it = iter(LabeledStream(shards, _as_float, rank=rank, world_size=2, num_classes=1,
                                shuffle_buffer=0, damage_dir=str(folder)))
        for _ in range(6):  # past the end of the first pass
            next(it)
    assert len(list(folder.glob("reader-*.json"))) == 2
    merged = merge_damage(folder)
    assert merged["samples"] == 6 and merged["bad"] == 1  # the shard once, not twice
    assert merged["examples"][0]["key"] == "k01"
    assert merge_damage(tmp_path / "none") is None
