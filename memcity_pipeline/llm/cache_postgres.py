"""The LLM answer cache in Postgres (`MEMCITY_LLM_CACHE=postgres` with `MEMCITY_POSTGRES_URL`),
so that every pod or machine sharing a lake shares the answers too.

Same keys, contents and contract as the SQLite `LLMCache`: only accepted answers are stored; a
read or write that fails (Postgres down, a timeout) is logged and treated as a miss, never as an
error of the call. The table `llm_cache` is created if missing; rows are upserted
(`ON CONFLICT (key) DO UPDATE`), so concurrent writers of the same answer do not collide. One
connection per cache object, shared under a lock and reopened after a failure.
"""

import contextlib
import logging
import threading
import time
from typing import Any

from memcity_pipeline.llm.cache import CachedAnswer

log = logging.getLogger(__name__)

TABLE = "llm_cache"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost_usd DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL
)
"""


class PostgresLLMCache:
    """The answer cache in the Postgres database at `url` (a libpq URL)."""

    def __init__(self, url: str, *, connect_timeout_s: int = 5) -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._conn: Any = None
        try:
            with self._lock:
                self._connection().execute(_SCHEMA)
        except Exception as exc:
            log.warning("LLM cache in Postgres unavailable (%s); answers are not cached", exc)
            self._drop()

    def _connection(self) -> Any:
        """The shared connection (autocommit), opened on first use; call with the lock held."""
        if self._conn is None:
            import psycopg

            self._conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=self.connect_timeout_s
            )
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def get(self, key: str) -> CachedAnswer | None:
        """The stored answer for `key`, or None (also when Postgres cannot be read)."""
        try:
            with self._lock:
                row = (
                    self._connection()
                    .execute(
                        f"SELECT model, text, prompt_tokens, completion_tokens, cost_usd "
                        f"FROM {TABLE} WHERE key = %s",
                        (key,),
                    )
                    .fetchone()
                )
        except Exception as exc:
            log.warning("LLM cache read failed (%s); calling the model instead", exc)
            with self._lock:
                self._drop()
            return None
        return CachedAnswer(*row) if row else None

    def put(self, key: str, answer: CachedAnswer) -> None:
        """Store (or replace) the answer for `key`; a write failure is logged, not raised."""
        try:
            with self._lock:
                self._connection().execute(
                    f"INSERT INTO {TABLE} VALUES (%s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET model = EXCLUDED.model, text = EXCLUDED.text, "
                    "prompt_tokens = EXCLUDED.prompt_tokens, "
                    "completion_tokens = EXCLUDED.completion_tokens, "
                    "cost_usd = EXCLUDED.cost_usd, created_at = EXCLUDED.created_at",
                    (
                        key,
                        answer.model,
                        answer.text,
                        answer.prompt_tokens,
                        answer.completion_tokens,
                        answer.cost_usd,
                        time.time(),
                    ),
                )
        except Exception as exc:
            log.warning("LLM cache write failed (%s); the answer is not cached", exc)
            with self._lock:
                self._drop()

    def __len__(self) -> int:
        try:
            with self._lock:
                row = self._connection().execute(f"SELECT count(*) FROM {TABLE}").fetchone()
            return int(row[0])
        except Exception:
            return 0

    def close(self) -> None:
        """Close the connection (the next use reopens it)."""
        with self._lock:
            self._drop()
