"""The round record (manifest schema 1, docs/design.md): the lineage of a run, one JSON file a round.

``manifests/<run>/round-<N>.json`` is read and written only as a :class:`RoundRecord`: one creator
(:func:`new_round`), one load-and-validate (:func:`load_round`), one save (:func:`save_round`,
atomic: temp file, fsync, rename, so a crash mid-write leaves the previous record intact), and one
lookup of a round's parent (:func:`load_parent`). The JSON keys are the schema's; a record written
by an older version of this tool loads, and unknown keys are kept as they are.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import shlex
import subprocess
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.fs import S3Path, location
from pipeline.layout import RunLayout
from pipeline.storage import atomic_write_json, sha256_file

SCHEMA_VERSION = 1
ROLES = ("teacher", "student")
STATUSES = ("running", "complete", "failed")
STAGES = ("preflight", "pseudo_label", "select", "train", "finetune", "evaluate")
REQUIRED_KEYS = (
    "schema", "run", "round", "role", "status", "created_at", "finished_at", "code", "config",
    "model", "data", "stages", "checkpoint", "metrics", "history", "cluster",
)
STUDENT_KEYS = ("teacher", "pseudo_labels")


class ManifestError(UserError, ValueError):
    """A manifest is missing, unreadable or does not follow the schema."""


# ----------------------------------------------------------------------------- parts


def _from(cls: type, raw: Any, source: str, what: str) -> Any:
    """A dataclass from a JSON object; unknown keys are dropped, missing required ones refused,
    and a value of the wrong JSON type too (a hand edit would otherwise fail much later)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{source}: '{what}' must be an object, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    _check_types(cls, raw, source, what)
    try:
        return cls(**{k: v for k, v in raw.items() if k in names})
    except TypeError as e:
        raise ManifestError(f"{source}: '{what}' is incomplete ({e})") from None


def _check_types(cls: type, raw: Mapping[str, Any], source: str, what: str = "") -> None:
    """Each of ``raw``'s values for a field of ``cls`` of the JSON type its annotation says."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        container = typing.get_origin(hints[f.name]) in (list, dict)
        if raw.get(f.name) is None and not container:
            continue  # a number or text not recorded (yet): the readers allow for it
        if f.name in raw and not _typed(raw[f.name], hints[f.name]):
            where = f"{what}.{f.name}" if what else f.name
            raise ManifestError(f"{source}: '{where}' must be {_describe(hints[f.name])}, got "
                                f"{json.dumps(raw[f.name], default=str)[:40]}")


def _typed(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_typed(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_typed(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, Mapping | hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             type(None): "null", list: "a list", dict: "an object"}
    return names.get(origin or hint, "an object")


@dataclass
class ModelRecord:
    name: str
    params: int
    train_resolution: int
    test_resolution: int
    dropout: float | None = None
    drop_path: float | None = None
    options: dict[str, Any] = field(default_factory=dict)  # create_model's extra arguments


@dataclass
class TeacherRef:
    """Round N-1 as round N found it: its record's and its model file's sha256."""

    round: int
    manifest_sha256: str
    checkpoint_sha256: str
    model: str | None = None
    top1: float | None = None


@dataclass
class DataRef:
    dataset: str
    dataset_sha256: str
    labeled: int = 0
    unlabeled: int = 0
    test: int = 0


@dataclass
class FileRef:
    uri: str  # relative to the root when under it
    sha256: str


@dataclass
class PseudoFile:
    name: str
    rows: int | None = None  # None: not recorded (a folder listed by the report)
    sha256: str = ""
    kept: int | None = None  # rows selection kept; None: a manifest from before this count
    copies: int | None = None  # their copies summed (what the file gives a pass of training)


@dataclass
class PseudoLabels:
    """What stage select made: the files, with counts, and the settings used."""

    uri: str
    files: list[PseudoFile]
    rows: int
    kept: int
    selected_with_copies: int
    threshold: float
    k: int | None = None
    seed: int | None = None
    rows_above_threshold: int | None = None
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any, source: str) -> PseudoLabels | None:
        pl = _from(cls, raw, source, "pseudo_labels")
        if pl is not None:
            pl.files = [_from(PseudoFile, f, source, "pseudo_labels.files") for f in pl.files]
        return pl


@dataclass
class Metrics:
    """On the test split; ``teacher_top1`` is round N-1's, for comparison."""

    top1: float | None = None
    top5: float | None = None
    loss: float | None = None
    n: int | None = None
    teacher_top1: float | None = None


