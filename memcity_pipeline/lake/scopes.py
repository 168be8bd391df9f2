"""One knowledge base's or one user's data across the lake, and removing it all at once.

A knowledge base (a user) whose landing folder is gone loses its Dagster partition; `drop_scope`
then deletes its partition of every table of its scope (one delete by predicate per table that
holds any), its BM25 index, and the bookkeeping of its landing files and their errors. Nothing
of another scope is touched.
"""

from pathlib import Path

from memcity_pipeline.lake.delta import delete_rows
from memcity_pipeline.lake.files import delete_prefix
from memcity_pipeline.lake.location import Lake
from memcity_pipeline.lake.tables import (
    KINDS_OF_SCOPE,
    TABLES,
    ScopeKind,
    bm25_prefix,
    bookkeeping_where,
)

_BM25_ITEMS = {"knowledge_base": "chunks", "user": "memories"}


def drop_scope(lake: Lake | str | Path, scope: ScopeKind, org_id: str, scope_id: str) -> list[str]:
    """Delete every lake row and file of one knowledge base or user; what was removed
    (`<table>/<org>/<scope>` for tables, the index folder for the BM25 index)."""
    lake = Lake.of(lake)
    removed: list[str] = []
    for table in TABLES.values():
        if table.scope != scope:
            continue
        if delete_rows(lake, table.name, table.scope_where(org_id, scope_id)) is not None:
            removed.append(f"{table.name}/{org_id}/{scope_id}")
    for kind in KINDS_OF_SCOPE[scope]:
        for name in ("source_files", "ingestion_errors"):
            if delete_rows(lake, name, bookkeeping_where(kind, org_id, scope_id)) is not None:
                removed.append(f"{name}/{kind}/{org_id}/{scope_id}")
    index = bm25_prefix(_BM25_ITEMS[scope], org_id, scope_id)  # type: ignore[arg-type]
    if delete_prefix(lake, index):
        removed.append(index)
    return sorted(removed)
