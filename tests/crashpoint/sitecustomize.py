"""Fault injection for crash tests: kill -9 the whole run at a chosen point.

A test puts this folder on PYTHONPATH of a `memcity ingest` process; Python imports it in that
process and in every step process Dagster starts. `MEMCITY_TEST_CRASH=<point>:<n>` kills the
process group (the run and its step processes) with SIGKILL on the n-th time any of them reaches
the point, counted across processes in `MEMCITY_TEST_CRASH_COUNTER`:

- `parse`: a landing file is about to be parsed (during ingestion);
- `lake-write`: a lake table's MERGE is about to run (odd n: killed before it commits) or has
  just committed (even n: killed before the step records anything else);
- `session-insert`: a session row is about to be inserted into Postgres (it is marked pending
  and in the lake);
- `session-commit`: a session row's insert into Postgres has just committed (its pending mark is
  not removed yet).

`MEMCITY_TEST_CRASH_SIGNAL=INT` sends SIGINT (a Ctrl-C) instead of SIGKILL.
"""

import fcntl
import os
import signal


def _reached(point: str) -> None:
    wanted, _, nth = os.environ.get("MEMCITY_TEST_CRASH", "").partition(":")
    if wanted != point:
        return
    with open(os.environ["MEMCITY_TEST_CRASH_COUNTER"], "a+") as counter:
        fcntl.flock(counter, fcntl.LOCK_EX)
        counter.write(".")
        counter.flush()
        counter.seek(0)
        count = len(counter.read())
    if count == int(nth):
        name = os.environ.get("MEMCITY_TEST_CRASH_SIGNAL", "KILL")
        os.killpg(os.getpgrp(), getattr(signal, f"SIG{name}"))


def _install_sessions() -> None:
    from memcity_pipeline.rlm import sessions

    real_insert = sessions.insert_rows

    def insert_rows(*args, **kwargs):  # type: ignore[no-untyped-def]
        _reached("session-insert")
        inserted = real_insert(*args, **kwargs)
        _reached("session-commit")
        return inserted

    sessions.insert_rows = insert_rows


def _install() -> None:
    if not os.environ.get("MEMCITY_TEST_CRASH"):
        return
    if os.environ["MEMCITY_TEST_CRASH"].startswith("session-"):
        _install_sessions()
        return
    from memcity_pipeline.lake import delta

    real_merge = delta._merge
    after_commit = int(os.environ["MEMCITY_TEST_CRASH"].partition(":")[2] or 1) % 2 == 0

    def merge(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not after_commit:
            _reached("lake-write")
        version = real_merge(*args, **kwargs)
        if after_commit and version is not None:
            _reached("lake-write")
        return version

    delta._merge = merge

    from memcity_pipeline.ingestion import parsing

    for name in ("parse_document_file", "parse_memories_file", "parse_conversation_file"):
        real = getattr(parsing, name)

        def wrapped(*args, _real=real, **kwargs):  # type: ignore[no-untyped-def]
            _reached("parse")
            return _real(*args, **kwargs)

        setattr(parsing, name, wrapped)


_install()
