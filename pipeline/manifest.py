"""Round manifests (schema 1 of DESIGN.md): the lineage record of a run.

One JSON file per round at ``<root>/manifests/<run>/round-<N>.json``. Every write goes to a temporary
file in the same directory, is fsynced and renamed over the old one, so a crash mid-write leaves the
previous manifest intact. Loading validates the schema and fails with one sentence naming the file
and the problem.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
ROLES = ("teacher", "student")
STATUSES = ("running", "complete", "failed")
REQUIRED_KEYS = (
    "schema", "run", "round", "role", "status", "created_at", "finished_at", "code", "config",
    "model", "data", "stages", "checkpoint", "metrics", "history", "cluster",
)
STUDENT_KEYS = ("teacher", "pseudo_labels")


class ManifestError(ValueError):
    """A manifest is missing, unreadable or does not follow the schema."""


# ----------------------------------------------------------------------------- paths


def manifest_dir(root: str | Path, run: str) -> Path:
    return Path(root) / "manifests" / run


def manifest_path(root: str | Path, run: str, round_: int) -> Path:
    return manifest_dir(root, run) / f"round-{round_}.json"


def artifact_dir(root: str | Path, run: str, round_: int) -> Path:
    return Path(root) / "artifacts" / run / f"round-{round_}"


def report_dir(root: str | Path, run: str) -> Path:
    return Path(root) / "reports" / run


def list_rounds(root: str | Path, run: str) -> list[int]:
    """Round numbers that have a manifest file, sorted."""
    rounds = []
    for p in manifest_dir(root, run).glob("round-*.json"):
        suffix = p.stem.removeprefix("round-")
        if suffix.isdigit():
            rounds.append(int(suffix))
    return sorted(rounds)


# ----------------------------------------------------------------------------- files


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    # Serialise first: a value json cannot encode must fail before anything touches the disk.
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    atomic_write_bytes(path, text.encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in a manifest")


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def git_state(cwd: str | Path | None = None) -> dict[str, Any]:
    """The commit the code came from and whether the tree had changes (None outside git)."""
    cwd = cwd or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
        )
        if commit.returncode != 0:
            return {"git_commit": None, "dirty": None}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10,
        )
        return {"git_commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "dirty": None}


# ----------------------------------------------------------------------------- create / update


def new_manifest(
    *,
    run: str,
    round_: int,
    role: str,
    config: Mapping[str, Any],
    model: Mapping[str, Any],
    data: Mapping[str, Any],
    cluster: Mapping[str, Any],
    teacher: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A fresh manifest in status ``running``; stages are added as they start."""
    if role not in ROLES:
        raise ManifestError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if round_ < 0:
        raise ManifestError(f"round must be >= 0, got {round_}")
    m: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "run": run,
        "round": round_,
        "role": role,
        "status": "running",
        "created_at": now_iso(),
        "finished_at": None,
        "code": git_state(),
        "config": dict(config),
        "model": dict(model),
        "data": dict(data),
        "stages": {},
        "checkpoint": None,
        "metrics": {},
        "history": [],
        "cluster": dict(cluster),
    }
    if round_ >= 1:
        m["teacher"] = dict(teacher) if teacher is not None else None
        m["pseudo_labels"] = None
    return m


def set_stage(m: dict[str, Any], stage: str, status: str, **fields: Any) -> dict[str, Any]:
    """Record a stage's status (and extra fields such as ``seconds``); returns the manifest."""
    if status not in STATUSES:
        raise ManifestError(f"stage status must be one of {', '.join(STATUSES)}, got {status!r}")
    entry = dict(m["stages"].get(stage, {}))
    entry.update(fields)
    entry["status"] = status
    m["stages"][stage] = entry
    return m


def stage_complete(m: Mapping[str, Any], stage: str) -> bool:
    return m.get("stages", {}).get(stage, {}).get("status") == "complete"


def add_event(m: dict[str, Any], event: str, **fields: Any) -> None:
    """Append a timestamped line to ``events`` (starts, resumes, failures)."""
    m.setdefault("events", []).append({"at": now_iso(), "event": event, **fields})


def mark_complete(m: dict[str, Any]) -> dict[str, Any]:
    m["status"] = "complete"
    m["finished_at"] = now_iso()
    return m


def mark_failed(m: dict[str, Any], error: str) -> dict[str, Any]:
    m["status"] = "failed"
    m["finished_at"] = now_iso()
    m["error"] = error
    return m


def save_manifest(root: str | Path, m: Mapping[str, Any]) -> Path:
    validate(m, source="manifest to save")
    path = manifest_path(root, m["run"], m["round"])
    atomic_write_json(path, m)
    return path


# ----------------------------------------------------------------------------- load / validate


def validate(m: Any, source: str = "manifest") -> None:
    """Raise ManifestError naming the first problem found in ``m``."""
    if not isinstance(m, Mapping):
        raise ManifestError(f"{source}: expected a JSON object, got {type(m).__name__}")
    if "schema" not in m:
        raise ManifestError(f"{source}: missing key 'schema'; not a manifest of this tool")
    if m["schema"] != SCHEMA_VERSION:
        newer = isinstance(m["schema"], int) and m["schema"] > SCHEMA_VERSION
        hint = "upgrade this tool to read it" if newer else "it cannot be read by this version"
        raise ManifestError(
            f"{source}: schema {m['schema']!r}, this tool reads schema {SCHEMA_VERSION}; {hint}"
        )
    required = REQUIRED_KEYS + (STUDENT_KEYS if _round_of(m) >= 1 else ())
    missing = [k for k in required if k not in m]
    if missing:
        raise ManifestError(f"{source}: missing key(s) {', '.join(missing)}")
    if m["role"] not in ROLES:
        raise ManifestError(f"{source}: role must be one of {', '.join(ROLES)}, got {m['role']!r}")
    if m["status"] not in STATUSES:
        raise ManifestError(
            f"{source}: status must be one of {', '.join(STATUSES)}, got {m['status']!r}"
        )
    if not isinstance(m["stages"], Mapping):
        raise ManifestError(f"{source}: 'stages' must be an object")
    if m["status"] == "complete" and not m.get("checkpoint"):
        raise ManifestError(f"{source}: status is complete but no checkpoint is recorded")


def _round_of(m: Mapping[str, Any]) -> int:
    r = m.get("round")
    if not isinstance(r, int) or r < 0:
        raise ManifestError(f"manifest: 'round' must be a non-negative integer, got {r!r}")
    return r


def load_manifest_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}); restore it from version control "
            "or rerun the round with --force"
        ) from None
    validate(m, source=str(path))
    return m


def load_manifest(root: str | Path, run: str, round_: int) -> dict[str, Any]:
    return load_manifest_file(manifest_path(root, run, round_))


def load_round_if_exists(root: str | Path, run: str, round_: int) -> dict[str, Any] | None:
    path = manifest_path(root, run, round_)
    return load_manifest_file(path) if path.exists() else None
