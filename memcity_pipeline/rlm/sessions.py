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

The lake is written first. If Postgres is down, the error is logged and the row waits in the
lake, marked pending (the object `_state/sessions_pending/<session_id>`); the next session that
reaches Postgres copies every pending row (catch-up), and `SessionStore.sync_to_postgres()` (or
`memcity sessions --sync`) copies every row Postgres lacks. Nothing is lost, nothing duplicated.
The trajectory of each session (rlms logger format, JSONL) lies in the lake at
`rlm_trajectories/<session_id>.jsonl`.
"""

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import polars as pl
import pyarrow as pa

from memcity_pipeline.lake.delta import append_rows, read_rows
from memcity_pipeline.lake.files import delete_keys, list_keys, put_bytes
from memcity_pipeline.lake.location import Lake
from memcity_pipeline.lake.tables import RLM_SESSIONS, UTC_TS

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
    """Create `table` and its indexes if missing, and add the columns it lacks."""
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


def _connect(url: str, connect_timeout_s: int) -> Any:
    import psycopg

    return psycopg.connect(url, connect_timeout=connect_timeout_s)


def ensure_table(url: str, table: str = SESSIONS_TABLE, *, connect_timeout_s: int = 5) -> None:
    """Create the sessions table and its indexes if missing, and add the columns it lacks."""
    with _connect(url, connect_timeout_s) as conn, conn.transaction():
        _prepare(conn, table)


def insert_rows(
    url: str,
    rows: list[dict[str, Any]],
    table: str = SESSIONS_TABLE,
    *,
    connect_timeout_s: int = 5,
) -> int:
    """Insert rows in one transaction (table created if missing); returns rows inserted."""
    if not rows:
        return 0
    inserted = 0
    with _connect(url, connect_timeout_s) as conn, conn.transaction():
        _prepare(conn, table)
        query = _insert(table)
        for row in rows:
            cursor = conn.execute(query, [row.get(c) for c in COLUMNS])
            inserted += max(cursor.rowcount, 0)
    return inserted


def postgres_session_ids(
    url: str, table: str = SESSIONS_TABLE, *, connect_timeout_s: int = 5
) -> set[str]:
    """The session ids Postgres has (table created if missing)."""
    from psycopg import sql

    ensure_table(url, table, connect_timeout_s=connect_timeout_s)
    with _connect(url, connect_timeout_s) as conn:
        cursor = conn.execute(sql.SQL("SELECT session_id FROM {}").format(sql.Identifier(table)))
        return {r[0] for r in cursor.fetchall()}


@dataclass
class SessionStore:
    """Where session rows go: the lake (always) and Postgres (when a URL is set)."""

    lake: Lake | str
    postgres_url: str | None = None
    table: str = SESSIONS_TABLE
    connect_timeout_s: int = 5

    def record(self, row: dict[str, Any]) -> bool:
        """Write a row to the lake, then Postgres; True when Postgres has it too.

        A Postgres failure is logged, not raised: the row waits in the lake for
        `sync_to_postgres()`.
        """
        write_session_row(self.lake, row)
        if not self.postgres_url:
            return False
        try:
            insert_rows(
                self.postgres_url, [row], self.table, connect_timeout_s=self.connect_timeout_s
            )
        except Exception as exc:
            put_bytes(self.lake, f"{PENDING}/{row['session_id']}", b"")
            log.error(
                "rlm session %s: not written to Postgres (%s: %s); it is kept in the lake and "
                "the next session that reaches Postgres copies it",
                row.get("session_id"),
                type(exc).__name__,
                exc,
            )
            return False
        self._catch_up()
        return True

    def _catch_up(self) -> None:
        """Copy the rows marked pending (Postgres was down when they were recorded)."""
        markers = pending_ids(self.lake) if self.postgres_url else []
        if not markers:
            return
        try:
            copied = self.sync_to_postgres()
        except Exception as exc:
            log.warning("catch-up of %d pending session rows failed: %s", len(markers), exc)
            return
        log.info("copied %d session rows that Postgres had missed", copied)

    def sync_to_postgres(self) -> int:
        """Copy the lake's rows that Postgres lacks; returns how many were inserted."""
        if not self.postgres_url:
            raise ValueError("no Postgres URL configured (MEMCITY_POSTGRES_URL)")
        frame = read_sessions(self.lake).select(COLUMNS)
        if frame.is_empty():
            return 0
        have = postgres_session_ids(
            self.postgres_url, self.table, connect_timeout_s=self.connect_timeout_s
        )
        missing = frame.filter(~pl.col("session_id").is_in(sorted(have)))
        copied = 0
        if not missing.is_empty():
            copied = insert_rows(
                self.postgres_url,
                missing.to_dicts(),
                self.table,
                connect_timeout_s=self.connect_timeout_s,
            )
        stored = have | set(missing["session_id"].to_list())
        delete_keys(self.lake, [f"{PENDING}/{i}" for i in pending_ids(self.lake) if i in stored])
        return copied


def now_utc() -> datetime:
    return datetime.now(UTC)
