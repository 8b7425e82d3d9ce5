"""Where bytes live: local paths, and ``s3://`` objects behind the same small path interface.

Every location a user gives (``--root``, a dataset folder, shard patterns) goes through
:func:`location`: a local one becomes a :class:`pathlib.Path`, an ``s3://bucket/key`` one an
:class:`S3Path`, which implements the part of ``pathlib`` the stages use (``/``, ``name``,
``parent``, ``exists``, ``glob``, ``open``, ``read_bytes``, ``write_bytes``, ``unlink``, ``stat``)
on :class:`pyarrow.fs.S3FileSystem`. So stages keep writing ``layout.model_path(1).open("rb")``
whatever the root is, and code that needs a real file (``open(path)``) fails loudly on an S3Path,
which has no ``__fspath__``.

Why pyarrow.fs rather than fsspec/s3fs: pyarrow is already a dependency (Parquet), Ray Train takes
a ``pyarrow.fs.FileSystem`` as ``storage_filesystem`` and Ray Data reads through one, so one
client serves the stages, Ray Train's checkpoints and the Parquet files; and its C++ S3 client
needs no extra packages.

Settings come from the standard AWS places: credentials and region from the environment, the
shared config/credentials files or instance metadata (the AWS SDK's default chain); the endpoint
from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, which pyarrow itself does not read, so it is
read here. An S3Path captures the endpoint when it is made and carries it when pickled, so Ray
workers talk to the same server as the driver; credentials are not carried (each node uses its own).

Object stores have no rename and no partial objects: a write uploads the whole object, which
appears only when the upload completes (see :mod:`pipeline.storage`).
"""

from __future__ import annotations

import fnmatch
import functools
import io
import os
import posixpath
import re
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import IO, Any

from pipeline.errors import UserError

SCHEME = "s3://"
# Read-ahead for random-access reads (tar parsing seeks and reads small headers): one ranged GET
# per block instead of one per header.
READ_BLOCK = 8 << 20


class StorageError(UserError, ValueError):
    """An object store refused or could not find something; the message says what to fix."""


def is_remote(p: Any) -> bool:
    return isinstance(p, S3Path) or (isinstance(p, str) and p.startswith(SCHEME))


def location(p: str | os.PathLike[str] | S3Path) -> Path | S3Path:
    """A user-given location as the path type that can read and write it."""
    if isinstance(p, S3Path):
        return p
    s = p if isinstance(p, str) else os.fspath(p)
    if s.startswith(SCHEME):
        return S3Path(s)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s):
        raise StorageError(f"{s}: unsupported location; use a local path or s3://bucket/key")
    # s3:/bucket/key or s3:bucket/key (a slash short) was a relative local folder named "s3:",
    # and the run went there without a word.
    typo = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):(/?)(.*)$", s)
    if typo and (typo.group(1).lower() == "s3" or typo.group(2)):
        hint = (f"did you mean {SCHEME}{typo.group(3)}?" if typo.group(1).lower() == "s3"
                else "use a local path or s3://bucket/key")
        raise StorageError(f"{s}: not a location this tool reads (a URI needs '://'); {hint}")
    return Path(s)


def endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=8)
def s3_filesystem(endpoint: str | None) -> Any:
    """One pyarrow S3 client per endpoint and process."""
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, sep, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host if sep else endpoint,
                      scheme=scheme if sep else "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    # Connection and request timeouts bound a dead endpoint to seconds instead of minutes.
    return pafs.S3FileSystem(connect_timeout=10, request_timeout=60, **kwargs)


def arrow_fs(p: Path | S3Path) -> tuple[Any, str]:
    """The pyarrow filesystem and path for ``p`` (for pyarrow, pandas and Ray Train)."""
    if isinstance(p, S3Path):
        return p.filesystem, p.arrow_path
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem(), str(Path(p).resolve())


