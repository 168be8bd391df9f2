"""Fault injection for crash tests: kill -9 the whole run at a chosen point.

A test puts this folder on PYTHONPATH of a `memcity ingest` process; Python imports it in that
process and in every step process Dagster starts. `MEMCITY_TEST_CRASH=<point>:<n>` kills the
process group (the run and its step processes) with SIGKILL on the n-th time any of them reaches
the point, counted across processes in `MEMCITY_TEST_CRASH_COUNTER`:

- `parse`: a landing file is about to be parsed (during ingestion);
- `lake-write`: a lake table's temporary file is written and about to replace the table.
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
        os.killpg(os.getpgrp(), signal.SIGKILL)


def _install() -> None:
    if not os.environ.get("MEMCITY_TEST_CRASH"):
        return
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(dst).endswith(".parquet") and "/lake/" in str(dst):
            _reached("lake-write")
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace

    from memcity_pipeline.ingestion import parsing

    for name in ("parse_document_file", "parse_memories_file", "parse_conversation_file"):
        real = getattr(parsing, name)

        def wrapped(*args, _real=real, **kwargs):  # type: ignore[no-untyped-def]
            _reached("parse")
            return _real(*args, **kwargs)

        setattr(parsing, name, wrapped)


_install()
