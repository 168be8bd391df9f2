"""The session log of RLM queries (the spec's `rlmSessions`): a Delta table in the lake + Postgres.

Every query, whatever its end, is one row:

- in the lake's Delta table `rlm_sessions`, partitioned by org and day (`date`, UTC), appended
  (appends from concurrent processes never conflict, on a local folder or object storage);
- in Postgres (`MEMCITY_POSTGRES_URL`), table `rlm_sessions` (created if missing, with indexes
  on org and time; every column but the partition column `date`), inserted in a transaction with
  `ON CONFLICT (session_id) DO NOTHING`. A table created by an earlier version gains the
  columns added since (`ALTER TABLE ... ADD COLUMN IF NOT EXISTS`, nullable: its old rows read
  them as null) in the transaction of the next insert; the lake's table gains them on its next
  append.

`SessionStore.record` is crash-safe. With Postgres configured it first marks the session pending
(the object `_state/sessions_pending/<session_id>`), then appends the row to the lake (the truth),
then inserts it into Postgres, and removes the mark only after that commit. So whatever ends the
process at any point (kill -9, Ctrl-C, a Postgres that fails or does not answer), the row is
either in both places or marked pending, and the next session that reaches Postgres copies the
pending rows (catch-up) and removes their marks; `SessionStore.sync_to_postgres()` (or
`memcity sessions --sync`) copies every row Postgres lacks. The insert is idempotent, so nothing
is duplicated either. A mark whose row never reached the lake (the process ended between the two)
is dropped once it is `STALE_MARK_S` old.

Every Postgres call has deadlines (`memcity_pipeline.postgres`: connect 5 s, statements 10 s,
locks 3 s, TCP keepalives, and 15 s on the client for each connection's whole use), so a
Postgres that stops answering or a table locked by `VACUUM FULL` or a migration costs a
session at most those seconds: its row waits in the lake, marked pending.
The trajectory of each session (rlms logger format, JSONL) lies in the lake at
`rlm_trajectories/<session_id>.jsonl`.
"""

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pyarrow as pa

from memcity_pipeline.lake.delta import append_rows, read_rows
from memcity_pipeline.lake.files import delete_keys, list_keys, modified_at, put_bytes
from memcity_pipeline.lake.location import Lake
from memcity_pipeline.lake.tables import RLM_SESSIONS, UTC_TS
from memcity_pipeline.postgres import DEFAULT_DEADLINES, Deadlines, connection

log = logging.getLogger(__name__)

SESSIONS_TABLE = "rlm_sessions"

_PG_TYPES = {
    pa.string(): "TEXT",
    pa.large_string(): "TEXT",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE PRECISION",
    UTC_TS: "TIMESTAMPTZ",
}
COLUMNS: list[str] = [n for n in RLM_SESSIONS.names if n != "date"]
"""The Postgres columns: the lake's, but the partition column `date`."""
PENDING = "_state/sessions_pending"
STALE_MARK_S = 3600.0
"""A pending mark this old whose row is not in the lake is dropped (its process ended between
marking the session and appending its row: there is nothing to copy)."""
INSERT_BATCH = 1000
"""Rows per transaction when many are copied (`sync_to_postgres`): each within the deadline."""


def pending_ids(lake: Lake | str) -> list[str]:
    """Session ids whose rows are in the lake but not yet in Postgres."""
    return [k.rsplit("/", 1)[-1] for k in list_keys(lake, PENDING)]


def write_session_row(lake: Lake | str, row: dict[str, Any]) -> int:
    """Append one session row to the lake's `rlm_sessions`; the table version committed."""
    missing = [name for name in ("session_id", "started_at") if not row.get(name)]
    if missing:
        raise ValueError(f"a session row needs {', '.join(missing)}")
    full = {name: row.get(name) for name in RLM_SESSIONS.names}
    full["date"] = row["started_at"].astimezone(UTC).strftime("%Y-%m-%d")
    frame = pl.from_arrow(pa.Table.from_pylist([full], schema=RLM_SESSIONS))
    return append_rows(lake, "rlm_sessions", frame)  # type: ignore[arg-type]


