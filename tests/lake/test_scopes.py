"""One knowledge base's or user's files across the lake: partition keys, removal, locks."""

import threading
import time
from pathlib import Path

import polars as pl
import pytest

from memcity_pipeline.lake.io import table_lock, write_parquet_atomic
from memcity_pipeline.lake.scopes import drop_scope
from memcity_pipeline.lake.tables import (
    TABLES,
    bm25_dir,
    ingestion_errors_path,
    parse_scope_key,
    scope_key,
    source_files_path,
)


def test_partition_keys_round_trip_and_bad_keys_are_refused() -> None:
    assert parse_scope_key(scope_key("acme", "handbook")) == ("acme", "handbook")
    for bad in ("acme", "acme/", "/kb", "acme/../x", "acme/a/b", "ac me/kb"):
        with pytest.raises(ValueError):
            parse_scope_key(bad)


def _fill(lake: Path, org: str, kb: str, user: str) -> None:
    frame = pl.DataFrame({"x": [1]})
    for table in TABLES.values():
        if table.scope in ("knowledge_base", "user"):
            write_parquet_atomic(
                frame, table.path(lake, org, kb if table.scope == "knowledge_base" else user)
            )
    for kind, scope in (("documents", kb), ("memories", user), ("conversations", user)):
        write_parquet_atomic(frame, source_files_path(lake, kind, org, scope))  # type: ignore[arg-type]
        write_parquet_atomic(frame, ingestion_errors_path(lake, kind, org, scope))  # type: ignore[arg-type]
    for items, scope in (("chunks", kb), ("memories", user)):
        folder = bm25_dir(lake, items, org, scope)  # type: ignore[arg-type]
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text("{}")
        (folder.parent / f"{folder.name}.source").write_text("key")


def test_dropping_a_knowledge_base_removes_its_files_everywhere_and_nothing_else(
    tmp_path: Path,
) -> None:
    _fill(tmp_path, "acme", "gone", "ann")
    _fill(tmp_path, "acme", "kept", "bob")
    before = {p for p in tmp_path.rglob("*") if p.is_file()}

    removed = drop_scope(tmp_path, "knowledge_base", "acme", "gone")

    after = {p for p in tmp_path.rglob("*") if p.is_file()}
    gone = {p.relative_to(tmp_path).as_posix() for p in before - after}
    assert all("gone" in p for p in gone) and not any("gone" in str(p) for p in after)
    kb_tables = [t.name for t in TABLES.values() if t.scope == "knowledge_base"]
    assert {f"{t}/acme/gone.parquet" for t in kb_tables} <= set(removed)
    assert "_state/source_files/documents/acme/gone.parquet" in removed
    assert "ingestion_errors/documents/acme/gone.parquet" in removed
    assert "indexes/chunks_bm25/acme/gone" in removed
    # The users of the same org, and the other knowledge base, are untouched.
    assert (tmp_path / "memories" / "acme" / "ann.parquet").is_file()
    assert (tmp_path / "chunks" / "acme" / "kept.parquet").is_file()
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
