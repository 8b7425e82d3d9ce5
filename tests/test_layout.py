from __future__ import annotations

from pathlib import Path

from pipeline.layout import RunLayout


def test_every_path_of_a_run_comes_from_the_layout(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "x" / "..", "r1")
    assert layout.root == tmp_path  # absolute and normalised
    assert layout.manifest_path(2) == tmp_path / "manifests" / "r1" / "round-2.json"
    assert layout.model_path(0) == tmp_path / "artifacts" / "r1" / "round-0" / "model.pt"
    assert layout.pseudo_dir(1) == tmp_path / "artifacts" / "r1" / "round-1" / "pseudo"
    assert layout.report_dir == tmp_path / "reports" / "r1"
    assert layout.test_predictions(1).name == "test_predictions.parquet"


def test_records_store_paths_under_the_root_relative(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "r")
    inside = layout.pseudo_dir(1)
    assert layout.relative(inside) == "artifacts/r/round-1/pseudo"
    assert layout.resolve("artifacts/r/round-1/pseudo") == inside
    outside = tmp_path.parent / "elsewhere" / "data"
    assert layout.relative(outside) == str(outside)
    assert layout.resolve(str(outside)) == outside
    moved = RunLayout(tmp_path / "moved", "r")  # a moved root resolves the same record
    assert moved.resolve(layout.relative(inside)) == tmp_path / "moved" / inside.relative_to(
        tmp_path)


def test_rounds_lists_only_round_files(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "r")
    layout.manifest_dir.mkdir(parents=True)
    for name in ("round-0.json", "round-2.json", "round-x.json", "notes.json"):
        (layout.manifest_dir / name).write_text("{}")
    assert layout.rounds() == [0, 2]