def read_sessions(lake: Lake | str, *, org_id: str | None = None) -> pl.DataFrame:
    """Every session row of the lake (optionally one org's), newest first."""
    frame = read_rows(lake, "rlm_sessions")
    if org_id is not None:
        frame = frame.filter(pl.col("org_id") == org_id)
    return frame.sort("started_at", descending=True)


# -- Postgres ---------------------------------------------------------------------------------


def _ddl(table: str) -> list[Any]:
    from psycopg import sql

    columns = [
        sql.SQL("{} {}{}").format(
            sql.Identifier(f.name),
            sql.SQL(_PG_TYPES[f.type]),
            sql.SQL(" PRIMARY KEY" if f.name == "session_id" else ""),
        )
        for f in RLM_SESSIONS
        if f.name in COLUMNS
    ]
    create = sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
        sql.Identifier(table), sql.SQL(", ").join(columns)
    )
    org_index = sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (org_id, started_at DESC)").format(
        sql.Identifier(f"{table}_org_started_idx"), sql.Identifier(table)
    )
    time_index = sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (started_at DESC)").format(
        sql.Identifier(f"{table}_started_idx"), sql.Identifier(table)
    )
    return [create, org_index, time_index]


def _add_missing_columns(conn: Any, table: str) -> None:
    """Add to an existing `table` the columns of `RLM_SESSIONS` it lacks (nullable)."""
    from psycopg import sql

    cursor = conn.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = %s",
        [table],
    )
    have = {r[0] for r in cursor.fetchall()}
    missing = [f for f in RLM_SESSIONS if f.name in COLUMNS and f.name not in have]
    if not missing:
        return
    conn.execute(
        sql.SQL("ALTER TABLE {} {}").format(
            sql.Identifier(table),
            sql.SQL(", ").join(
                sql.SQL("ADD COLUMN IF NOT EXISTS {} {}").format(
                    sql.Identifier(f.name), sql.SQL(_PG_TYPES[f.type])
                )
                for f in missing
            ),
        )
    )
    log.info("%s: added the columns %s", table, ", ".join(f.name for f in missing))


def _prepare(conn: Any, table: str) -> None:
    """Create `table` and its indexes if missing, and add the columns it lacks. When they all
    exist nothing is locked (`CREATE INDEX IF NOT EXISTS` would take a SHARE lock on the table
    and queue concurrent inserts behind one another)."""
    names = [table, f"{table}_org_started_idx", f"{table}_started_idx"]
    cursor = conn.execute("SELECT " + ", ".join(["to_regclass(%s)"] * len(names)), names)
    if not all(cursor.fetchone()):
        for statement in _ddl(table):
            conn.execute(statement)
    _add_missing_columns(conn, table)


def _insert(table: str) -> Any:
    from psycopg import sql

    return sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (session_id) DO NOTHING").format(
        sql.Identifier(table),
        sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS),
        sql.SQL(", ").join(sql.Placeholder() for _ in COLUMNS),
    )


def insert_rows(
    url: str,
    rows: list[dict[str, Any]],
    table: str = SESSIONS_TABLE,
    *,
    deadlines: Deadlines = DEFAULT_DEADLINES,
) -> int:
    """Insert rows (table created if missing), `INSERT_BATCH` to a transaction, each transaction
    within the deadlines; returns rows inserted (a row Postgres has already is skipped)."""
    inserted = 0
    for start in range(0, len(rows), INSERT_BATCH):
        batch = rows[start : start + INSERT_BATCH]
        with connection(url, deadlines) as conn, conn.transaction():
            _prepare(conn, table)
            cursor = conn.cursor()
            cursor.executemany(_insert(table), [[row.get(c) for c in COLUMNS] for row in batch])
            inserted += max(cursor.rowcount, 0)
    return inserted


