"""Every Postgres connection has deadlines: a server that never answers, before or after login,
and a table locked by another connection end the call with an error, never a hang."""

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from memcity_pipeline.postgres import Deadlines, PostgresTimeout, connection, conninfo
from tests.conftest import POSTGRES_TEST_URL
from tests.unanswering_server import UnansweringServer

SHORT = Deadlines(connect_s=2, statement_s=4, lock_s=1, total_s=3)
DOES_NOT_HANG_S = 30  # generous: these calls end after a few seconds


@pytest.fixture
def real_postgres() -> str:
    try:
        psycopg.connect(POSTGRES_TEST_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"Postgres is not reachable at {POSTGRES_TEST_URL}: {exc}")
    return POSTGRES_TEST_URL


@pytest.fixture
def locked_table(real_postgres: str) -> Iterator[str]:
    """A table that another connection holds ACCESS EXCLUSIVE (as VACUUM FULL does)."""
    table = f"locked_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(real_postgres, autocommit=True) as admin:
        admin.execute(f'CREATE TABLE "{table}" (id TEXT PRIMARY KEY)')
    holder = psycopg.connect(real_postgres)
    holder.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
    try:
        yield table
    finally:
        holder.close()
        with psycopg.connect(real_postgres, autocommit=True) as admin:
            admin.execute(f'DROP TABLE IF EXISTS "{table}"')


@pytest.mark.parametrize("login", [False, True], ids=["silent-at-login", "silent-after-login"])
def test_a_server_that_never_answers_ends_the_call_within_the_deadline(login: bool) -> None:
    with UnansweringServer(postgres_login=login) as server:
        started = time.monotonic()
        with (
            pytest.raises((PostgresTimeout, psycopg.OperationalError)) as caught,
            connection(server.url, SHORT) as conn,
        ):
            conn.execute("SELECT 1")
        elapsed = time.monotonic() - started
    assert server.connections >= 1
    assert elapsed < DOES_NOT_HANG_S
    if login:  # logged in, then nothing: only the client-side bound can end it
        assert isinstance(caught.value, PostgresTimeout)
        assert "did not answer within 3 s" in str(caught.value)
    else:
        assert "timeout" in str(caught.value)


def test_a_work_block_that_ends_in_time_is_left_alone(real_postgres: str) -> None:
    with connection(real_postgres, SHORT) as conn:
        time.sleep(0.2)
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.postgres
def test_a_table_locked_by_another_connection_fails_the_insert_after_the_lock_timeout(
    locked_table: str,
) -> None:
    started = time.monotonic()
    with pytest.raises(psycopg.errors.LockNotAvailable), connection(POSTGRES_TEST_URL, SHORT) as c:
        c.execute(f'INSERT INTO "{locked_table}" VALUES (%s)', ["x"])
    assert time.monotonic() - started < DOES_NOT_HANG_S


@pytest.mark.postgres
def test_the_server_side_timeouts_and_keepalives_are_set_and_the_url_wins(
    real_postgres: str,
) -> None:
    with connection(real_postgres) as conn:
        shown = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
        }
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        with sock:  # what the kernel was told, on the connection's own socket
            keepalive = (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            )
    assert shown == {
        "statement_timeout": "10s",
        "lock_timeout": "3s",
        "idle_in_transaction_session_timeout": "1min",
    }
    assert keepalive == (1, 10, 5, 3, 20000)
    assert "connect_timeout=5" in conninfo(real_postgres)
    own = f"{real_postgres}?options=-c%20lock_timeout%3D7s&connect_timeout=9"
    with connection(own) as conn:
        assert conn.execute("SHOW lock_timeout").fetchone() == ("7s",)
        assert conn.execute("SHOW statement_timeout").fetchone() == ("10s",)
    assert "connect_timeout=9" in conninfo(own)


@pytest.mark.postgres
def test_a_statement_interrupted_from_another_thread_is_not_mistaken_for_a_timeout(
    real_postgres: str,
) -> None:
    """Only the deadline's own cut is reported as PostgresTimeout."""
    with pytest.raises(psycopg.errors.QueryCanceled), connection(real_postgres, SHORT) as conn:
        threading.Timer(0.3, conn.cancel).start()
        conn.execute("SELECT pg_sleep(2)")
