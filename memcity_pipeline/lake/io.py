"""The Parquet lake: atomic writes and reads of Polars frames under one root folder.

Every table file is written to a temporary file beside it and moved into place with
`os.replace`, so a reader (or a crash) never sees half a file. A writer of one knowledge base's
(or user's) part of a table takes that part's lock (`table_lock` with a scope) for its whole
read-compute-write, so two runs never interleave on it, while runs on other partitions go on.
"""

import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pyarrow as pa
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

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


class LakeBusyError(RuntimeError):
    """Another run kept a lake table locked for longer than we were willing to wait."""


@contextmanager
def table_lock(
    lake: Path,
    table: str,
    scope: tuple[str, str] | None = None,
    *,
    timeout_s: float,
    holder: str = "",
    on_wait: Callable[[str], None] | None = None,
    label: str | None = None,
) -> Iterator[None]:
    """Hold the exclusive write lock of `table`, or of one `(org, kb or user)` part of it (an OS
    file lock, freed when the process dies).

    Waits up to `timeout_s` for another holder (telling `on_wait` who it is), then raises
    LakeBusyError. `holder` (e.g. a run id) is shown to whoever waits; `label` names what is
    locked in those messages (the table, by default).
    """
    name = table if scope is None else f"{table}/{scope[0]}/{scope[1]}"
    what = label or (
        f"lake table {table!r}" + ("" if scope is None else f" of {scope[0]}/{scope[1]}")
    )
    lock_file = lake / ".locks" / f"{name}.lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file)
    who = lock_file.with_suffix(".holder")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        current = _holder(who)
        if on_wait is not None:
            on_wait(f"{what} is being written by {current}; waiting")
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            raise LakeBusyError(
                f"{what} is still being written by {_holder(who)} after "
                f"{timeout_s:g} s; try again when that run ends (MEMCITY_LAKE_LOCK_TIMEOUT_S "
                "sets the wait)"
            ) from None
    try:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        who.write_text(
            f"{holder or 'a run'} (pid {os.getpid()} on {socket.gethostname()}, since {stamp})"
        )
        if scope is None:
            _remove_stale_temporaries(lake / table, ".*.tmp")
        else:
            _remove_stale_temporaries(lake / table / scope[0], f".{scope[1]}.parquet.*.tmp")
        yield
    finally:
        who.unlink(missing_ok=True)
        lock.release()


def remove_interrupted_writes(path: Path) -> None:
    """Temporary files that a crash left beside the table file `path` (call with its lock)."""
    _remove_stale_temporaries(path.parent, f".{path.name}.*.tmp")


def _remove_stale_temporaries(folder: Path, pattern: str) -> None:
    """Temporary files of writes that a crash interrupted (safe: we hold their lock)."""
    for tmp in folder.rglob(pattern) if folder.is_dir() else []:
        log.info("removing %s, left by an interrupted write", tmp)
        tmp.unlink(missing_ok=True)


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another run"
    except OSError:
        return "another run"
