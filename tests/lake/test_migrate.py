"""A lake written the earlier way (one Parquet file per table and scope) is converted in place
to Delta tables, every row kept, by `memcity lake migrate` and by the first ingestion."""

import shutil
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from typer.testing import CliRunner

from memcity_pipeline.cli.app import app
from memcity_pipeline.cli.runner import copy_sample_corpus
from memcity_pipeline.ingestion.sync import Limits
from memcity_pipeline.lake.delta import partitions, read_rows, table_versions
from memcity_pipeline.lake.location import Lake
from memcity_pipeline.lake.migrate import migrate_lake, needs_migration
from memcity_pipeline.lake.tables import TABLES
from memcity_pipeline.rlm.sessions import pending_ids, write_session_row
from memcity_pipeline.search import bm25_store
from memcity_pipeline.search.bm25 import BM25Index
from tests.partitioned import sync_every_scope

LIMITS = Limits(10_000_000, 2_000_000)


def _write_old_layout(source: Path, old: Path) -> dict[str, int]:
    """The rows of the Delta lake `source` written the earlier way under `old`; rows per table."""
    counts: dict[str, int] = {}
    for t in TABLES.values():
        frame = read_rows(source, t.name)
        counts[t.name] = frame.height
        if t.scope in ("knowledge_base", "user"):
            for p in partitions(source, t.name):
                org, scope = p[t.partition_by[0]], p[t.partition_by[1]]
                path = old / t.name / str(org) / f"{scope}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                frame.filter(pl.col(t.partition_by[1]) == scope).write_parquet(path)
        elif t.name in ("source_files", "ingestion_errors"):
            scoped = frame.filter(pl.col("scope_id").is_not_null())
            for (kind, org, scope), rows in scoped.group_by(["kind", "org_id", "scope_id"]):
                folder = ("_state/source_files" if t.name == "source_files" else t.name) + "/"
                path = old / folder / str(kind) / str(org) / f"{scope}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                (rows.drop("kind") if t.name == "source_files" else rows).write_parquet(path)
            layout = frame.filter(pl.col("scope_id").is_null())
            if t.name == "ingestion_errors" and layout.height:
                (old / "ingestion_errors").mkdir(parents=True, exist_ok=True)
                layout.write_parquet(old / "ingestion_errors" / "layout.parquet")
        elif t.name == "rlm_sessions":
            for row in frame.iter_rows(named=True):
                path = old / "rlm_sessions" / f"date={row['date']}" / f"{row['session_id']}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                pl.DataFrame([row], schema=frame.schema).drop("date").write_parquet(path)
    (old / "rlm_sessions" / "_pending").mkdir(parents=True)
    (old / "rlm_sessions" / "_pending" / "s-waiting").touch()
    index = old / "indexes" / "chunks_bm25" / "brambleway" / "company_docs"
    BM25Index.build(["a", "b"], ["warranty of hive scales", "ferry times"]).save(index)
    (index.parent / "company_docs.source").write_text("f" * 64)
    return counts


def test_an_old_parquet_lake_is_converted_in_place_losing_no_row(tmp_path: Path) -> None:
    landing, source, old = tmp_path / "landing", tmp_path / "delta", tmp_path / "old"
    copy_sample_corpus(landing)
    for kind in ("documents", "memories", "conversations"):
        sync_every_scope(kind, landing, source, LIMITS)
    (landing / "orgs" / "stray.txt").write_text("outside every knowledge base")
    from memcity_pipeline.ingestion.landing import landing_scopes
    from memcity_pipeline.ingestion.sync import sync_layout_errors

    sync_layout_errors(source, landing_scopes(landing).unscoped)
    for i in range(3):
        write_session_row(
            source,
            {
                "session_id": f"s{i}",
                "org_id": "brambleway",
                "query": "q",
                "status": "completed",
                "started_at": datetime(2026, 11, 28 + i, 9, tzinfo=UTC),
            },
        )
    counts = _write_old_layout(source, old)
    assert all(counts[n] for n in ("raw_documents", "memories", "conversations", "source_files"))
    assert counts["ingestion_errors"] >= 1 and counts["rlm_sessions"] == 3

    assert needs_migration(old)
    report = migrate_lake(old)

    assert report.converted and report.indexes == 1
    assert "converted the Parquet lake" in report.summary(Lake.of(old))
    for t in TABLES.values():
        keys = [*t.partition_by, *t.key]
        assert read_rows(old, t.name).sort(keys).equals(read_rows(source, t.name).sort(keys)), t
    leftovers = [p for p in old.rglob("*.parquet") if "=" not in p.parent.name]
    assert leftovers == [], leftovers  # only the Delta tables' own files remain
    assert pending_ids(old) == ["s-waiting"]
    index = bm25_store.load(old, "indexes/chunks_bm25/brambleway/company_docs")
    assert index is not None and index.ids == ["a", "b"]
    assert not needs_migration(old)
    versions = table_versions(old, TABLES)
    assert not migrate_lake(old).converted and table_versions(old, TABLES) == versions


def test_memcity_lake_migrate_says_what_it_converted(tmp_path: Path, memcity_home: Path) -> None:
    landing, source = tmp_path / "landing", tmp_path / "delta"
    copy_sample_corpus(landing)
    sync_every_scope("memories", landing, source, LIMITS)
    lake = memcity_home / "lake"
    _write_old_layout(source, lake)
    shutil.rmtree(lake / "indexes")

    result = CliRunner().invoke(app, ["lake", "migrate"])
    assert result.exit_code == 0, result.output
    rows = read_rows(source, "memories").height
    assert "converted the Parquet lake" in result.stdout and f"memories: {rows}" in result.stdout
    assert read_rows(lake, "memories").height == rows

    again = CliRunner().invoke(app, ["lake", "migrate"])
    assert again.exit_code == 0 and "has no Parquet files of an earlier version" in again.stdout
