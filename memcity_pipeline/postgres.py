"""Connections to Postgres with deadlines: every connection the project opens (session rows and
their catch-up, `memcity sessions --sync`, the LLM answer cache, `memcity doctor`) comes from here.

A leaf module: it imports only psycopg and the standard library.

What bounds a connection (`Deadlines`; parameters the URL sets itself win over these):

- connecting: libpq's `connect_timeout` (`connect_s`, 5 s), which psycopg enforces on the client
  over the whole login, so a server that accepts the TCP connection and never answers is given
  up too;
- on the server: the startup `options` set `statement_timeout` (`statement_s`, 10 s),
  `lock_timeout` (`lock_s`, 3 s: an insert queued behind `VACUUM FULL`, `ALTER TABLE` or a
  migration's lock fails instead of waiting) and `idle_in_transaction_session_timeout` (60 s: a
  transaction of a process that stopped does not hold its locks for long). Behind PgBouncer,
  list `options` in its `ignore_startup_parameters`; the client-side bound below still holds;
- the network: TCP keepalives (first probe after 10 s idle, then every 5 s, 3 probes) and
  `tcp_user_timeout` (20 s of unacknowledged data), so a dead peer or a cut link is noticed;
- on the client: `bounded(conn, seconds)` shuts the connection's socket down when a block of
  work (statements, commit) has not ended in time, so a server that stops answering after login
  cannot hang the caller either: the blocked call fails at once and `PostgresTimeout` says why.
  `connection(url, deadlines)` opens a connection and bounds its whole use by `total_s` (15 s),
  connecting included.

A statement or a wait the server cuts raises psycopg's `QueryCanceled` / `LockNotAvailable`; the
client-side cut raises `PostgresTimeout`. The connection is unusable after either: callers drop it.
"""

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any


class PostgresTimeout(TimeoutError):
    """Postgres did not answer within the client-side deadline; the connection was closed."""


@dataclass(frozen=True)
class Deadlines:
    """The time limits of one connection, in seconds."""

    connect_s: float = 5.0
    statement_s: float = 10.0
    lock_s: float = 3.0
    idle_in_transaction_s: float = 60.0
    total_s: float = 15.0  # client side: one `connection(...)` block, connecting included


DEFAULT_DEADLINES = Deadlines()

_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "20000",  # milliseconds
}


def conninfo(url: str, deadlines: Deadlines = DEFAULT_DEADLINES) -> str:
    """`url` with the deadlines' connection parameters added (the URL's own win)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params: dict[str, Any] = {**_KEEPALIVES, **conninfo_to_dict(url)}
    params.setdefault("connect_timeout", str(max(2, round(deadlines.connect_s))))
    server = (
        f"-c statement_timeout={_ms(deadlines.statement_s)} "
        f"-c lock_timeout={_ms(deadlines.lock_s)} "
        f"-c idle_in_transaction_session_timeout={_ms(deadlines.idle_in_transaction_s)}"
    )
    # the URL's own options come last: a setting given twice takes its last value
    params["options"] = f"{server} {params['options']}" if params.get("options") else server
    return make_conninfo("", **params)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def connect(url: str, deadlines: Deadlines = DEFAULT_DEADLINES, **kwargs: Any) -> Any:
    """A psycopg connection to `url` with the deadlines set (`kwargs` go to `psycopg.connect`).
    Its work is bounded on the client only inside `bounded(...)`."""
    import psycopg

    return psycopg.connect(conninfo(url, deadlines), **kwargs)


@contextmanager
def bounded(conn: Any, seconds: float) -> Iterator[None]:
    """Bound the work on `conn` in this block to `seconds`: past it the connection's socket is
    shut down, the blocked call fails and the block raises `PostgresTimeout`."""
    # our own descriptor of the connection's socket: shutting it down reaches the socket even
    # if the connection closed meanwhile and its descriptor number went to another file
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    fired = threading.Event()

    def cut() -> None:
        fired.set()
        with suppress(OSError):  # already closed by its end
            sock.shutdown(socket.SHUT_RDWR)

    message = f"Postgres did not answer within {round(seconds, 1):g} s; the connection was closed"
    timer = threading.Timer(max(0.0, seconds), cut)
    timer.daemon = True
    timer.start()
    try:
        yield
    except Exception as exc:
        if fired.is_set():
            raise PostgresTimeout(message) from exc
        raise
    finally:
        timer.cancel()
        sock.close()
    if fired.is_set():  # the block ended anyway, but the connection is gone
        raise PostgresTimeout(message)


@contextmanager
def connection(url: str, deadlines: Deadlines = DEFAULT_DEADLINES, **kwargs: Any) -> Iterator[Any]:
    """A connection whose whole use in the block (connecting, statements, the commit or rollback
    on leaving it, closing) ends within `deadlines.total_s`, or raises."""
    started = time.monotonic()
    conn = connect(
        url, replace(deadlines, connect_s=min(deadlines.connect_s, deadlines.total_s)), **kwargs
    )
    with ExitStack() as stack:
        stack.callback(conn.close)
        stack.enter_context(bounded(conn, deadlines.total_s - (time.monotonic() - started)))
        stack.enter_context(conn)  # commits (or rolls back) and closes inside the bound
        yield conn
