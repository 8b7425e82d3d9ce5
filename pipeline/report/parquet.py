"""Reading Parquet in record batches of a few columns, every failure turned into a ReportError."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.fs import parquet_file
from pipeline.report.errors import ReportError

__all__ = ["BATCH_ROWS", "iter_batches", "num_rows", "schema_names"]

BATCH_ROWS = 65_536


def schema_names(path: str | Path) -> list[str]:
    """Column names of a Parquet file (its footer only)."""
    try:
        return parquet_file(path).schema_arrow.names
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ReportError(f"{path}: cannot read Parquet ({_first_line(e)})") from None


def num_rows(path: str | Path) -> int:
    """Row count of a Parquet file, from its footer."""
    try:
        return parquet_file(path).metadata.num_rows
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ReportError(f"{path}: cannot read Parquet ({_first_line(e)})") from None


def iter_batches(path: str | Path, columns: list[str],
                 batch_rows: int = BATCH_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``columns`` as numpy arrays; nulls become -1 (integers) or NaN (floats)."""
    try:
        pf = parquet_file(path)
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            out = {}
            for name in columns:
                col = batch.column(name)
                if pa.types.is_integer(col.type):
                    col = col.fill_null(-1) if col.null_count else col
                    out[name] = col.to_numpy()
                elif pa.types.is_floating(col.type):
                    # float16 columns convert through float32: numpy has no arrow half-float path.
                    col = col.cast(pa.float32()) if pa.types.is_float16(col.type) else col
                    out[name] = col.to_numpy(zero_copy_only=False).astype(np.float64)
                else:
                    out[name] = col.to_numpy(zero_copy_only=False)
            yield out
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ReportError(f"{path}: cannot read Parquet ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
