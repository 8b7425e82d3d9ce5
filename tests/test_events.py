"""TensorBoard event files: written, readable, and harmless when they cannot be."""

from __future__ import annotations

import struct
from pathlib import Path

from pipeline.events import Events


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from every event file under ``folder`` (TFRecord framing: length,
    its crc, the Event protobuf, its crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_scalars_round_trip_and_skip_what_was_not_measured(tmp_path: Path) -> None:
    events = Events(tmp_path / "tb")
    events.scalars(1, {"train/loss": 0.5, "test/top1": None, "train/lr": float("nan")})
    events.scalars(2, {"train/loss": 0.25, "test/top1": 0.75})
    events.close()
    got = read_scalars(tmp_path / "tb")
    assert got["train/loss"] == [(1, 0.5), (2, 0.25)] and got["test/top1"] == [(2, 0.75)]
    assert "train/lr" not in got


def test_a_folder_that_cannot_be_made_only_warns(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    events = Events(tmp_path / "file" / "tb")  # a file in the way
    events.scalars(1, {"a": 1.0})
    events.close()
    assert "warning: no TensorBoard files" in capsys.readouterr().err
    Events(None).scalars(1, {"a": 1.0})  # off: nothing at all