@dataclass
class StageRecord:
    """A stage's status and time; ``info`` holds what that stage records (rows, files, damage)."""

    status: str
    seconds: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.seconds is not None:
            out["seconds"] = self.seconds
        return {**out, **self.info}

    @classmethod
    def from_json(cls, raw: Any, source: str, name: str) -> StageRecord:
        if not isinstance(raw, Mapping) or raw.get("status") not in STATUSES:
            raise ManifestError(f"{source}: stage {name!r} needs a status, one of "
                                f"{', '.join(STATUSES)}")
        seconds = raw.get("seconds")
        if seconds is not None and not _typed(seconds, float):
            raise ManifestError(f"{source}: stage {name!r}: 'seconds' must be a number, got "
                                f"{json.dumps(seconds)[:40]}")
        info = {k: v for k, v in raw.items() if k not in ("status", "seconds")}
        return cls(status=raw["status"], seconds=raw.get("seconds"), info=info)


# ----------------------------------------------------------------------------- the record


@dataclass
class RoundRecord:
    run: str
    round: int
    role: str
    status: str
    created_at: str
    finished_at: str | None
    code: dict[str, Any]
    config: dict[str, Any]
    model: ModelRecord | None
    data: DataRef | None
    cluster: dict[str, Any]
    stages: dict[str, StageRecord] = field(default_factory=dict)
    checkpoint: FileRef | None = None
    metrics: Metrics = field(default_factory=Metrics)
    history: list[dict[str, Any]] = field(default_factory=list)
    teacher: TeacherRef | None = None
    pseudo_labels: PseudoLabels | None = None
    init: dict[str, Any] | None = None  # the file the weights started from, when not random
    events: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: list[dict[str, Any]] | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of other versions, kept as read

    # -- stages
    def stage(self, name: str) -> StageRecord | None:
        return self.stages.get(name)

    def stage_complete(self, name: str) -> bool:
        s = self.stages.get(name)
        return s is not None and s.status == "complete"

    def set_stage(self, name: str, status: str, *, seconds: float | None = None,
                  **info: Any) -> StageRecord:
        """Record a stage's status (and what it measured); earlier fields of it are kept."""
        if status not in STATUSES:
            raise ManifestError(f"stage status must be one of {', '.join(STATUSES)}, "
                                f"got {status!r}")
        s = self.stages.setdefault(name, StageRecord(status))
        s.status = status
        if seconds is not None:
            s.seconds = round(float(seconds), 3)
        s.info.update(info)
        return s

    # -- lifecycle
    def add_event(self, event: str, **fields: Any) -> None:
        """Append a timestamped line to ``events`` (starts, resumes, failures)."""
        self.events.append({"at": now_iso(), "event": event, **fields})

    def mark_running(self) -> None:
        self.status, self.finished_at, self.error = "running", None, None

    def mark_complete(self) -> None:
        self.status, self.finished_at = "complete", now_iso()

    def mark_failed(self, error: str) -> None:
        self.status, self.finished_at, self.error = "failed", now_iso(), error

    # -- JSON
    def to_json(self) -> dict[str, Any]:
        def obj(x: Any) -> Any:
            return dataclasses.asdict(x) if x is not None else None

        out: dict[str, Any] = {
            "schema": SCHEMA_VERSION, "run": self.run, "round": self.round, "role": self.role,
            "status": self.status, "created_at": self.created_at,
            "finished_at": self.finished_at, "code": self.code, "config": self.config,
            "model": obj(self.model) or {}, "data": obj(self.data) or {},
            "stages": {k: self.stages[k].to_json() for k in sorted(self.stages, key=_stage_order)},
            "checkpoint": obj(self.checkpoint),
            "metrics": {k: v for k, v in dataclasses.asdict(self.metrics).items()
                        if v is not None},
            "history": self.history, "cluster": self.cluster,
        }
        if self.round >= 1:
            out["teacher"] = obj(self.teacher)
            out["pseudo_labels"] = obj(self.pseudo_labels)
        optional = {"init": self.init, "events": self.events or None,
                    "resumed_from": self.resumed_from, "error": self.error}
        out.update({k: v for k, v in optional.items() if v is not None})
        return {**self.extra, **out}

    @classmethod
    def from_json(cls, m: Any, source: str = "manifest") -> RoundRecord:
        """Validate a parsed manifest; raises ManifestError naming the first problem."""
        _check_header(m, source)
        _check_types(cls, {k: v for k, v in m.items() if v is not None}, source)
        model = m["model"] or None  # {} when stage pseudo_label made the record alone
        known = {f.name for f in dataclasses.fields(cls)} | {"schema"}
        rec = cls(
            run=m["run"], round=m["round"], role=m["role"], status=m["status"],
            created_at=m["created_at"], finished_at=m["finished_at"], code=m["code"] or {},
            config=m["config"] or {}, model=_from(ModelRecord, model, source, "model"),
            data=_from(DataRef, m["data"] or None, source, "data"), cluster=m["cluster"] or {},
            stages={k: StageRecord.from_json(v, source, k) for k, v in m["stages"].items()},
            checkpoint=_from(FileRef, m["checkpoint"], source, "checkpoint"),
            metrics=_from(Metrics, m["metrics"] or {}, source, "metrics"),
            history=list(m["history"] or []),
            teacher=_from(TeacherRef, m.get("teacher"), source, "teacher"),
            pseudo_labels=PseudoLabels.from_json(m.get("pseudo_labels"), source),
            init=m.get("init"), events=list(m.get("events") or []),
            resumed_from=m.get("resumed_from"), error=m.get("error"),
            extra={k: v for k, v in m.items() if k not in known},
        )
        if rec.status == "complete" and rec.checkpoint is None:
            raise ManifestError(f"{source}: status is complete but no checkpoint is recorded")
        return rec


