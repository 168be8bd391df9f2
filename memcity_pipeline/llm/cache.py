"""A persistent cache of LLM answers: one SQLite file, safe across threads and processes.

Keys are sha256 digests of what determines an answer (model, messages, temperature, max_tokens,
response format), never of the provider's URL, so the same request to the same model is a hit
wherever it was served. Only answers the caller accepted are stored.
"""

import contextlib
import hashlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_FILE = "llm_cache.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_cache (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd REAL,
    created_at REAL NOT NULL
)
"""


@dataclass(frozen=True)
class CachedAnswer:
    """What the cache keeps of one accepted answer."""

    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None


def cache_key(
    *,
    model: str,
    messages: list[dict[str, str]],
    temperature: float,
    max_tokens: int | None,
    response_format: dict[str, Any] | None,
) -> str:
    """The sha256 hex digest identifying a request (independent of the provider's base URL)."""
    payload = {
        "model": model,
        "messages": messages,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "response_format": response_format,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class LLMCache:
    """The SQLite cache in `cache_dir` (WAL mode; one connection shared under a lock).

    A file that is not a usable database is moved aside (`*.corrupt-<time>`) and recreated with
    a warning; errors while reading or writing later are logged and treated as a miss.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.path = Path(cache_dir) / CACHE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._open_or_recreate()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _open_or_recreate(self) -> None:
        """Create the table, or move a corrupt file aside and start a fresh one."""
        try:
            conn = self._connect()
            with conn:
                conn.execute(_SCHEMA)
            conn.execute("SELECT count(*) FROM llm_cache LIMIT 1").fetchone()
            conn.close()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.warning("LLM cache %s is unusable (%s); moved to %s", self.path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                part = Path(f"{self.path}{suffix}")
                if part.exists():
                    part.replace(Path(f"{aside}{suffix}"))
            conn = self._connect()
            with conn:
                conn.execute(_SCHEMA)
            conn.close()

    def _connection(self) -> sqlite3.Connection:
        """The shared connection (opened on first use); call with the lock held."""
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def get(self, key: str) -> CachedAnswer | None:
        """The stored answer for `key`, or None (also when the cache cannot be read)."""
        try:
            with self._lock:
                row = (
                    self._connection()
                    .execute(
                        "SELECT model, text, prompt_tokens, completion_tokens, cost_usd "
                        "FROM llm_cache WHERE key = ?",
                        (key,),
                    )
                    .fetchone()
                )
        except sqlite3.Error as exc:
            log.warning("LLM cache read failed (%s); calling the model instead", exc)
            return None
        return CachedAnswer(*row) if row else None

    def put(self, key: str, answer: CachedAnswer) -> None:
        """Store (or replace) the answer for `key`; a write failure is logged, not raised."""
        try:
            with self._lock, self._connection() as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO llm_cache VALUES (?, ?, ?, ?, ?, ?, ?)",
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
        except sqlite3.Error as exc:
            log.warning("LLM cache write failed (%s); the answer is not cached", exc)

    def __len__(self) -> int:
        try:
            with self._lock:
                row = self._connection().execute("SELECT count(*) FROM llm_cache").fetchone()
            return int(row[0])
        except sqlite3.Error:
            return 0

    def close(self) -> None:
        """Close the connection (the next use reopens it)."""
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None
