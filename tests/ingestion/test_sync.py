"""Ingestion into the lake: incremental runs, deletions, bad input, through the Dagster assets."""

import json
import os
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from memcity_pipeline.cli.runner import copy_sample_corpus, sample_corpus_dir
from memcity_pipeline.defs.ingestion import conversations, memories, raw_documents
from memcity_pipeline.ingestion.landing import landing_scopes
from memcity_pipeline.ingestion.sync import Limits, SyncReport, sync_layout_errors, sync_sources
from memcity_pipeline.lake.delta import partitions, read_rows, table_versions
from memcity_pipeline.lake.tables import TABLES
from memcity_pipeline.settings import build_resources, get_settings
from tests.partitioned import materialize_partitions, metadata, sync_every_scope

LIMITS = Limits(max_file_bytes=1_000_000, max_document_chars=200_000)
KB = "orgs/acme/knowledge_bases/handbook"


def _write(landing: Path, rel: str, data: str | bytes) -> Path:
    path = landing / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def _docs(lake: Path) -> pl.DataFrame:
    return read_rows(lake, "raw_documents")


def _errors(lake: Path) -> pl.DataFrame:
    return read_rows(lake, "ingestion_errors")


def _sync_kb(landing: Path, lake: Path) -> SyncReport:
    """The documents of the one knowledge base these tests write (`acme/handbook`)."""
    return sync_sources("documents", landing, lake, LIMITS, "acme", "handbook")


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    landing, lake = tmp_path / "landing", tmp_path / "lake"
    landing.mkdir()
    return landing, lake


def test_sample_corpus_ingests_every_kind_without_errors(dirs: tuple[Path, Path]) -> None:
    landing, lake = dirs
    copy_sample_corpus(landing)
    reports = {
        k: sync_every_scope(k, landing, lake, LIMITS)
        for k in ("documents", "memories", "conversations")
    }
    assert all(r.errors == [] for r in reports.values()), [r.errors for r in reports.values()]
    docs = _docs(lake)
    formats = set(docs["format"].to_list())
    assert {"md", "txt", "html", "pdf", "json", "jsonl"} <= formats
    assert docs["document_id"].n_unique() == docs.height
    assert docs.filter(pl.col("text").str.len_chars() == 0).height == 0
    assert reports["memories"].rows > 0 and reports["conversations"].rows > 0
    mem = read_rows(lake, "memories")
    assert set(mem.columns) >= {"org_id", "user_id", "memory_id", "text", "created_at"}
    # Every knowledge base's rows live in its own partition's files (org_id=/knowledge_base_id=).
    files = [
        f.relative_to(lake / "raw_documents") for f in lake.rglob("raw_documents/**/*.parquet")
    ]
    assert files and all(f.parts[0].startswith("org_id=") for f in files)
    for part in partitions(lake, "raw_documents"):
        rows = read_rows(lake, "raw_documents", part)
        assert rows.select("org_id", "knowledge_base_id").unique().rows() == [tuple(part.values())]
    assert sorted({p["org_id"] for p in partitions(lake, "raw_documents")}) == sorted(
        set(docs["org_id"].to_list())
    )


def test_rerun_with_unchanged_files_rewrites_nothing(dirs: tuple[Path, Path]) -> None:
    landing, lake = dirs
    copy_sample_corpus(landing)
    first = sync_every_scope("documents", landing, lake, LIMITS)
    assert first.changed_total == first.files > 0
    versions = table_versions(lake, TABLES)
    second = sync_every_scope("documents", landing, lake, LIMITS)
    assert second.changed_total == 0 and second.unchanged == first.files
    assert second.tables_written == [] and second.rows == first.rows
    assert table_versions(lake, TABLES) == versions  # nothing committed
    # A touched but identical file is still "unchanged" (hash compare), and costs no rewrite.
    some = next(landing.rglob("*.md"))
    os.utime(some, ns=(some.stat().st_atime_ns, some.stat().st_mtime_ns + 10**9))
    third = sync_every_scope("documents", landing, lake, LIMITS)
    assert third.changed_total == 0 and third.tables_written == []
    assert table_versions(lake, TABLES)["raw_documents"] == versions["raw_documents"]


def test_edited_file_is_picked_up_and_deleted_file_removed(dirs: tuple[Path, Path]) -> None:
    landing, lake = dirs
    a = _write(landing, f"{KB}/a.md", "# Alpha\n\nThe first version.")
    _write(landing, f"{KB}/b.txt", "Bravo text.")
    _sync_kb(landing, lake)
    before = _docs(lake).filter(pl.col("source_path").str.ends_with("a.md")).row(0, named=True)

    a.write_text("# Alpha\n\nThe second version, longer.", encoding="utf-8")
    report = _sync_kb(landing, lake)
    assert (report.changed, report.new, report.deleted) == (1, 0, 0)
    after = _docs(lake).filter(pl.col("source_path").str.ends_with("a.md")).row(0, named=True)
    assert after["document_id"] == before["document_id"]  # stable id across edits
    assert after["content_hash"] != before["content_hash"]
    assert "second version" in after["text"]

    a.unlink()
    report = _sync_kb(landing, lake)
    assert report.deleted == 1 and report.changed_total == 1
    assert _docs(lake)["source_path"].to_list() == [f"{KB}/b.txt"]

    (landing / f"{KB}/b.txt").unlink()
    report = _sync_kb(landing, lake)
    assert report.tables_deleted == ["raw_documents/acme/handbook"]
    assert _docs(lake).height == 0