def _stage_order(name: str) -> int:
    # Stages in the order they run, whatever order they were recorded in (a student round's
    # labeling may run, through jobs/pseudo_label.py, before its preflight).
    return STAGES.index(name) if name in STAGES else len(STAGES)


def _check_header(m: Any, source: str) -> None:
    if not isinstance(m, Mapping):
        raise ManifestError(f"{source}: expected a JSON object, got {type(m).__name__}")
    if "schema" not in m:
        raise ManifestError(f"{source}: missing key 'schema'; not a manifest of this tool")
    if m["schema"] != SCHEMA_VERSION:
        newer = isinstance(m["schema"], int) and m["schema"] > SCHEMA_VERSION
        hint = "upgrade this tool to read it" if newer else "it cannot be read by this version"
        raise ManifestError(
            f"{source}: schema {m['schema']!r}, this tool reads schema {SCHEMA_VERSION}; {hint}")
    r = m.get("round")
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise ManifestError(f"{source}: 'round' must be a non-negative integer, got {r!r}")
    required = REQUIRED_KEYS + (STUDENT_KEYS if r >= 1 else ())
    missing = [k for k in required if k not in m]
    if missing:
        raise ManifestError(f"{source}: missing key(s) {', '.join(missing)}")
    if m["role"] not in ROLES:
        raise ManifestError(f"{source}: role must be one of {', '.join(ROLES)}, got {m['role']!r}")
    if m["status"] not in STATUSES:
        raise ManifestError(
            f"{source}: status must be one of {', '.join(STATUSES)}, got {m['status']!r}")
    if not isinstance(m["stages"], Mapping):
        raise ManifestError(f"{source}: 'stages' must be an object")