def explain(e: BaseException, where: S3Path) -> StorageError:
    """The one line to show for an S3 failure at ``where``."""
    text = " ".join(str(e).split())
    # Matched without the location's own names, as the error quotes them: a key such as
    # lab-000403.tar is no HTTP 403 (a short name unquoted would cut into the error's words).
    scan = text.replace(str(where), " ")
    for name in filter(None, (where.key, where.bucket)):
        scan = scan.replace(f"'{name}'", "''").replace(f'"{name}"', '""')
    if re.search(r"NO_SUCH_BUCKET|NoSuchBucket|Bucket '.*' not found", text):
        return StorageError(f"{where}: bucket {where.bucket!r} does not exist; create it "
                            f"(e.g. `aws s3 mb s3://{where.bucket}`) or fix the location")
    if re.search(r"ACCESS_DENIED|SIGNATURE_DOES_NOT_MATCH|InvalidAccessKeyId|INVALID_ACCESS_KEY|"
                 r"AccessDenied|SignatureDoesNotMatch|(?:status|code)\W{0,3}403\b", scan):
        return StorageError(
            f"{where}: access denied by the object store ({_short(text)}); check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials) and "
            "the bucket's policy")
    if isinstance(e, FileNotFoundError):
        return StorageError(f"{where}: no such object; check the location")
    if re.search(r"connect|resolve host|Couldn't|timed? ?out|NETWORK_CONNECTION", text, re.I):
        return StorageError(f"{where}: cannot reach the object store ({_short(text)}); check "
                            "AWS_ENDPOINT_URL and the network")
    return StorageError(f"{where}: {_short(text)}")