def test_bad_inputs_become_error_rows_and_good_files_still_land(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    landing, lake = dirs
    pdf = next(sample_corpus_dir().rglob("*.pdf")).read_bytes()
    outside = tmp_path / "secret.txt"
    outside.write_text("host secret, never to be ingested")
    _write(landing, f"{KB}/good.md", "# Good\n\nA fine document.")
    _write(landing, f"{KB}/empty.txt", "")
    _write(landing, f"{KB}/binary.txt", bytes(range(256)) * 4)
    _write(landing, f"{KB}/truncated.pdf", pdf[: len(pdf) // 2])
    _write(landing, f"{KB}/huge.txt", "x" * 1_100_000)
    _write(
        landing,
        f"{KB}/records.jsonl",
        '{"id": "r1", "text": "first record"}\n{not json\n{"id": "r3", "text": "third record"}\n',
    )
    (landing / f"{KB}/leak.txt").symlink_to(outside)
    _write(
        landing,
        "orgs/acme/users/u1/memories.jsonl",
        '{"id": "m1", "text": "likes tea"}\n{"id": "m2"}\n',
    )

    docs_report = _sync_kb(landing, lake)
    mem_report = sync_sources("memories", landing, lake, LIMITS, "acme", "u1")

    errors = _errors(lake)
    by_path = {(r["path"].rsplit("/", 1)[-1], r["line"]): r["reason"] for r in errors.to_dicts()}
    for name in ("empty.txt", "binary.txt", "truncated.pdf", "huge.txt", "leak.txt"):
        assert (name, None) in by_path, (name, by_path)
    assert ("records.jsonl", 2) in by_path
    assert ("memories.jsonl", 2) in by_path
    assert "landing folder" in by_path[("leak.txt", None)]
    assert set(errors["org_id"].to_list()) == {"acme"}

    docs = _docs(lake)
    texts = " ".join(docs["text"].to_list())
    assert "A fine document." in texts and "first record" in texts and "third record" in texts
    assert "host secret" not in texts
    assert docs_report.failed_files == 6
    assert mem_report.rows == 1

    # Fixing a file clears its error on the next run; the other errors stay.
    _write(landing, f"{KB}/empty.txt", "Now it has text.")
    _sync_kb(landing, lake)
    paths = [p.rsplit("/", 1)[-1] for p in _errors(lake)["path"].to_list()]
    assert "empty.txt" not in paths and "binary.txt" in paths


def test_assets_report_counts_and_warnings_in_metadata(tmp_path: Path) -> None:
    settings = get_settings()
    landing = settings.landing_dir
    copy_sample_corpus(landing)
    _write(landing, f"{KB}/broken.jsonl", '{"text": "ok"}\nnot json\n')
    lake = build_resources(settings)["lake"]
    instance = dg.DagsterInstance.ephemeral()
    results = materialize_partitions(
        [raw_documents, memories, conversations], {"lake": lake}, landing, instance=instance
    )
    assert set(results) == {
        "acme/handbook",
        "brambleway/company_docs",
        "saltmarsh/operations",
        "brambleway/declan",
        "brambleway/helene",
        "brambleway/priya",
        "saltmarsh/ruth",
    }
    assert all(r.success for r in results.values())
    docs = metadata(results, "raw_documents")
    assert set(docs) == {"acme/handbook", "brambleway/company_docs", "saltmarsh/operations"}
    assert set(metadata(results, "memories")) == set(metadata(results, "conversations"))
    handbook = docs["acme/handbook"]
    assert handbook["failed"] == 1 and handbook["files"] == 1
    assert "not json" in handbook["warnings"] or "line" in handbook["warnings"]
    assert docs["brambleway/company_docs"]["failed"] == 0
    assert docs["brambleway/company_docs"]["dagster/row_count"] > 0
    assert "| title |" in docs["brambleway/company_docs"]["preview"]
    # Each partition's metadata counts its own knowledge base only.
    assert sum(m["dagster/row_count"] for m in docs.values()) == _docs(settings.lake_dir).height
    checks = results["saltmarsh/operations"].get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("raw_documents_unique_ids", True)]

    again = materialize_partitions(
        [raw_documents], {"lake": lake}, landing, instance=instance, keys=["saltmarsh/operations"]
    )
    meta = metadata(again, "raw_documents")["saltmarsh/operations"]
    assert meta["changed"] == 0
    assert meta["summary"].startswith("documents: 0 changed")
    # Each materialization records the table's Delta version; the rerun committed nothing.
    version = table_versions(settings.lake, ["raw_documents"])["raw_documents"]
    assert max(m["table_version"] for m in docs.values()) == version
    assert meta["table_version"] == version and meta["committed"] is False


def _evaluate(cursor: str | None, instance: dg.DagsterInstance, lake: object) -> dg.SensorResult:
    from memcity_pipeline.defs.ingest import landing_sensor

    result = landing_sensor(
        dg.build_sensor_context(cursor=cursor, resources={"lake": lake}, instance=instance)
    )
    assert isinstance(result, dg.SensorResult)
    for request in result.dynamic_partitions_requests or []:  # what the daemon would apply
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    return result


def _requested(result: dg.SensorResult) -> list[tuple[str | None, str | None]]:
    return sorted((r.job_name, r.partition_key) for r in result.run_requests or [])


def test_sensor_requests_runs_only_for_partitions_whose_files_changed() -> None:
    settings = get_settings()
    lake = build_resources(settings)["lake"]
    instance = dg.DagsterInstance.ephemeral()
    landing = settings.landing_dir
    _write(landing, f"{KB}/a.md", "# A\n\ntext")
    _write(landing, "orgs/acme/users/ann/memories.jsonl", '{"id": "m1", "text": "tea"}\n')

    first = _evaluate(None, instance, lake)
    assert _requested(first) == [
        ("ingest_knowledge_bases", "acme/handbook"),
        ("ingest_users", "acme/ann"),
        ("sync_landing_layout_job", None),  # the first look records the layout errors (none)
    ]
    assert instance.get_dynamic_partitions("knowledge_bases") == ["acme/handbook"]
    assert instance.get_dynamic_partitions("users") == ["acme/ann"]

    same = _evaluate(first.cursor, instance, lake)
    assert same.skip_reason is not None and not same.run_requests

    # A new knowledge base and an edit in the user: those two partitions, nothing else.
    _write(landing, "orgs/acme/knowledge_bases/wiki/w.md", "# W\n\nwiki")
    _write(landing, "orgs/acme/users/ann/memories.jsonl", '{"id": "m1", "text": "coffee"}\n')
    changed = _evaluate(same.cursor, instance, lake)
    assert _requested(changed) == [
        ("ingest_knowledge_bases", "acme/wiki"),
        ("ingest_users", "acme/ann"),
    ]
    assert sorted(instance.get_dynamic_partitions("knowledge_bases")) == [
        "acme/handbook",
        "acme/wiki",
    ]

    # A knowledge base whose folder is gone loses its partition, and its data is removed.
    shutil.rmtree(landing / KB)
    removed = _evaluate(changed.cursor, instance, lake)
    assert _requested(removed) == [("sync_landing_layout_job", None)]
    config = removed.run_requests[0].run_config["ops"]["sync_landing_layout"]["config"]
    assert config == {"knowledge_bases": ["acme/handbook"], "users": []}
    assert instance.get_dynamic_partitions("knowledge_bases") == ["acme/wiki"]


def test_copy_sample_corpus_twice_changes_nothing(dirs: tuple[Path, Path]) -> None:
    landing, lake = dirs
    copy_sample_corpus(landing)
    sync_every_scope("documents", landing, lake, LIMITS)
    copy_sample_corpus(landing)
    assert sync_every_scope("documents", landing, lake, LIMITS).changed_total == 0


def test_files_outside_the_layout_are_reported(dirs: tuple[Path, Path]) -> None:
    landing, lake = dirs
    _write(landing, "orgs/acme/stray.txt", "where does this go?")
    _write(landing, "orgs/acme/users/u1/notes.txt", "not a known user file")
    shutil.copytree(sample_corpus_dir() / "orgs", landing / "orgs", dirs_exist_ok=True)
    found = landing_scopes(landing)
    assert [p.rel_path for p in found.unscoped] == ["orgs/acme/stray.txt"]
    assert "acme/u1" in found.users  # a user folder with nothing usable is still a partition
    assert sync_layout_errors(lake, found.unscoped) == 1
    # A wrong file in a user's folder is an error of that user, recorded by `memories`.
    report = sync_sources("memories", landing, lake, LIMITS, "acme", "u1")
    assert [e["path"] for e in report.errors] == ["orgs/acme/users/u1/notes.txt"]
    errors = _errors(lake)
    reasons = dict(zip(errors["path"].to_list(), errors["reason"].to_list(), strict=True))
    assert "landing layout" in reasons["orgs/acme/stray.txt"]
    sync_every_scope("documents", landing, lake, LIMITS)
    assert json.loads(_docs(lake)["metadata"][0]) is not None
