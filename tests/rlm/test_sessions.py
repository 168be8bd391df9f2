"""Session bookkeeping as a user meets it: real `memcity query` processes (the scripted LLM of
this process, a real local sandbox) against the machine's Postgres, a Postgres table locked by
another connection, a server that never answers, and a process killed (kill -9) or interrupted
(SIGINT) around its Postgres insert. The answer is always printed; the row is always in the lake;
a row Postgres missed is marked pending and the next session copies it, exactly once."""

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from memcity_pipeline.lake.files import put_bytes
from memcity_pipeline.rlm.sessions import (
    PENDING,
    STALE_MARK_S,
    SessionStore,
    now_utc,
    pending_ids,
    read_sessions,
)
from tests.conftest import POSTGRES_TEST_URL
from tests.fixtures_sandbox import isolation_for_tests
from tests.scripted_llm_server import ScriptedLLMServer
from tests.unanswering_server import UnansweringServer

MEMCITY = str(Path(sys.executable).with_name("memcity"))
CRASHPOINT = str(Path(__file__).resolve().parents[1] / "crashpoint")
DOES_NOT_HANG_S = 120  # generous: each of these commands ends in seconds

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The test database, its tables in a schema of this test alone (dropped afterwards): the
    URL's own `search_path`, so `rlm_sessions` is this test's."""
    schema = f"sessions_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(POSTGRES_TEST_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.OperationalError as exc:
        pytest.skip(f"Postgres is not reachable at {POSTGRES_TEST_URL}: {exc}")
    yield f"{POSTGRES_TEST_URL}?options=-c%20search_path%3D{schema}"
    with psycopg.connect(POSTGRES_TEST_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def pg_ids(url: str) -> list[str]:
    """The session ids of Postgres, one per row (a duplicate would show twice); none before the
    table exists."""
    with psycopg.connect(url) as conn:
        if conn.execute("SELECT to_regclass('rlm_sessions')").fetchone() == (None,):
            return []
        return sorted(r[0] for r in conn.execute("SELECT session_id FROM rlm_sessions"))


@pytest.fixture
def llm(scripted_llm: ScriptedLLMServer) -> ScriptedLLMServer:
    scripted_llm.responder = lambda request: "```repl\nFINAL(str(len(context)) + ' notes')\n```"
    return scripted_llm


def start_query(
    home: Path, llm: ScriptedLLMServer, postgres_url: str, **extra: str
) -> subprocess.Popen[str]:
    """`memcity query` over a custom context of two notes, in its own process group."""
    notes = home / "notes.json"
    notes.write_text('["ferry at 9", "ferry at 10"]')
    env = {
        **os.environ,
        "MEMCITY_HOME": str(home),
        "MEMCITY_LLM_BASE_URL": llm.base_url,
        "MEMCITY_LLM_MODEL": "root",
        "MEMCITY_POSTGRES_URL": postgres_url,
        "MEMCITY_SANDBOX_ISOLATION": isolation_for_tests(),
        **extra,
    }
    argv = ["query", "How many notes?", "--org", "acme", "--context-type", "custom"]
    return subprocess.Popen(
        [MEMCITY, *argv, "--custom-file", str(notes)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=DOES_NOT_HANG_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"memcity query did not end within {DOES_NOT_HANG_S} s:\n{out}\n{err}")
    return process.returncode, out, err


def query(home: Path, llm: ScriptedLLMServer, postgres_url: str, **extra: str) -> Any:
    started = time.monotonic()
    code, out, err = finish(start_query(home, llm, postgres_url, **extra))
    return code, out, err, time.monotonic() - started


def lake_ids(home: Path) -> list[str]:
    return sorted(read_sessions(home / "lake")["session_id"].to_list())


def sync(home: Path, postgres_url: str) -> str:
    done = subprocess.run(
        [MEMCITY, "sessions", "--sync"],
        env={**os.environ, "MEMCITY_HOME": str(home), "MEMCITY_POSTGRES_URL": postgres_url},
        capture_output=True,
        text=True,
        timeout=DOES_NOT_HANG_S,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_a_session_row_blocked_by_a_table_lock_waits_pending_and_is_copied_by_the_next_session(
    memcity_home: Path, llm: ScriptedLLMServer, pg_url: str
) -> None:
    """A VACUUM FULL, ALTER TABLE or migration holding the table: the answer is printed at once,
    the command ends 0 after the lock timeout, and the row waits in the lake, marked pending."""
    query(memcity_home, llm, pg_url)  # creates the table (and its first row)
    first = lake_ids(memcity_home)
    holder = psycopg.connect(pg_url)
    holder.execute("LOCK TABLE rlm_sessions IN ACCESS EXCLUSIVE MODE")  # held: no commit
    try:
        process = start_query(memcity_home, llm, pg_url)
        assert process.stdout is not None
        answer = process.stdout.readline()  # printed while the insert waits for the lock
        still_running = process.poll() is None
        code, _, err = finish(process)
    finally:
        holder.close()
    assert answer.strip() == "2 notes", err
    assert still_running, "the answer came only after the session was recorded"
    assert code == 0, err
    assert "not written to Postgres" in err and "LockNotAvailable" in err, err
    [blocked] = sorted(set(lake_ids(memcity_home)) - set(first))
    assert pending_ids(memcity_home / "lake") == [blocked]
    assert pg_ids(pg_url) == first

    code, _, err, _ = query(memcity_home, llm, pg_url)  # the lock is gone: the next session
    assert code == 0, err
    assert pending_ids(memcity_home / "lake") == []
    assert pg_ids(pg_url) == lake_ids(memcity_home)  # the blocked row once, with the others
    assert len(lake_ids(memcity_home)) == 3


@pytest.mark.parametrize("postgres_login", [False, True], ids=["at-login", "after-login"])
def test_a_postgres_that_never_answers_costs_the_query_seconds_not_its_answer(
    memcity_home: Path, llm: ScriptedLLMServer, pg_url: str, postgres_login: bool
) -> None:
    """A server that accepts the connection and never answers (before or after login): the
    command prints its answer and ends 0 within the deadlines; `memcity sessions --sync`
    copies the row once Postgres answers."""
    with UnansweringServer(postgres_login=postgres_login) as server:
        code, out, err, elapsed = query(memcity_home, llm, server.url)
    assert server.connections >= 1
    assert code == 0, err
    assert out.strip() == "2 notes"
    assert elapsed < DOES_NOT_HANG_S
    reason = "PostgresTimeout" if postgres_login else "ConnectionTimeout"
    assert "not written to Postgres" in err and reason in err, err
    [session] = lake_ids(memcity_home)
    assert pending_ids(memcity_home / "lake") == [session]

    assert "copied 1 session row(s) to Postgres" in sync(memcity_home, pg_url)
    assert pg_ids(pg_url) == [session]
    assert pending_ids(memcity_home / "lake") == []
    assert "copied 0 session row(s)" in sync(memcity_home, pg_url)  # never twice


@pytest.mark.parametrize("signal_name", ["KILL", "INT"])
@pytest.mark.parametrize("moment", ["before-the-insert", "after-the-commit"])
def test_a_session_interrupted_around_its_postgres_insert_is_repaired_by_the_next_session(
    memcity_home: Path,
    llm: ScriptedLLMServer,
    pg_url: str,
    tmp_path: Path,
    signal_name: str,
    moment: str,
) -> None:
    """kill -9 or Ctrl-C once the row is in the lake and before its insert commits, or after the
    commit and before its pending mark is removed: the next session copies it, exactly once."""
    crash = {
        "PYTHONPATH": os.pathsep.join(filter(None, [CRASHPOINT, os.environ.get("PYTHONPATH")])),
        "MEMCITY_TEST_CRASH": f"session-{'insert' if moment == 'before-the-insert' else 'commit'}:1",
        "MEMCITY_TEST_CRASH_COUNTER": str(tmp_path / "crash-counter"),
        "MEMCITY_TEST_CRASH_SIGNAL": signal_name,
    }
    code, out, err, _ = query(memcity_home, llm, pg_url, **crash)
    if signal_name == "KILL":
        assert code == -signal.SIGKILL, err
    else:  # Ctrl-C: the answer was printed, and the command says what was kept
        assert code == 130, err
        assert out.strip() == "2 notes" and "interrupted while recording session" in err, err
    [interrupted] = lake_ids(memcity_home)
    assert pending_ids(memcity_home / "lake") == [interrupted]
    assert pg_ids(pg_url) == ([] if moment == "before-the-insert" else [interrupted])

    code, out, err, _ = query(memcity_home, llm, pg_url)  # the next session repairs it
    assert code == 0, err
    assert pending_ids(memcity_home / "lake") == []
    assert pg_ids(pg_url) == lake_ids(memcity_home)
    assert interrupted in pg_ids(pg_url) and len(pg_ids(pg_url)) == 2  # each row once


def test_a_pending_mark_without_its_row_is_kept_while_fresh_and_dropped_once_stale(
    tmp_path: Path, pg_url: str
) -> None:
    """A process that ended between marking its session and appending the row leaves a mark
    with nothing to copy: the catch-up keeps it while that session may still be writing, and
    drops it once it is an hour old."""
    lake = tmp_path / "lake"
    for session_id in ("in-flight", "abandoned"):
        put_bytes(lake, f"{PENDING}/{session_id}", b"")
    hour_ago = time.time() - STALE_MARK_S - 60
    os.utime(lake / PENDING / "abandoned", (hour_ago, hour_ago))
    store = SessionStore(lake, pg_url)
    row = {"session_id": "next", "org_id": "acme", "status": "completed", "started_at": now_utc()}
    assert store.record(row)  # reaches Postgres, so it catches up
    assert pending_ids(lake) == ["in-flight"]
    assert pg_ids(pg_url) == ["next"]
