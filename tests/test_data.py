"""Worker data streams: shard shares per reader, equal step counts, and the damage policy."""

from __future__ import annotations

import json
from collections import Counter
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


def _tear(shard: str) -> int:
    """Cuts ``shard`` in half; the index of the first sample lost."""
    from pipeline.shards import read_shard

    data = Path(shard).read_bytes()
    Path(shard).write_bytes(data[: len(data) // 2])
    return list(read_shard(shard))[-1].index


def test_a_torn_shard_counts_every_sample_it_lost_once(tmp_path: Path) -> None:
    """With the shard counts of dataset.json, a torn shard's tail counts the samples it took,
    against the limit and in the tally, once: evaluation reads whole shards; training readers
    that share the shard in runs each count their own run's loss."""
    from pipeline.data import merge_damage

    shards = _shards(tmp_path / "s", [0] * 24, maxcount=8)  # 3 shards of 8
    lost = 8 - _tear(shards[1])
    assert 0 < lost < 8
    found = len(list(LabeledStream(shards, _as_float, train=False, num_classes=1,
                                   weights=[8, 8, 8], damage_limit=1.0)))
    assert found == 24 - lost
    limit = (lost - 0.5) / 24  # below the loss, above the one entry it counted before
    with pytest.raises(ShardError, match=rf"test split: {lost} of 24 samples are damaged"):
        list(LabeledStream(shards, _as_float, train=False, num_classes=1, weights=[8, 8, 8],
                           damage_limit=limit, split="test"))
    folder = tmp_path / "damage"
    for rank in range(2):  # 24 samples cut into runs of 12: shard 1 is in both readers' runs
        it = iter(LabeledStream(shards, _as_float, rank=rank, world_size=2, num_classes=1,
                                weights=[8, 8, 8], shuffle_buffer=0, damage_dir=str(folder)))
        for _ in range(13):  # past the end of the first pass (12 samples at most)
            next(it)
    merged = merge_damage(folder)
    assert merged["bad"] == lost and merged["samples"] == 24


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
    # An earlier attempt with more readers left reader 2's tally (of other shards); a new
    # attempt's reader 0 removes it, or the driver would count its samples in as well.
    stale = folder / "reader-00002.json"
    stale.write_text(json.dumps({"shards": ["gone.tar"], "samples": 50, "bad": 9,
                                 "examples": [], "by_shard": {}}))
    assert merge_damage(folder)["samples"] == 56
    it = iter(LabeledStream(shards, _as_float, rank=0, world_size=2, num_classes=1,
                            shuffle_buffer=0, damage_dir=str(folder)))
    for _ in range(6):
        next(it)
    assert sorted(p.name for p in folder.glob("reader-*.json")) == [
        "reader-00000.json", "reader-00001.json"]
    assert merge_damage(folder)["samples"] == 6


def _four_shards(tmp: Path, bad: set[int]) -> list[str]:
    """4 shards of 100 8x8 images (labels 0/1); the samples in ``bad`` do not decode."""
    img = encode_png(np.zeros((8, 8, 3), np.uint8))
    samples = [(f"k{i:04d}", b"not an image" if i in bad else img, i % 2) for i in range(400)]
    return [str(p) for p, _ in write_shards(samples, tmp, prefix="d", maxcount=100)]


def test_the_damage_limit_is_a_share_of_the_split_not_of_a_readers_part(tmp_path: Path) -> None:
    """3 damaged images of 400 (0.75%, limit 1%), all in one shard: on 4 readers, the one
    holding that shard saw 3% of its part and stopped the round, which one reader passes."""
    shards = _four_shards(tmp_path / "a", bad={0, 1, 2})
    for rank in range(4):  # evaluation: each rank reads its own shard to the end
        list(LabeledStream(shards, _as_float, rank=rank, world_size=4, train=False,
                           num_classes=2, damage_limit=0.01, split="test", split_count=400))
        it = iter(LabeledStream(shards, _as_float, rank=rank, world_size=4, num_classes=2,
                                damage_limit=0.01, shuffle_buffer=0, split_count=400,
                                damage_dir=str(tmp_path / "tally")))
        for _ in range(250):  # training: past the first pass
            next(it)
    with pytest.raises(ShardError, match=r"test split: 3 of 100 samples are damaged \(3.0%"):
        list(LabeledStream(shards, _as_float, train=False, rank=0, world_size=4, num_classes=2,
                           damage_limit=0.01, split="test"))  # a part judged as the split
    # An earlier attempt on 1 reader left its tally of the same damage; a rerun on 4 readers
    # whose reader with the damaged shard finishes first counted it twice (6 of 400) and stopped.
    last = _four_shards(tmp_path / "c", bad={300, 301, 302})
    it = iter(LabeledStream(last, _as_float, num_classes=2, damage_limit=0.01, shuffle_buffer=0,
                            split_count=400, damage_dir=str(tmp_path / "rerun")))
    for _ in range(400):
        next(it)
    for rank in (3, 0, 1, 2):
        it = iter(LabeledStream(last, _as_float, rank=rank, world_size=4, num_classes=2,
                                damage_limit=0.01, shuffle_buffer=0, split_count=400,
                                damage_dir=str(tmp_path / "rerun")))
        for _ in range(150):
            next(it)
    from pipeline.data import merge_damage

    assert merge_damage(tmp_path / "rerun", readers=4)["bad"] == 3
    assert merge_damage(tmp_path / "rerun", readers=4)["samples"] == 400
    # 2 damaged in each shard: 8 of 400 (2%, limit 1.5%). No reader's part alone says the
    # split is past the limit; the tallies recorded so far do, once the last reader adds its own.
    spread = _four_shards(tmp_path / "b", bad={0, 1, 100, 101, 200, 201, 300, 301})
    for rank in range(4):
        it = iter(LabeledStream(spread, _as_float, rank=rank, world_size=4, num_classes=2,
                                damage_limit=0.015, shuffle_buffer=0, split_count=400,
                                damage_dir=str(tmp_path / "spread")))
        if rank < 3:
            for _ in range(250):
                next(it)
            continue
        with pytest.raises(ShardError, match=r"^labeled split: 8 of 400 samples are damaged "
                                             r"\(2.0% > --damage-limit 0.015\); worst shard "):
            for _ in range(250):
                next(it)


# ----------------------------------------------------------------------------- decoded cache


def _varied_shards(tmp: Path, n: int, bad: set[int] = frozenset(), maxcount: int = 5
                   ) -> list[str]:
    """n distinct 12x12 images (image i has value 10 i), labels i % 3; ``bad`` do not decode."""
    samples = [(f"k{i:02d}", b"garbage" if i in bad
                else encode_png(np.full((12, 12, 3), 10 * i, np.uint8)), i % 3)
               for i in range(n)]
    return [str(p) for p, _ in write_shards(samples, tmp, prefix="v", maxcount=maxcount)]


def _noisy() -> object:
    from pipeline.augment import RandAugment
    from pipeline.transforms import train_transform

    return train_transform(8, crop_scale=(0.5, 1.0), randaugment=RandAugment(2, 9))


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import pipeline.data as data

    reads: list[str] = []
    real = data.read_shard

    def counted(shard: str):
        reads.append(shard)
        return real(shard)

    monkeypatch.setattr(data, "read_shard", counted)
    return reads


def test_decoded_cache_replays_the_same_stream_without_reading_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three passes with the cache equal three passes without, image for image (RandAugment and
    crops included: the shuffles and the augmentation draw the same numbers), and the shards
    are read once, in the first pass only."""
    shards = _varied_shards(tmp_path, 23, bad={4, 17})
    reads = _count_reads(monkeypatch)

    def passes(cache_bytes: int) -> list[tuple[torch.Tensor, int, str]]:
        it = iter(LabeledStream(shards, _noisy(), num_classes=3, damage_limit=0.2,
                                shuffle_buffer=8, seed=5, cache_bytes=cache_bytes))
        return [next(it) for _ in range(3 * 21)]  # 21 good samples a pass

    plain = passes(0)
    assert len(reads) == 3 * len(shards)
    reads.clear()
    cached = passes(2**20)
    assert len(reads) == len(shards)  # the first pass only
    assert [(y, k) for _, y, k in cached] == [(y, k) for _, y, k in plain]
    assert all(torch.equal(a, b) for (a, _, _), (b, _, _) in zip(cached, plain, strict=True))
    assert [k for _, _, k in plain[:21]] != [k for _, _, k in plain[21:42]]  # reshuffled


def test_decoded_cache_keeps_the_damage_policy(tmp_path: Path) -> None:
    """Replayed passes meet the same damage: each pass is checked against the limit."""
    from pipeline.data import merge_damage

    shards = _varied_shards(tmp_path / "s", 10, bad={2, 6})
    strict = iter(LabeledStream(shards, _as_float, num_classes=3, damage_limit=0.1,
                                shuffle_buffer=0, cache_bytes=2**20))
    with pytest.raises(ShardError, match=r"labeled split: 2 of 10"):
        for _ in range(20):
            next(strict)
    folder = tmp_path / "damage"
    ok = iter(LabeledStream(shards, _as_float, num_classes=3, damage_limit=0.5,
                            shuffle_buffer=0, cache_bytes=2**20, damage_dir=str(folder)))
    keys = [next(ok)[2] for _ in range(16)]  # two passes of 8
    assert keys[:8] == keys[8:] and "k02" not in keys and "k06" not in keys
    assert merge_damage(folder)["bad"] == 2


def test_a_share_over_the_budget_is_streamed_and_the_cache_let_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.data import DecodedCache, _samples
    from pipeline.shards import Damage

    shards = _varied_shards(tmp_path, 12)  # 3 shards of 5, 5, 2 images of 432 bytes decoded
    cache = DecodedCache(budget=3000)  # room for the first shard (5 x 632), not the second
    first = [s.key for s in _samples(shards, Damage(), cache)]
    assert cache.full and cache.shards == {} and cache.used == 0
    reads = _count_reads(monkeypatch)
    again = [s.key for s in _samples(shards, Damage(), cache)]
    assert again == first and len(reads) == 3  # read again, every shard
    roomy = DecodedCache(budget=2**20)
    list(_samples(shards, Damage(), roomy))
    assert not roomy.full and len(roomy.shards) == 3 and roomy.used == 12 * (200 + 432)


def test_pseudo_stream_cache_replays_copies_without_reading_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    import pipeline.data as data
    from pipeline.data import PseudoStream

    shards = _varied_shards(tmp_path / "unl", 9, maxcount=3)
    out = tmp_path / "pseudo"
    out.mkdir()
    for n in range(3):
        keys = [f"k{3 * n + i:02d}" for i in range(3)]
        pq.write_table(pa.table({
            "key": keys, "copies": pa.array([n % 2, 2, 1], pa.int32()),  # some not selected
            "topk_index": pa.array([[0, 1]] * 3, pa.list_(pa.int32())),
            "topk_prob": pa.array([[0.75, 0.25]] * 3, pa.list_(pa.float16()))}),
            out / f"v-{n:06d}.parquet")
    reads = _count_reads(monkeypatch)
    label_reads: list[object] = []
    real_selected = data.read_selected
    monkeypatch.setattr(data, "read_selected",
                        lambda path: label_reads.append(path) or real_selected(path))

    def passes(cache_bytes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        it = iter(PseudoStream(shards, str(out), _noisy(), num_classes=3, temperature=1.0,
                               shuffle_buffer=4, seed=3, cache_bytes=cache_bytes))
        return [next(it) for _ in range(3 * 10)]  # 0+2+1, 1+2+1, 0+2+1 = 10 copies a pass

    plain = passes(0)
    assert len(reads) == len(label_reads) == 9
    reads.clear()
    label_reads.clear()
    cached = passes(2**20)
    assert len(reads) == len(label_reads) == 3
    assert all(torch.equal(a, b) and torch.equal(t, u)
               for (a, t), (b, u) in zip(cached, plain, strict=True))


def test_a_training_reader_with_nothing_usable_stops_instead_of_hanging(tmp_path: Path) -> None:
    """An endless stream whose share yields no sample would loop forever while the other ranks
    wait for it; an empty shard (or a share damaged past use with --damage-limit 1) is named."""
    import tarfile

    shards = _shards(tmp_path, [0, 1, 0, 1])
    empty = tmp_path / "s-empty.tar"
    tarfile.open(empty, "w").close()
    shards.append(str(empty))
    ok = iter(LabeledStream(shards, _as_float, rank=0, world_size=2, num_classes=2,
                            shuffle_buffer=0))
    assert [next(ok)[2] for _ in range(6)][:4] == ["k00", "k01", "k02", "k03"]
    stuck = iter(LabeledStream(shards, _as_float, rank=1, world_size=2, num_classes=2,
                               shuffle_buffer=0))
    with pytest.raises(ShardError, match=rf"^labeled split: shard\(s\) {empty} gave this reader "
                                         r"no usable sample \(0 damaged\); remove empty or "
                                         r"broken shards from dataset.json$"):
        next(stuck)
    broken = _shards(tmp_path / "b", [0, 1], bad={0, 1})
    with pytest.raises(ShardError, match=r"no usable sample \(2 damaged\)"):
        next(iter(LabeledStream(broken, _as_float, num_classes=2, damage_limit=1.0)))


def test_balanced_deals_by_weight_and_keeps_round_robin_for_equal_weights() -> None:
    from pipeline.data import balanced

    shards = [f"s{i}" for i in range(10)]
    weights = [9] + [1] * 9  # one shard selected whole, the rest lightly
    parts = balanced(shards, weights, 2)
    assert sorted(s for p in parts for s in p) == sorted(shards)  # each shard exactly once
    load = [sum(weights[shards.index(s)] for s in p) for p in parts]
    assert load == [9, 9]  # round-robin by position: 13 and 5
    assert [assign_shards(shards, r, 2, exhaustive=False) for r in range(2)] == \
        [shards[0::2], shards[1::2]]
    assert [assign_shards(shards, r, 2, exhaustive=False, weights=weights) for r in range(2)] \
        == parts
    # Equal weights: the round-robin of before, each part in the shards' order.
    assert balanced(shards, [3] * 10, 3) == [shards[0::3], shards[1::3], shards[2::3]]
    # Fewer shards than readers: the empty parts wrap around as before.
    assert [assign_shards(shards[:2], r, 4, exhaustive=False, weights=[5, 1])
            for r in range(4)] == [["s0"], ["s1"], ["s0"], ["s1"]]
    with pytest.raises(ValueError, match="2 weights for 3 shards"):
        balanced(shards[:3], [1, 1], 2)


def _pseudo_files(out: Path, selected: list[list[int]]) -> None:
    """One pseudo-label file per shard of 3 (``v-NNNNNN.parquet``), with the copies given."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir()
    for n, copies in enumerate(selected):
        pq.write_table(pa.table({
            "key": [f"k{3 * n + i:02d}" for i in range(3)], "copies": pa.array(copies, pa.int32()),
            "topk_index": pa.array([[0, 1]] * 3, pa.list_(pa.int32())),
            "topk_prob": pa.array([[0.75, 0.25]] * 3, pa.list_(pa.float16()))}),
            out / f"v-{n:06d}.parquet")


def test_pseudo_readers_repeat_samples_evenly_when_shards_are_dealt_by_copies(
        tmp_path: Path) -> None:
    """Each reader gives as many samples per step, so a reader dealt light shards repeats its
    samples more often; dealt by copies, every sample comes up in proportion to its copies."""
    from pipeline.data import PseudoStream

    shards = _varied_shards(tmp_path / "unl", 12, maxcount=3)  # 4 shards of 3
    out = tmp_path / "pseudo"
    _pseudo_files(out, [[2, 2, 2], [1, 1, 0], [1, 1, 0], [1, 1, 0]])  # copies: 6, 2, 2, 2

    def seen(rank: int, weights: list[int] | None, n: int = 48) -> Counter[int]:
        """Which images (by pixel value: image i is 10 i) the reader gives, how often."""
        it = iter(PseudoStream(shards, str(out), _as_float, num_classes=2, temperature=1.0,
                               rank=rank, world_size=2, shuffle_buffer=0, weights=weights))
        return Counter(round(next(it)[0].mean().item() / 10) for _ in range(n))

    # Round-robin: reader 0 has 8 copies a pass, reader 1 four, so images 6 and 7 come up half
    # as often as 3 and 4, though each has one copy.
    assert seen(0, None) == {0: 12, 1: 12, 2: 12, 6: 6, 7: 6}
    assert seen(1, None) == {3: 12, 4: 12, 9: 12, 10: 12}
    # Dealt by copies: 6 and 6, and each image comes up as often as its copies say.
    assert seen(0, [6, 2, 2, 2]) == {0: 16, 1: 16, 2: 16}
    assert seen(1, [6, 2, 2, 2]) == {3: 8, 4: 8, 6: 8, 7: 8, 9: 8, 10: 8}


def test_pseudo_readers_share_shards_by_runs_of_copies(tmp_path: Path) -> None:
    """Copies 6, 1, 1, 1 over 3 readers: whole shards give one reader 6 copies a pass and the
    others 2 and 1 (a copy of the last comes up 6x as often as one of the first). Cut into runs of the line of copies,
    each reader gives 3 a pass, a sample's copies may be split between two readers, and every
    copy is in exactly one run, read or replayed from the decoded cache alike."""
    from pipeline.data import PseudoStream, sampling_spread
    from pipeline.train_stage import spread_warning

    shards = _varied_shards(tmp_path / "unl", 12, maxcount=3)
    out = tmp_path / "pseudo"
    _pseudo_files(out, [[2, 2, 2], [1, 0, 0], [1, 0, 0], [1, 0, 0]])
    weights = [6, 1, 1, 1]
    assert sampling_spread(weights, 3) == 6.0 and sampling_spread(weights, 3, cut=True) == 1.0
    assert spread_warning("pseudo-labeled", weights, 3, 3, 0) is None

    def pass_of(rank: int, cache_bytes: int) -> list[Counter[int]]:
        it = iter(PseudoStream(shards, str(out), _as_float, num_classes=2, temperature=1.0,
                               rank=rank, world_size=3, shuffle_buffer=0, weights=weights,
                               cache_bytes=cache_bytes))
        draws = [round(next(it)[0].mean().item() / 10) for _ in range(9)]  # three passes
        return [Counter(draws[i:i + 3]) for i in (0, 3, 6)]

    for cache_bytes in (0, 2**20):
        runs = [pass_of(rank, cache_bytes) for rank in range(3)]
        assert [r[0] for r in runs] == [{0: 2, 1: 1}, {1: 1, 2: 2}, {3: 1, 6: 1, 9: 1}]
        assert all(r[0] == r[1] == r[2] for r in runs)  # every pass the same run
    # Fewer copies than can be cut evenly: the warning names them and the fix.
    assert spread_warning("pseudo-labeled", [3, 1, 1], 4, 2, 2) == (
        "warning: the pseudo-labeled split's 5 selected copies do not divide evenly among the "
        "4 training readers (2 workers x 2 loader processes): some samples come up 2.0x as "
        "often as others; fewer readers (--num-workers, --loader-workers) even this out")


def test_only_shards_with_selected_rows_are_dealt_to_pseudo_readers(tmp_path: Path) -> None:
    """A reader whose shards kept no pseudo-label (all below the threshold, an empty shard)
    had nothing to give and failed the round; the driver now deals out only shards with one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import PseudoStream
    from pipeline.pseudo_files import shards_with_selection

    shards = _varied_shards(tmp_path / "unl", 6, maxcount=3)  # v-000000, v-000001
    out = tmp_path / "pseudo"
    out.mkdir()
    for n, copies in enumerate([[1, 2, 1], [0, 0, 0]]):
        pq.write_table(pa.table({
            "key": [f"k{3 * n + i:02d}" for i in range(3)], "copies": pa.array(copies, pa.int32()),
            "topk_index": pa.array([[0, 1]] * 3, pa.list_(pa.int32())),
            "topk_prob": pa.array([[0.75, 0.25]] * 3, pa.list_(pa.float16()))}),
            out / f"v-{n:06d}.parquet")
    pq.write_table(pa.table({"key": pa.array([], pa.string()), "copies": pa.array([], pa.int32())}),
                   out / "v-000002.parquet")
    listed = [*shards, str(tmp_path / "unl" / "v-000002.tar")]
    assert shards_with_selection(listed, out) == ([shards[0]], [4])
    # The counts the manifest records answer without reading a file (a missing one here).
    recorded = {"v-000000.parquet": 4, "v-000001.parquet": 0, "v-000002.parquet": 0,
                "v-000003.parquet": 5}
    gone = [*listed, str(tmp_path / "unl" / "v-000003.tar")]
    assert shards_with_selection(gone, out, recorded) == ([shards[0], gone[-1]], [4, 5])
    with pytest.raises(FileNotFoundError):  # without the record, that file is read
        shards_with_selection(gone, out, {**recorded, "v-000003.parquet": None})

    def stream(rank: int, dealt: list[str]) -> PseudoStream:
        return PseudoStream(dealt, str(out), _as_float, num_classes=2, temperature=1.0,
                            rank=rank, world_size=2, shuffle_buffer=0)

    with pytest.raises(ValueError, match="no selected pseudo-labels"):  # before: rank 1 failed
        next(iter(stream(1, shards)))
    for rank in (0, 1):  # each reader now has selected rows to give
        it = iter(stream(rank, shards_with_selection(listed, out)[0]))
        assert [next(it)[1].argmax().item() for _ in range(8)] == [0] * 8


def test_pseudo_shards_that_share_a_stem_keep_their_files_when_one_has_no_selection(
        tmp_path: Path) -> None:
    """a/v-000000.tar and b/v-000000.tar are labeled into hashed files (their stems collide);
    when only b's has a selected row, the stream is dealt b alone, whose stem no longer
    collides: it used to look for v-000000.parquet and fail every attempt of the round."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import PseudoStream
    from pipeline.pseudo_files import pseudo_file_names
    from pipeline.train_stage import dealt_pseudo_shards

    made = _varied_shards(tmp_path / "src", 6, maxcount=3)  # v-000000 (k00-k02), v-000001
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    unlabeled = [str(shutil.copy(made[0], tmp_path / "a")),
                 str(shutil.copy(made[1], tmp_path / "b" / Path(made[0]).name))]
    names = pseudo_file_names(unlabeled)
    assert len(set(names.values())) == 2 and "v-000000.parquet" not in names.values()
    out = tmp_path / "pseudo"
    out.mkdir()
    for shard, first, copies in ((unlabeled[0], 0, [0, 0, 0]), (unlabeled[1], 3, [1, 1, 1])):
        pq.write_table(pa.table({
            "key": [f"k{first + i:02d}" for i in range(3)], "copies": pa.array(copies, pa.int32()),
            "topk_index": pa.array([[1, 0]] * 3, pa.list_(pa.int32())),
            "topk_prob": pa.array([[0.75, 0.25]] * 3, pa.list_(pa.float16()))}),
            out / names[shard])
    dealt = dealt_pseudo_shards(unlabeled, str(out), None)
    assert dealt == {"shards": [unlabeled[1]], "weights": [3],
                     "names": {unlabeled[1]: names[unlabeled[1]]}}
    it = iter(PseudoStream(dealt["shards"], str(out), _as_float, num_classes=2, temperature=1.0,
                           shuffle_buffer=0, weights=dealt["weights"], names=dealt["names"]))
    assert sorted(round(next(it)[0].mean().item() / 10) for _ in range(3)) == [3, 4, 5]


_PROBE = """
import json
import sys
import torch
from pipeline.data import LOADER_PRELOAD, make_loader
from tests.loader_probe import ModulesSeen
if sys.argv[1] == "plain":  # the control: forkserver workers without our preload
    torch.multiprocessing.get_context("forkserver").set_forkserver_preload([])
    loader = torch.utils.data.DataLoader(ModulesSeen(list(LOADER_PRELOAD)), batch_size=None,
                                         num_workers=1, multiprocessing_context="forkserver")
else:
    loader = make_loader(ModulesSeen(list(LOADER_PRELOAD)), 1, 1)
print(json.dumps(next(iter(loader)).flatten().tolist()))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("how", "seen"), [("make_loader", True), ("plain", False)])
def test_loader_workers_fork_with_the_pipeline_already_imported(how: str, seen: bool) -> None:
    """make_loader's workers start from a forkserver that has imported the streams' modules, so
    each new loader (a round starts several) does not import torch, torchvision and PIL again.
    In a fresh process: a forkserver started earlier in this one would keep its own preload."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _PROBE, how], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    flags = json.loads(out.stdout.strip().splitlines()[-1])
    assert flags == [seen] * len(flags) and len(flags) == 3


_START_PROBE = """
import json, sys, time
import psutil
from pipeline.data import LOADER_PRELOAD, make_loader, start_loader_server
from tests.loader_probe import ModulesSeen
if sys.argv[1] == "started":
    start_loader_server()
    start_loader_server()  # a second call starts nothing more
time.sleep(0.5)
before = [" ".join(p.cmdline()) for p in psutil.Process().children()]
seen = next(iter(make_loader(ModulesSeen(list(LOADER_PRELOAD)), 1, 1))).flatten().tolist()
print(json.dumps([sum("forkserver" in c for c in before), seen]))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("how", "servers"), [("started", 1), ("plain", 0)])
def test_loader_server_can_start_before_the_first_loader(how: str, servers: int) -> None:
    """start_loader_server (the Ray entry point calls it first) starts the forkserver at once,
    so its imports overlap the training worker's set-up instead of delaying the first batch;
    the loader made later forks from that server, with the pipeline preloaded. The control: no
    server until the first loader."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _START_PROBE, how], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found, seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == servers
    assert seen == [True] * len(seen) and len(seen) == 3


_EXIT_PROBE = """
import json, multiprocessing.util, os, sys
from pipeline.data import make_loader, release_loader_files
from tests.loader_probe import ModulesSeen
next(iter(make_loader(ModulesSeen([]), 1, 1)))  # starts this process's forkserver
folder = multiprocessing.util.get_temp_dir()
if sys.argv[1] == "release":
    release_loader_files()
print(json.dumps(folder), flush=True)
os._exit(0)  # as Ray ends a finished worker: no exit hooks
"""


@pytest.mark.slow
@pytest.mark.parametrize(("how", "left"), [("release", False), ("plain", True)])
def test_loader_socket_folder_is_removed_when_exit_hooks_do_not_run(how: str, left: bool) -> None:
    """A Ray training worker ends without exit hooks, so multiprocessing never removed the
    folder of its loaders' forkserver socket: one /tmp/pymp-* per round. The Ray entry point
    calls release_loader_files, which removes it; without it (the control) it stays."""
    import json
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _EXIT_PROBE, how], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    folder = Path(json.loads(out.stdout.strip().splitlines()[-1]))
    try:
        assert folder.name.startswith("pymp-")
        assert folder.exists() is left
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_training_streams_decode_large_jpegs_reduced_but_never_below_the_smallest_crop(
        tmp_path: Path, digits_info) -> None:
    """At 224 px with crops down to 8% of the area, a crop keeps 224 px a side as long as the
    shorter side is at least 915 px: a 4000x3000 photo is decoded at half size (2000x1500),
    a 1600x1200 one in full; --no-jpeg-dct-scaling decodes both in full."""
    import dataclasses
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_image

    from pipeline.batches import labeled_batches
    from pipeline.train import WorkerContext
    from pipeline.transforms import train_min_side
    from tests.test_train import tiny_job

    def jpeg(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(load_sample_image("china.jpg")).resize((w, h)).save(buf, "JPEG")
        return buf.getvalue()

    assert train_min_side(224, 0.08, True) == 915 and train_min_side(224, 0.08, False) is None
    shards = [str(p) for p, _ in write_shards([("big", jpeg(4000, 3000), 0),
                                               ("mid", jpeg(1600, 1200), 1)],
                                              tmp_path / "s", prefix="p")]

    def shapes(scaling: bool) -> set[tuple[int, ...]]:
        job = tiny_job(digits_info, tmp_path, jpeg_dct_scaling=scaling, crop_scale_min=0.08,
                       batch_size=1, shuffle_buffer=0)
        job = dataclasses.replace(job, labeled={"shards": shards, "count": 2},
                                  model={**job.model, "train_resolution": 224})
        it = labeled_batches(job, WorkerContext(), lambda x: torch.tensor(x.shape), seed=0)
        return {tuple(next(it)[0][0].tolist()) for _ in range(4)}

    assert shapes(True) == {(3, 1500, 2000), (3, 1200, 1600)}
    assert shapes(False) == {(3, 3000, 4000), (3, 1200, 1600)}

    # The pseudo-labeled stream of a student decodes the same way.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.batches import pseudo_batches
    from pipeline.config import StudentConfig
    from pipeline.pseudo_files import pseudo_file_names

    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    for name in pseudo_file_names(shards).values():
        pq.write_table(pa.table({
            "key": ["big", "mid"], "copies": pa.array([1, 1], pa.int32()),
            "topk_index": pa.array([[0, 1]] * 2, pa.list_(pa.int32())),
            "topk_prob": pa.array([[0.75, 0.25]] * 2, pa.list_(pa.float16()))}), pseudo / name)
    for scaling, big in ((True, (3, 1500, 2000)), (False, (3, 3000, 4000))):
        cfg = StudentConfig(run="t", data="x", jpeg_dct_scaling=scaling, crop_scale_min=0.08,
                            batch_size=1, unlabel_ratio=1.0, shuffle_buffer=0, loader_workers=0)
        job = dataclasses.replace(tiny_job(digits_info, tmp_path), config=cfg,
                                  pseudo={"shards": shards, "dir": str(pseudo), "count": 2},
                                  model={**tiny_job(digits_info, tmp_path).model,
                                         "train_resolution": 224})
        it = pseudo_batches(job, WorkerContext(), lambda x: torch.tensor(x.shape), seed=0)
        assert {tuple(next(it)[0][0].tolist()) for _ in range(4)} == {big, (3, 1200, 1600)}


def test_sampling_spread_of_whole_shards_over_readers() -> None:
    from pipeline.data import sampling_spread

    assert sampling_spread([100] * 4, 2) == 1.0
    assert sampling_spread([100] * 3, 2) == 2.0  # one reader holds two shards, the other one
    assert sampling_spread([1000, 1000, 10], 2) == pytest.approx(1010 / 1000)  # counts balance
    assert sampling_spread([100] * 10, 16) == 2.0  # six shards wrap onto a second reader
    assert sampling_spread([100] * 16, 16) == 1.0
    assert sampling_spread([100] * 64, 16) == 1.0
    assert sampling_spread([100] * 65, 16) == pytest.approx(5 / 4)
    assert sampling_spread([100, 0, 100], 2) == 1.0  # an empty shard draws nothing, not "0x"
    assert sampling_spread([], 4) == 1.0


def test_labeled_stream_deals_training_shards_by_sample_count(tmp_path: Path,
                                                               digits_info) -> None:
    """Training with dataset.json's shard_counts (the job's labeled weights): readers hold
    near-equal samples, not equal numbers of shards, in the training and the FixRes fine-tune
    streams; evaluation stays a partition by position."""
    import dataclasses

    import numpy as np

    from pipeline.batches import labeled_batches
    from pipeline.data import LabeledStream, assign_shards
    from pipeline.fixres import finetune_batches
    from pipeline.shards import encode_png, write_shards
    from pipeline.train import WorkerContext
    from tests.test_train import tiny_job

    image = encode_png(np.zeros((4, 4, 3), np.uint8))
    sizes = [6, 1, 1, 1, 1, 1, 1]
    shards = []
    for i, n in enumerate(sizes):
        (path, _), = write_shards(iter([(f"s{i}_{j}", image, 0) for j in range(n)]),
                                  tmp_path / f"d{i}", prefix=f"p{i}", maxcount=100)
        shards.append(str(path))
    assert assign_shards(shards, 0, 2, exhaustive=False, weights=sizes) == [shards[0]]
    assert assign_shards(shards, 1, 2, exhaustive=False, weights=sizes) == shards[1:]
    job = tiny_job(digits_info, tmp_path, batch_size=6, shuffle_buffer=0)
    job = dataclasses.replace(job, labeled={"shards": shards, "count": 12, "weights": sizes})
    second = WorkerContext(rank=1, world_size=2)
    for batches in (labeled_batches(job, second, lambda x: x, seed=0),
                    finetune_batches(job, second)):
        keys = next(iter(batches))[2]
        assert {k.split("_")[0] for k in keys} == {f"s{i}" for i in range(1, 7)}
    evaluation = LabeledStream(shards, lambda x: x, rank=0, world_size=2, weights=sizes,
                               train=False)
    assert {k.split("_")[0] for _, _, k in evaluation} == {"s0", "s2", "s4", "s6"}


def test_sample_ranges_cut_the_split_into_equal_runs() -> None:
    from pipeline.data import cuts_shards, sample_ranges

    weights = [100] * 10
    parts = sample_ranges(list(range(10)), weights, 16)
    runs = [sum((weights[i] if e is None else e) - f for i, f, e in p) for p in parts]
    assert set(runs) == {62, 63} and sum(runs) == 1000
    seen = Counter((i, j) for p in parts for i, f, e in p for j in range(f, e or weights[i]))
    assert len(seen) == 1000 and set(seen.values()) == {1}  # every sample in one run
    # the run holding a shard's last counted sample reads to the shard's end
    for i in range(10):
        runs_of_i = sorted((f, e) for p in parts for j, f, e in p if j == i)
        assert [e for _, e in runs_of_i].count(None) == 1 and runs_of_i[-1][1] is None
    assert sample_ranges("ab", [3, 5], 2) == [[("a", 0, None), ("b", 0, 1)], [("b", 1, None)]]
    # cut only where whole shards deal unevenly, the counts are known, and every reader can
    # have a sample
    assert cuts_shards([100] * 10, 16) and cuts_shards([100] * 3, 2)
    assert not cuts_shards([100] * 64, 16) and not cuts_shards([100], 2)  # even already
    assert not cuts_shards(None, 16) and not cuts_shards([5, 5], 16) and not cuts_shards([9], 1)


def test_labeled_training_readers_share_shards_by_sample_runs(tmp_path: Path) -> None:
    """3 shards over 2 readers (whole shards: one reader draws its samples twice as often):
    each reader's pass is its own run of the split, disjoint and equal in length; a count
    that fell behind its shard still reads the shard's extra samples."""
    from pipeline.data import sampling_spread

    shards = _shards(tmp_path, [0] * 12, maxcount=4)  # 3 shards of 4
    assert sampling_spread([4, 4, 4], 2) == 2.0
    assert sampling_spread([4, 4, 4], 2, cut=True) == 1.0
    passes = []
    for rank in (0, 1):
        stream = LabeledStream(shards, lambda x: x, rank=rank, world_size=2, weights=[4, 4, 4],
                               shuffle_buffer=0)
        it = iter(stream)
        passes.append([next(it)[2] for _ in range(12)])  # two passes of 6
    for p in passes:
        assert len(set(p[:6])) == 6 and set(p[:6]) == set(p[6:])
    assert not set(passes[0]) & set(passes[1])
    assert len(set(passes[0]) | set(passes[1])) == 12
    # counts of 3 (one behind each shard): the runs end at the shards' ends all the same
    got = []
    for rank in (0, 1):
        it = iter(LabeledStream(shards, lambda x: x, rank=rank, world_size=2,
                                weights=[3, 3, 3], shuffle_buffer=0))
        got.append({next(it)[2] for _ in range(14)})  # two passes or more
    assert [len(g) for g in got] == [5, 7] and len(got[0] | got[1]) == 12


def test_spread_warning_names_the_split_the_readers_and_the_fix() -> None:
    from pipeline.train_stage import spread_warning

    assert spread_warning("labeled", [100] * 64, 16, 2, 8) is None
    assert spread_warning("labeled", None, 16, 2, 8) is None  # an older dataset.json
    # whole shards would be uneven (2.0x), but the stream cuts them into runs of samples
    assert spread_warning("labeled", [100] * 10, 16, 2, 8) is None
    assert spread_warning("pseudo-labeled", [5, 1], 2, 2, 0) is None
    assert spread_warning("labeled", [10] * 5, 16, 2, 8) == (  # runs of 3 or 4
        "warning: the labeled split's 50 images do not divide evenly among the 16 training "
        "readers (2 workers x 8 loader processes): some samples come up 1.3x as often as others; "
        "fewer readers (--num-workers, --loader-workers) even this out")


def test_a_pseudo_label_file_damaged_after_labeling_is_one_line_naming_it(tmp_path: Path
                                                                         ) -> None:
    """The student's readers met a truncated file with pyarrow's traceback, and the job said to
    run the same command again, which failed the same way. A file gone is said so too."""
    from pipeline.data import PseudoStream
    from pipeline.pseudo_files import PseudoFileError

    shards = _varied_shards(tmp_path / "unl", 6, maxcount=3)
    out = tmp_path / "pseudo"
    _pseudo_files(out, [[1, 1, 1], [1, 1, 1]])
    damaged = sorted(out.glob("*.parquet"))[1]
    damaged.write_bytes(damaged.read_bytes()[:200])
    stream = PseudoStream(shards, str(out), _as_float, num_classes=2, temperature=1.0,
                          shuffle_buffer=0)
    with pytest.raises(PseudoFileError, match=rf"^pseudo-label file {damaged} cannot be read "
                                              r"\(.*\); it changed after the student started "
                                              r"training on it: restore it, or pass --force"):
        list(zip(range(12), iter(stream), strict=False))  # two passes: every file is read
    damaged.unlink()
    with pytest.raises(PseudoFileError, match=rf"^pseudo-label file {damaged} is gone since the "
                                              r"student started training on it; restore it"):
        list(zip(range(12), iter(stream), strict=False))