def _short(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


class S3Path:
    """``s3://bucket/key`` with the pathlib subset the stages use. Directories are key prefixes:
    ``mkdir`` does nothing, and a prefix exists when some object is under it."""

    __slots__ = ("bucket", "key", "endpoint")

    def __init__(self, uri: str, *, endpoint: str | None | bool = True) -> None:
        if not uri.startswith(SCHEME):
            raise StorageError(f"{uri}: not an s3:// location")
        bucket, _, key = uri[len(SCHEME):].partition("/")
        if not bucket:
            raise StorageError(f"{uri}: no bucket; write s3://BUCKET/PREFIX")
        key = posixpath.normpath(key) if key else ""
        self.bucket = bucket
        self.key = "" if key == "." else key.strip("/")
        self.endpoint = endpoint_from_env() if endpoint is True else (endpoint or None)

    # -- pure path operations
    def _with_key(self, key: str) -> S3Path:
        return S3Path(f"{SCHEME}{self.bucket}/{key}", endpoint=self.endpoint or False)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Path({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (str(self), self.endpoint))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Path) and (self.bucket, self.key) == (other.bucket, other.key)

    def __hash__(self) -> int:
        return hash((self.bucket, self.key))

    def __lt__(self, other: S3Path) -> bool:
        return str(self) < str(other)

    def __truediv__(self, other: str | os.PathLike[str]) -> S3Path:
        part = os.fspath(other).strip("/")
        return self._with_key(posixpath.join(self.key, part) if self.key else part)

    def joinpath(self, *parts: str) -> S3Path:
        out = self
        for part in parts:
            out = out / part
        return out

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix if self.name else ""

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem if self.name else ""

    @property
    def parent(self) -> S3Path:
        return self._with_key(posixpath.dirname(self.key))

    def with_name(self, name: str) -> S3Path:
        return self.parent / name

    def with_suffix(self, suffix: str) -> S3Path:
        return self.with_name(self.stem + suffix)

    def is_absolute(self) -> bool:
        return True

    def resolve(self) -> S3Path:
        return self

    def expanduser(self) -> S3Path:
        return self

    def as_posix(self) -> str:
        return str(self)

    def relative_to(self, other: S3Path | Path) -> PurePosixPath:
        if isinstance(other, S3Path) and other.bucket == self.bucket:
            if not other.key:
                return PurePosixPath(self.key)
            if self.key == other.key:
                return PurePosixPath(".")
            if self.key.startswith(other.key + "/"):
                return PurePosixPath(self.key[len(other.key) + 1:])
        raise ValueError(f"{self} is not under {other}")

    # -- the store
    @property
    def filesystem(self) -> Any:
        return s3_filesystem(self.endpoint)

    @property
    def arrow_path(self) -> str:
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def _info(self) -> Any:
        try:
            return self.filesystem.get_file_info(self.arrow_path)
        except OSError as e:
            raise explain(e, self) from None

    def stat(self) -> SimpleNamespace:
        import pyarrow.fs as pafs

        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(self))
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        return SimpleNamespace(st_size=info.size or 0, st_mtime=mtime)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def _list(self, recursive: bool) -> list[Any]:
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.arrow_path, recursive=recursive, allow_not_found=True)
        try:
            return self.filesystem.get_file_info(sel)
        except OSError as e:
            raise explain(e, self) from None

    def iterdir(self) -> Iterator[S3Path]:
        for info in sorted(self._list(False), key=lambda i: i.path):
            yield S3Path(SCHEME + info.path, endpoint=self.endpoint or False)

    def glob(self, pattern: str) -> Iterator[S3Path]:
        """Objects (and prefixes) under this one whose relative key matches ``pattern``
        (``*`` does not cross ``/``; ``**`` matches any depth)."""
        recursive = "/" in pattern
        regex = _glob_regex(pattern)
        base = len(self.arrow_path) + 1
        for info in sorted(self._list(recursive), key=lambda i: i.path):
            if regex.fullmatch(info.path[base:]):
                yield S3Path(SCHEME + info.path, endpoint=self.endpoint or False)

    def rglob(self, pattern: str) -> Iterator[S3Path]:
        return self.glob("**/" + pattern)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists once an object is written under it."""

    def open(self, mode: str = "r", buffering: int = -1, encoding: str | None = None,
             errors: str | None = None, newline: str | None = None) -> IO[Any]:
        if mode in ("rb", "r"):
            try:
                raw = self.filesystem.open_input_file(self.arrow_path)
            except OSError as e:
                raise _not_found(e, self) from None
            f: IO[Any] = io.BufferedReader(raw, READ_BLOCK)
            return f if mode == "rb" else io.TextIOWrapper(f, encoding=encoding or "utf-8",
                                                            errors=errors, newline=newline)
        if mode == "wb":
            return _Upload(self)
        if mode == "w":
            return _TextUpload(self, encoding or "utf-8")
        raise ValueError(f"S3Path.open: mode {mode!r} is not supported (objects are written whole)")

    def read_bytes(self) -> bytes:
        try:
            with self.filesystem.open_input_stream(self.arrow_path) as f:
                return f.read()
        except OSError as e:
            raise _not_found(e, self) from None

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """Upload ``data`` as one object; it appears only when the upload completes."""
        try:
            with self.filesystem.open_output_stream(self.arrow_path) as f:
                f.write(data)
        except OSError as e:
            raise explain(e, self) from None
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def upload(self, local: str | Path) -> None:
        """Copy a local file here (streamed, so it can be larger than memory)."""
        import pyarrow.fs as pafs

        try:
            pafs.copy_files(str(local), self.arrow_path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.filesystem)
        except OSError as e:
            raise explain(e, self) from None

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.filesystem.delete_file(self.arrow_path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError as e:
            if not (missing_ok and "NOT_FOUND" in str(e).upper()):
                raise explain(e, self) from None

    def rmtree(self) -> None:
        try:
            self.filesystem.delete_dir_contents(self.arrow_path, missing_dir_ok=True)
        except OSError as e:
            raise explain(e, self) from None

    def check_bucket(self) -> None:
        """One clear line now, rather than a confusing one mid-stage, when the bucket is missing
        or the credentials are refused."""
        import pyarrow.fs as pafs

        try:
            info = self.filesystem.get_file_info(self.bucket)
        except OSError as e:
            raise explain(e, self) from None
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{self}: bucket {self.bucket!r} does not exist; create it "
                               f"(e.g. `aws s3 mb s3://{self.bucket}`) or fix the location")


def _rebuild(uri: str, endpoint: str | None) -> S3Path:
    return S3Path(uri, endpoint=endpoint or False)


def _not_found(e: OSError, where: S3Path) -> BaseException:
    # Callers that probe for files catch FileNotFoundError, as with local paths.
    if isinstance(e, FileNotFoundError):
        return FileNotFoundError(2, "no such object", str(where))
    return explain(e, where)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for i, seg in enumerate(pattern.split("/")):
        if seg == "**":
            parts.append("(?:.*/)?" if i < len(pattern.split("/")) - 1 else ".*")
            continue
        body = fnmatch.translate(seg).removeprefix("(?s:").removesuffix(")\\Z")
        parts.append(body.replace(".*", "[^/]*") + ("/" if i < len(pattern.split("/")) - 1
                                                    else ""))
    return re.compile("".join(parts))


class _WholeUpload:
    """What is written to an S3 object: kept in memory and uploaded whole on close, or not at
    all when the ``with`` block that wrote it raised (pyarrow's own stream completes the upload
    of whatever was written however its block ends, which left a truncated object)."""

    _path: S3Path
    _failed = False
    closed: bool

    def _payload(self) -> bytes:
        raise NotImplementedError

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self._failed = exc_type is not None
        self.close()

    def close(self) -> None:
        if not self.closed and not self._failed:
            self._path.write_bytes(self._payload())
        super().close()  # type: ignore[misc]


class _Upload(_WholeUpload, io.BytesIO):
    def __init__(self, path: S3Path) -> None:
        super().__init__()
        self._path = path

    def _payload(self) -> bytes:
        return self.getvalue()


class _TextUpload(_WholeUpload, io.StringIO):
    def __init__(self, path: S3Path, encoding: str) -> None:
        super().__init__()
        self._path, self._encoding = path, encoding

    def _payload(self) -> bytes:
        return self.getvalue().encode(self._encoding)


def check_location(p: Path | S3Path) -> None:
    """For job entry points: fail early and clearly on an unusable bucket, or on a local path
    that is, or lies under, a file (it could hold no folder)."""
    if isinstance(p, S3Path):
        p.check_bucket()
        return
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                where = "" if q == p else f"{p}: "
                raise StorageError(f"{where}{q} is a file, not a folder; give a folder")
            return


def rmtree(p: Path | S3Path) -> None:
    """Remove a folder and everything in it (nothing when it does not exist). A file that
    cannot be removed (another user's, a busy NFS file) is a StorageError naming it: what is
    removed is a round's old state, and a part of it left behind would be resumed from."""
    import shutil

    if isinstance(p, S3Path):
        p.rmtree()
        return

    def refuse(function: Any, path: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):  # gone meanwhile
            return
        why = getattr(exc, "strerror", None) or exc
        raise StorageError(f"cannot remove {path} ({why}); remove {p} by hand (or fix its "
                           "permissions) and run the command again") from None

    if not p.exists():
        return
    if sys.version_info >= (3, 12):  # onerror is deprecated from 3.12 on
        shutil.rmtree(p, onexc=refuse)
    else:
        shutil.rmtree(p, onerror=lambda f, path, info: refuse(f, path, info[1]))


# ----------------------------------------------------------------------------- Parquet


def read_table(p: str | Path | S3Path, **kwargs: Any) -> Any:
    """``pyarrow.parquet.read_table`` for a local or s3:// file."""
    import pyarrow.parquet as pq

    loc = location(p)
    if isinstance(loc, S3Path):
        try:
            return pq.read_table(loc.arrow_path, filesystem=loc.filesystem, **kwargs)
        except FileNotFoundError:
            raise FileNotFoundError(2, "no such object", str(loc)) from None
        except OSError as e:
            raise explain(e, loc) from None
    return pq.read_table(loc, **kwargs)


def parquet_file(p: str | Path | S3Path) -> Any:
    """``pyarrow.parquet.ParquetFile`` for a local or s3:// file (metadata, row groups)."""
    import pyarrow.parquet as pq

    loc = location(p)
    if isinstance(loc, S3Path):
        try:
            return pq.ParquetFile(loc.filesystem.open_input_file(loc.arrow_path))
        except OSError as e:
            raise _not_found(e, loc) from None
    return pq.ParquetFile(loc)


def read_pandas(p: str | Path | S3Path, **kwargs: Any) -> Any:
    return read_table(p, **kwargs).to_pandas()
