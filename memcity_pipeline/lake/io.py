"""Ids that become parts of lake paths, and the one OS file lock left: `table_lock`.

Lake tables need no lock of ours: Delta commits are atomic and concurrent writers of one table
are reconciled by the format (`lake.delta`). `table_lock` remains for what is not a table
commit: `memcity ingest` holds one per partition on the local machine for the length of a run,
so two commands on one home do not both run the same partition's (LLM-spending) steps.
"""

import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_id(kind: str, value: str) -> str:
    """An id used as a path component: letters, digits, `.`, `_`, `-`; never `..` or hidden."""
    if not _SAFE_ID.fullmatch(value) or value in {".", ".."}:
        raise ValueError(f"invalid {kind} {value!r}: use letters, digits, '.', '_' or '-'")
    return value


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
        yield
    finally:
        who.unlink(missing_ok=True)
        lock.release()


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another run"
    except OSError:
        return "another run"
