"""Ingestion assets: landing files into the lake's `raw_documents`, `memories`, `conversations`."""

from typing import Any

import dagster as dg
import polars as pl

from memcity_pipeline.defs.checks import spec, verdict
from memcity_pipeline.defs.metadata import markdown_table, preview
from memcity_pipeline.defs.partitions import (
    backfill_policy,
    knowledge_bases,
    partition_scopes,
    users,
)
from memcity_pipeline.ingestion.sync import SyncReport, sync_sources
from memcity_pipeline.lake.delta import empty_frame, read_rows, table_version
from memcity_pipeline.lake.tables import SOURCE_TABLES, SourceKind, scope_where
from memcity_pipeline.resources.lake import LakeResource

PREVIEW_COLUMNS: dict[SourceKind, list[str]] = {
    "documents": ["org_id", "knowledge_base_id", "title", "format", "char_count", "source_path"],
    "memories": ["org_id", "user_id", "memory_id", "text", "created_at"],
    "conversations": ["org_id", "user_id", "session_id", "turn", "role", "content"],
}
UNIQUE_KEYS: dict[SourceKind, list[str]] = {
    "documents": ["org_id", "document_id"],
    "memories": ["org_id", "user_id", "memory_id"],
    "conversations": ["org_id", "user_id", "session_id", "turn"],
}


def _sync(
    context: dg.AssetExecutionContext, lake: LakeResource, kind: SourceKind
) -> dg.MaterializeResult:
    """Sync each partition of this step (its own folder and tables only); one result for all."""
    reports: list[SyncReport] = []
    for org, scope in partition_scopes(context):
        report = sync_sources(
            kind,
            lake.landing,
            lake.lake,
            lake.limits,
            org,
            scope,
            on_progress=context.log.debug,
        )
        for err in report.new_errors:
            where = f"{err['path']}:{err['line']}" if err["line"] else err["path"]
            context.log.warning(f"{kind}: {where}: {err['reason']}")
        context.log.info(f"{org}/{scope}: {_summary(report)}")
        reports.append(report)
    total = SyncReport.combined(kind, reports)
    checks = [_unique_check(kind, reports, lake)]
    return dg.MaterializeResult(metadata=_metadata(lake, total, reports), check_results=checks)


def _summary(report: SyncReport) -> str:
    return (
        f"{report.kind}: {report.changed_total} changed ({report.new} new, {report.changed} edited,"
        f" {report.deleted} deleted), {report.unchanged} unchanged, {report.failed_files} failed;"
        f" {report.rows} rows"
    )


def _metadata(lake: LakeResource, report: SyncReport, parts: list[SyncReport]) -> dict[str, Any]:
    table = SOURCE_TABLES[report.kind]
    sample = pl.DataFrame()
    for p in parts:
        sample = read_rows(lake.lake, table, scope_where(table, p.org_id, p.scope_id))
        if sample.height:
            break
    version = table_version(lake.lake, table)
    meta: dict[str, Any] = {
        "summary": _summary(report),
        "dagster/row_count": report.rows,
        "files": report.files,
        "changed": report.changed_total,
        "new": report.new,
        "edited": report.changed,
        "deleted": report.deleted,
        "unchanged": report.unchanged,
        "failed": report.failed_files,
        "rows_written": report.rows_written,
        "tables_written": report.tables_written,
        "tables_deleted": report.tables_deleted,
        "lake_path": dg.MetadataValue.path(lake.lake.join(table)),
        "table_version": dg.MetadataValue.int(version)
        if version is not None
        else dg.MetadataValue.null(),
        "committed": report.versions.get(table) is not None,
        "preview": preview(sample, PREVIEW_COLUMNS[report.kind]),
    }
    if report.errors:
        meta["warnings"] = dg.MetadataValue.md(
            markdown_table(report.errors[:50], ["path", "line", "reason"], max_chars=120)
        )
    return meta


def _unique_check(
    kind: SourceKind, reports: list[SyncReport], lake: LakeResource
) -> dg.AssetCheckResult:
    keys = UNIQUE_KEYS[kind]
    table = SOURCE_TABLES[kind]
    frame = pl.concat(
        [
            read_rows(lake.lake, table, scope_where(table, r.org_id, r.scope_id), columns=keys)
            for r in reports
        ]
        or [empty_frame(table).select(keys)]
    )
    dupes = frame.group_by(keys).len().filter(pl.col("len") > 1)
    return verdict(f"{table}_unique_ids", {"duplicated_ids": dupes.height}, rows=frame.height)


@dg.asset(
    group_name="ingestion",
    kinds={"deltalake", "polars"},
    partitions_def=knowledge_bases,
    backfill_policy=backfill_policy,
    check_specs=[
        spec("raw_documents_unique_ids", "raw_documents", "Every document id appears once per org.")
    ],
)
def raw_documents(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    """Knowledge-base documents from the landing folder (txt, md, html, pdf, json, jsonl),
    normalised to UTF-8 text, one row per document, in the Delta table `raw_documents`
    (partition `<org>/<kb>`).
    One partition per knowledge base (`<org>/<kb>`).

    Incremental: unchanged files are not read again; edited files replace their rows; deleted
    files lose theirs. Unusable files and lines become rows of `ingestion_errors`.
    """
    return _sync(context, lake, "documents")


@dg.asset(
    group_name="ingestion",
    kinds={"deltalake", "polars"},
    partitions_def=users,
    backfill_policy=backfill_policy,
    check_specs=[spec("memories_unique_ids", "memories", "Every memory id appears once per user.")],
)
def memories(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    """Users' memories (`users/<user>/memories.jsonl`), one row per memory, in
    the Delta table `memories` (partition
    `<org>/<user>`). One partition per user (`<org>/<user>`). Incremental like
    `raw_documents`."""
    return _sync(context, lake, "memories")


@dg.asset(
    group_name="ingestion",
    kinds={"deltalake", "polars"},
    partitions_def=users,
    backfill_policy=backfill_policy,
    check_specs=[
        spec(
            "conversations_unique_ids",
            "conversations",
            "Every turn of a session appears once per user.",
        )
    ],
)
def conversations(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    """Users' conversation sessions (`users/<user>/conversations/<session>.jsonl`), one row per
    message, in the Delta table `conversations`. One partition per user. Incremental like
    `raw_documents`."""
    return _sync(context, lake, "conversations")