# ----------------------------------------------------------------------------- create / load / save


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def git_state(cwd: str | Path | None = None) -> dict[str, Any]:
    """The commit the code came from and whether the tree had changes (None outside git)."""
    cwd = cwd or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"git_commit": None, "dirty": None}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10)
        return {"git_commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "dirty": None}


def new_round(*, run: str, round_: int, config: Mapping[str, Any], model: ModelRecord | None,
              data: DataRef, cluster: Mapping[str, Any],
              teacher: TeacherRef | None = None) -> RoundRecord:
    """The one way a round's record is made: status ``running``, stages added as they start."""
    if round_ < 0:
        raise ManifestError(f"round must be >= 0, got {round_}")
    if (round_ >= 1) != (teacher is not None):
        raise ManifestError(f"round {round_} {'needs' if round_ >= 1 else 'has no'} a teacher")
    rec = RoundRecord(
        run=run, round=round_, role="student" if round_ >= 1 else "teacher", status="running",
        created_at=now_iso(), finished_at=None, code=git_state(), config=dict(config),
        model=model, data=data, cluster=dict(cluster), teacher=teacher)
    rec.add_event("start")
    return rec


def load_round_file(path: str | Path | S3Path,
                    expect: tuple[str, int] | None = None) -> RoundRecord:
    """``expect``: the (run, round) the file should record, checked before the rest, since a
    manifest copied or renamed fails other checks that would not say so."""
    path = location(path)
    return _parse_round(path, _read_manifest(path), expect)


def _read_manifest(path: Path | S3Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot be read ({e.strerror})") from None


def _parse_round(path: Path | S3Path, data: bytes, expect: tuple[str, int] | None
                 ) -> RoundRecord:
    try:
        text = data.decode("utf-8")  # JSON's encoding, whatever the locale's
    except UnicodeDecodeError as e:  # JSON is UTF-8: binary garbage, or another encoding
        raise ManifestError(
            f"{path}: not valid JSON (not UTF-8 text: byte {e.object[e.start]:#04x} at offset "
            f"{e.start}); restore it (a copy, version control) or rerun the round with --force"
        ) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(
            f"{path}: not valid JSON ({e.msg.removesuffix(' at')} at line {e.lineno}); restore "
            "it (a copy, version control) or rerun the round with --force") from None
    if expect is not None and isinstance(raw, Mapping):
        _check_identity(path, raw.get("run"), raw.get("round"), *expect)
    return RoundRecord.from_json(raw, source=str(path))


def _check_identity(path: Path | S3Path, run: Any, round_: Any, want_run: str,
                    want_round: int) -> None:
    if (run, round_) != (want_run, want_round):
        raise ManifestError(f"{path} is the record of round {round_} of run {run!r}, not of "
                            f"round {want_round} of run {want_run!r} (copied or renamed?); put "
                            "the right manifest back")


def load_round(layout: RunLayout, round_: int) -> RoundRecord | None:
    """Round ``round_`` of the run, validated, or None when it has no manifest. A record of
    another run or round (a manifest copied or renamed) is refused: its files are elsewhere."""
    path = layout.manifest_path(round_)
    if not path.exists():
        return None
    return load_round_file(path, expect=(layout.run, round_))


def save_round(layout: RunLayout, rec: RoundRecord) -> Path:
    data = rec.to_json()
    RoundRecord.from_json(data, source="manifest to save")  # never write what cannot be read
    path = layout.manifest_path(rec.round)
    atomic_write_json(path, data)
    return path


# ----------------------------------------------------------------------------- the parent


def make_command(run: str, round_: int, root: Path | S3Path | None = None) -> str:
    """The command that makes round ``round_`` of ``run`` (under ``root``, named unless it is
    the current folder, the jobs' default: pasted without it, the command would look there)."""
    cmd = (f"python jobs/teacher.py --run {run} --data DATA" if round_ == 0
           else f"python jobs/student.py --run {run} --round {round_}")
    if root is not None and not (isinstance(root, Path) and root == Path.cwd().resolve()):
        cmd += f" --root {shlex.quote(str(root))}"
    return cmd


@dataclass(frozen=True)
class Parent:
    """What a student round takes from round N-1: its record, and its files where they are."""

    record: RoundRecord
    manifest_sha256: str
    model_path: Path
    dataset_path: Path

    @property
    def ref(self) -> TeacherRef:
        return TeacherRef(round=self.record.round, manifest_sha256=self.manifest_sha256,
                          checkpoint_sha256=self.record.checkpoint.sha256,
                          model=self.record.model.name if self.record.model else None,
                          top1=self.record.metrics.top1)


def load_parent(layout: RunLayout, round_: int) -> Parent:
    """Round ``round_ - 1``, complete, with its paths resolved; or one line naming the command
    that makes it."""
    if round_ < 1:
        raise ManifestError(f"round must be >= 1 for a student, got {round_}; round 0 is the "
                            f"teacher: `{make_command(layout.run, 0, layout.root)}`")
    prev = round_ - 1
    cmd = make_command(layout.run, prev, layout.root)
    path = layout.manifest_path(prev)
    # One read, parsed and hashed: the sha256 the student records is of the record it used,
    # even if `--force` on round N-1 rewrites the file meanwhile.
    data = _read_manifest(path) if path.exists() else None
    rec = None if data is None else _parse_round(path, data, (layout.run, prev))
    if rec is None:
        raise ManifestError(f"round {round_} needs round {prev} of run {layout.run!r}, which does "
                            f"not exist ({path}); run `{cmd}` first")
    if rec.status != "complete":
        raise ManifestError(f"round {prev} of run {layout.run!r} is {rec.status}, not complete; "
                            f"finish it with `{cmd}` first")
    if rec.checkpoint is None or rec.data is None or rec.model is None:
        raise ManifestError(f"{path} records no checkpoint, model or data.dataset; rerun "
                            f"`{cmd} --force`")
    return Parent(record=rec, manifest_sha256=hashlib.sha256(data).hexdigest(),
                  model_path=layout.resolve(rec.checkpoint.uri),
                  dataset_path=layout.resolve(rec.data.dataset))


def check_model_file(parent: Parent) -> None:
    """Refuse a missing or changed model file of round N-1 before anything starts (one hash)."""
    from pipeline.checkpoint import CheckpointError

    path, prev = parent.model_path, parent.record.round
    if not path.is_file():
        raise CheckpointError(f"model file {path} of round {prev} does not exist; restore it or "
                              "rerun that round with --force")
    if sha256_file(path) != parent.record.checkpoint.sha256:
        raise CheckpointError(f"model file {path} changed after round {prev} recorded it (sha256 "
                              "mismatch); restore it or rerun that round with --force")
