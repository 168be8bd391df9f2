"""One knowledge base's or user's files across the lake: partition keys, removal, locks."""

import threading
import time
from pathlib import Path

import polars as pl
import pytest

from memcity_pipeline.lake.delta import empty_frame, has_rows, read_rows, write_rows
from memcity_pipeline.lake.files import list_keys
from memcity_pipeline.lake.io import table_lock
from memcity_pipeline.lake.scopes import drop_scope
from memcity_pipeline.lake.tables import (
    TABLES,
    bm25_prefix,
    bookkeeping_where,
    parse_scope_key,
    scope_key,
)
from memcity_pipeline.search.bm25 import BM25Index
from memcity_pipeline.search.bm25_store import publish


def test_partition_keys_round_trip_and_bad_keys_are_refused() -> None:
    assert parse_scope_key(scope_key("acme", "handbook")) == ("acme", "handbook")
    for bad in ("acme", "acme/", "/kb", "acme/../x", "acme/a/b", "ac me/kb"):
        with pytest.raises(ValueError):
            parse_scope_key(bad)


def _one_row(name: str, where: dict[str, str | None]) -> pl.DataFrame:
    """A row of table `name` in the partition `where` (key columns filled, the rest null)."""
    table = TABLES[name]
    values = {c: pl.lit(v) for c, v in where.items()}
    values |= {k: pl.lit(1 if k in ("line", "turn") else "k") for k in table.key if k not in where}
    return pl.concat([empty_frame(name), pl.select(**values)], how="diagonal_relaxed")


def _fill(lake: Path, org: str, kb: str, user: str) -> None:
    for table in TABLES.values():
        if table.scope in ("knowledge_base", "user"):
            where = table.scope_where(org, kb if table.scope == "knowledge_base" else user)
            write_rows(lake, table.name, where, _one_row(table.name, where))
    for kind, scope in (("documents", kb), ("memories", user), ("conversations", user)):
        for name in ("source_files", "ingestion_errors"):
            where = bookkeeping_where(kind, org, scope)  # type: ignore[arg-type]
            write_rows(lake, name, where, _one_row(name, where))
    for items, scope in (("chunks", kb), ("memories", user)):
        prefix = bm25_prefix(items, org, scope)  # type: ignore[arg-type]
        publish(lake, prefix, BM25Index.build(["a"], ["some text"]), f"key-{scope}")


def test_dropping_a_knowledge_base_removes_its_rows_everywhere_and_nothing_else(
    tmp_path: Path,
) -> None:
    _fill(tmp_path, "acme", "gone", "ann")
    _fill(tmp_path, "acme", "kept", "bob")
    counts = {name: read_rows(tmp_path, name).height for name in TABLES}

    removed = drop_scope(tmp_path, "knowledge_base", "acme", "gone")

    kb_tables = [t.name for t in TABLES.values() if t.scope == "knowledge_base"]
    assert {f"{t}/acme/gone" for t in kb_tables} <= set(removed)
    assert "source_files/documents/acme/gone" in removed
    assert "ingestion_errors/documents/acme/gone" in removed
    assert "indexes/chunks_bm25/acme/gone" in removed
    for t in kb_tables:
        assert not has_rows(tmp_path, t, TABLES[t].scope_where("acme", "gone")), t
        assert read_rows(tmp_path, t).height == counts[t] - 1, t
    assert not list_keys(tmp_path, "indexes/chunks_bm25/acme/gone")
    # The users of the same org, and the other knowledge base, are untouched.
    assert has_rows(tmp_path, "memories", TABLES["memories"].scope_where("acme", "ann"))
    assert has_rows(tmp_path, "chunks", TABLES["chunks"].scope_where("acme", "kept"))
    assert list_keys(tmp_path, "indexes/chunks_bm25/acme/kept")
    assert drop_scope(tmp_path, "knowledge_base", "acme", "gone") == []  # nothing left to drop


def test_a_partition_lock_blocks_the_same_partition_only(tmp_path: Path) -> None:
    entered: list[str] = []
    with table_lock(tmp_path, "chunks", ("acme", "a"), timeout_s=5, holder="run A"):
        other = threading.Thread(
            target=lambda: _hold(tmp_path, ("acme", "b"), entered), daemon=True
        )
        same = threading.Thread(target=lambda: _hold(tmp_path, ("acme", "a"), entered), daemon=True)
        other.start()
        other.join(timeout=5)
        assert entered == ["acme/b"], "another partition of the table waited for this one"
        same.start()
        time.sleep(0.5)
        assert entered == ["acme/b"], "the same partition was entered while locked"
    same.join(timeout=5)
    assert entered == ["acme/b", "acme/a"]


def _hold(lake: Path, scope: tuple[str, str], entered: list[str]) -> None:
    with table_lock(lake, "chunks", scope, timeout_s=5, holder="run B"):
        entered.append("/".join(scope))
