"""The LLM answer cache in Postgres (`MEMCITY_LLM_CACHE=postgres` with `MEMCITY_POSTGRES_URL`),
so that every pod or machine sharing a lake shares the answers too.

Same keys, contents and contract as the SQLite `LLMCache`: only accepted answers are stored; a
read or write that fails (Postgres down, a timeout) is logged and treated as a miss, never as an
error of the call. The table `llm_cache` is created if missing; rows are upserted
(`ON CONFLICT (key) DO UPDATE`), so concurrent writers of the same answer do not collide. One
connection per cache object, shared under a lock and reopened (the table created if missing)
after a failure.

A cache must never cost more than it saves, so its deadlines are short (`CACHE_DEADLINES`, see
`memcity_pipeline.postgres`: connect 3 s, statements 3 s, locks 1 s, 5 s for any one read or
write on the client), and after a failure the cache rests for `REST_S` (every read a miss, every
write skipped, at once) before it tries Postgres again: a Postgres that does not answer slows
one LLM call by a few seconds, not every call.
"""

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from memcity_pipeline.llm.cache import CachedAnswer
from memcity_pipeline.postgres import Deadlines, bounded, connect

log = logging.getLogger(__name__)

T = TypeVar("T")

TABLE = "llm_cache"
CACHE_DEADLINES = Deadlines(connect_s=3, statement_s=3, lock_s=1, total_s=5)
REST_S = 30.0
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


class CacheResting(Exception):
    """The cache failed a moment ago and does not try Postgres again yet."""


class PostgresLLMCache:
    """The answer cache in the Postgres database at `url` (a libpq URL)."""

    def __init__(
        self, url: str, *, deadlines: Deadlines = CACHE_DEADLINES, rest_s: float = REST_S
    ) -> None:
        self.url = url
        self.deadlines = deadlines
        self.rest_s = rest_s
        self._lock = threading.Lock()
        self._conn: Any = None
        self._resting_until = 0.0
        try:
            self._run(lambda conn: None)
        except Exception as exc:
            log.warning("LLM cache in Postgres unavailable (%s); answers are not cached", exc)

    def _run(self, work: Callable[[Any], T]) -> T:
        """`work(connection)` on the shared connection (autocommit; opened on first use, with
        the table created if missing), within the deadlines; after a failure the connection is
        dropped and the cache rests."""
        with self._lock:
            if time.monotonic() < self._resting_until:
                raise CacheResting("resting after a failure")
            try:
                if self._conn is None:
                    self._conn = connect(self.url, self.deadlines, autocommit=True)
                    with bounded(self._conn, self.deadlines.total_s):
                        self._conn.execute(_SCHEMA)
                with bounded(self._conn, self.deadlines.total_s):
                    return work(self._conn)
            except Exception:
                self._drop()
                self._resting_until = time.monotonic() + self.rest_s
                raise

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def get(self, key: str) -> CachedAnswer | None:
        """The stored answer for `key`, or None (also when Postgres cannot be read)."""
        try:
            row = self._run(
                lambda conn: conn.execute(
                    f"SELECT model, text, prompt_tokens, completion_tokens, cost_usd "
                    f"FROM {TABLE} WHERE key = %s",
                    (key,),
                ).fetchone()
            )
        except CacheResting:
            return None
        except Exception as exc:
            log.warning(
                "LLM cache read failed (%s); calling the model instead, and not using the "
                "cache for %g s",
                exc,
                self.rest_s,
            )
            return None
        return CachedAnswer(*row) if row else None

    def put(self, key: str, answer: CachedAnswer) -> None:
        """Store (or replace) the answer for `key`; a write failure is logged, not raised."""
        try:
            self._run(
                lambda conn: conn.execute(
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
            )
        except CacheResting:
            return
        except Exception as exc:
            log.warning("LLM cache write failed (%s); the answer is not cached", exc)

    def __len__(self) -> int:
        try:
            row = self._run(lambda conn: conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone())
            return int(row[0])
        except Exception:
            return 0

    def close(self) -> None:
        """Close the connection (the next use reopens it)."""
        with self._lock:
            self._drop()
