"""One knowledge base's or one user's files across the lake, and removing them all at once.

A knowledge base (a user) whose landing folder is gone loses its Dagster partition; `drop_scope`
then removes every file the lake holds for it: its part of every table of its scope, its BM25
index, and the bookkeeping of its landing files and their errors. Nothing of another scope is
touched.
"""

import shutil
from pathlib import Path

from memcity_pipeline.lake.io import delete_table
from memcity_pipeline.lake.tables import (
    KINDS_OF_SCOPE,
    TABLES,
    ScopeKind,
    bm25_dir,
    ingestion_errors_path,
    source_files_path,
)

_BM25_ITEMS = {"knowledge_base": "chunks", "user": "memories"}


def drop_bm25_dir(directory: Path) -> bool:
    """Remove a BM25 index folder and its source marker; True when there was one."""
    existed = directory.exists()
    shutil.rmtree(directory, ignore_errors=True)
    (directory.parent / f"{directory.name}.source").unlink(missing_ok=True)
    return existed


def drop_scope(lake: Path, scope: ScopeKind, org_id: str, scope_id: str) -> list[str]:
    """Remove every lake file of one knowledge base or user; the lake-relative paths removed."""
    removed: list[Path] = []
    for table in TABLES.values():
        if table.scope == scope and delete_table(path := table.path(lake, org_id, scope_id)):
            removed.append(path)
    for kind in KINDS_OF_SCOPE[scope]:
        for path in (
            source_files_path(lake, kind, org_id, scope_id),
            ingestion_errors_path(lake, kind, org_id, scope_id),
        ):
            if delete_table(path):
                removed.append(path)
    index = bm25_dir(lake, _BM25_ITEMS[scope], org_id, scope_id)  # type: ignore[arg-type]
    if drop_bm25_dir(index):
        removed.append(index)
    return sorted(p.relative_to(lake).as_posix() for p in removed)