def postgres_session_ids(
    url: str, table: str = SESSIONS_TABLE, *, deadlines: Deadlines = DEFAULT_DEADLINES
) -> set[str]:
    """The session ids Postgres has (table created if missing)."""
    from psycopg import sql

    with connection(url, deadlines) as conn:
        with conn.transaction():
            _prepare(conn, table)
        cursor = conn.execute(sql.SQL("SELECT session_id FROM {}").format(sql.Identifier(table)))
        return {r[0] for r in cursor.fetchall()}


@dataclass
class SessionStore:
    """Where session rows go: the lake (always) and Postgres (when a URL is set)."""

    lake: Lake | str
    postgres_url: str | None = None
    table: str = SESSIONS_TABLE
    deadlines: Deadlines = DEFAULT_DEADLINES

    def record(self, row: dict[str, Any]) -> bool:
        """Write a row to the lake, then Postgres; True when Postgres has it too.

        With Postgres, the session is marked pending before anything is written and unmarked
        after the insert commits. A Postgres failure (or deadline) is logged, not raised: the row
        waits in the lake, marked pending, for the next session's catch-up.
        """
        if not row.get("session_id"):
            raise ValueError("a session row needs session_id")
        mark = f"{PENDING}/{row['session_id']}"
        if self.postgres_url:
            put_bytes(self.lake, mark, b"")
        write_session_row(self.lake, row)
        if not self.postgres_url:
            return False
        try:
            insert_rows(self.postgres_url, [row], self.table, deadlines=self.deadlines)
        except Exception as exc:
            log.error(
                "rlm session %s: not written to Postgres (%s: %s); it is kept in the lake, "
                "marked pending, and the next session that reaches Postgres copies it",
                row["session_id"],
                type(exc).__name__,
                " ".join(str(exc).split()),
            )
            return False
        self._unmark([row["session_id"]])
        self._catch_up()
        return True

    def _unmark(self, session_ids: list[str]) -> None:
        """Remove pending marks (a failure only leaves them for the next catch-up)."""
        try:
            delete_keys(self.lake, [f"{PENDING}/{i}" for i in session_ids])
        except Exception as exc:
            log.warning("pending session marks not removed (%s); the next catch-up will", exc)

    def _stale(self, session_id: str) -> bool:
        """Whether the pending mark of a session whose row is not in the lake is old enough to
        drop (see `STALE_MARK_S`)."""
        when = modified_at(self.lake, f"{PENDING}/{session_id}")
        return when is not None and now_utc() - when > timedelta(seconds=STALE_MARK_S)

    def _catch_up(self) -> None:
        """Copy the rows marked pending (Postgres failed, or their process ended, before they
        were inserted)."""
        marked = pending_ids(self.lake)
        if not marked or not self.postgres_url:
            return
        try:
            rows = read_sessions(self.lake).filter(pl.col("session_id").is_in(marked))
            rows = rows.select(COLUMNS)
            copied = insert_rows(
                self.postgres_url, rows.to_dicts(), self.table, deadlines=self.deadlines
            )
            found = set(rows["session_id"].to_list())
            self._unmark([i for i in marked if i in found or self._stale(i)])
        except Exception as exc:
            log.warning("catch-up of %d pending session rows failed: %s", len(marked), exc)
            return
        log.info("copied %d session rows that Postgres had missed", copied)

    def sync_to_postgres(self) -> int:
        """Copy the lake's rows that Postgres lacks; returns how many were inserted."""
        if not self.postgres_url:
            raise ValueError("no Postgres URL configured (MEMCITY_POSTGRES_URL)")
        marked = pending_ids(self.lake)
        frame = read_sessions(self.lake).select(COLUMNS)
        have = postgres_session_ids(self.postgres_url, self.table, deadlines=self.deadlines)
        missing = frame.filter(~pl.col("session_id").is_in(sorted(have)))
        copied = insert_rows(
            self.postgres_url, missing.to_dicts(), self.table, deadlines=self.deadlines
        )
        stored = set(frame["session_id"].to_list())
        self._unmark([i for i in marked if i in stored or self._stale(i)])
        return copied


def now_utc() -> datetime:
    return datetime.now(UTC)
