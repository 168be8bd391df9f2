"""The Parquet lake: atomic writes and reads of Polars frames under one root folder.

Every table file is written to a temporary file beside it and moved into place with
`os.replace`, so a reader (or a crash) never sees half a file.
"""

import os
import re
import tempfile
from pathlib import Path

import polars as pl
import pyarrow as pa

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_id(kind: str, value: str) -> str:
    """An id used as a path component: letters, digits, `.`, `_`, `-`; never `..` or hidden."""
    if not _SAFE_ID.fullmatch(value) or value in {".", ".."}:
        raise ValueError(f"invalid {kind} {value!r}: use letters, digits, '.', '_' or '-'")
    return value


def write_parquet_atomic(frame: pl.DataFrame, path: Path, schema: pa.Schema | None = None) -> None:
    """Write `frame` to `path` atomically, cast to `schema` when one is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = frame.to_arrow()
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        import pyarrow.parquet as pq

        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_parquet(path: Path, schema: pa.Schema | None = None) -> pl.DataFrame:
    """Read a table; a missing file is an empty frame of `schema` (or an empty frame)."""
    if path.exists():
        return pl.read_parquet(path)
    if schema is not None:
        return pl.from_arrow(schema.empty_table())  # type: ignore[return-value]
    return pl.DataFrame()


def delete_table(path: Path) -> bool:
    """Remove a table file; True when there was one."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
