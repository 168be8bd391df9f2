"""Convert a lake written by earlier versions (one Parquet file per table and scope, replaced
whole) into the Delta tables of `lake.tables`, in place, losing no row.

Earlier layout, all local (object storage was not supported then):

- `<table>/<org>/<kb or user>.parquet` for every knowledge-base and user table;
- `_state/source_files/<kind>/<org>/<scope>.parquet` (no `kind` column: it was the folder);
- `ingestion_errors/<kind>/<org>/<scope>.parquet` and `ingestion_errors/layout.parquet`;
- `rlm_sessions/date=<day>/<session_id>.parquet` (no `date` column) and pending markers
  `rlm_sessions/_pending/<session_id>`;
- BM25 folders `indexes/<items>_bm25/<org>/<scope>/` with a marker `<scope>.source`.

Each file is merged into its Delta table by key (`lake.delta.write_rows` for one partition,
an append for sessions), and deleted only after its rows are committed, so an interrupted
migration is finished by the next one without duplicating a row. A BM25 folder is moved into
the published layout of `search.bm25_store` (or removed, to be rebuilt, when it has no marker).
`migrate_lake` is cheap when there is nothing to convert (a few folder listings).
"""

import logging
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from memcity_pipeline.lake.delta import append_rows, read_rows, write_rows
from memcity_pipeline.lake.files import put_bytes
from memcity_pipeline.lake.location import Lake
from memcity_pipeline.lake.tables import BM25_POINTER, LAYOUT_ERRORS, SOURCE_KINDS, TABLES

log = logging.getLogger(__name__)

_DAY = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")


@dataclass
class MigrationReport:
    """What a migration converted: rows per table, files removed, BM25 indexes moved."""

    rows: dict[str, int] = field(default_factory=dict)
    files: int = 0
    indexes: int = 0

    @property
    def converted(self) -> bool:
        return bool(self.files or self.indexes)

    def summary(self, lake: Lake) -> str:
        if not self.converted:
            return f"the lake at {lake.uri} has no Parquet files of an earlier version"
        tables = ", ".join(f"{t}: {n}" for t, n in sorted(self.rows.items()))
        return (
            f"converted the Parquet lake at {lake.uri} to Delta tables: {self.files} files, "
            f"{sum(self.rows.values())} rows ({tables}), {self.indexes} BM25 indexes"
        )


def _old_scope_files(root: Path, table: str) -> list[Path]:
    folder = root / table
    return sorted(p for p in folder.glob("*/*.parquet") if "=" not in p.parent.name and p.is_file())


def needs_migration(lake: Lake | str | Path) -> bool:
    """Whether a local lake still holds files of the earlier Parquet layout."""
    lake = Lake.of(lake)
    return lake.is_local and lake.path.is_dir() and _has_old_files(lake.path)


def _old(paths: Iterable[Path]) -> list[Path]:
    """Files of the earlier layout (a Delta table's own files lie in `<column>=<value>/`)."""
    return [p for p in paths if not any("=" in part for part in p.parts[-3:-1])]


def _has_old_files(root: Path) -> bool:
    return (
        any(_old((root / "_state" / "source_files").glob("*/*/*.parquet")))
        or any(_old((root / "ingestion_errors").glob("*/*/*.parquet")))
        or (root / "ingestion_errors" / "layout.parquet").exists()
        or any((root / "rlm_sessions").glob("date=*/*.parquet"))
        or any((root / "rlm_sessions" / "_pending").glob("*"))
        or any(_old_scope_files(root, t.name) for t in TABLES.values() if t.scope != "lake")
        or any((root / "indexes").glob("*_bm25/*/*.source"))
    )


def migrate_lake(lake: Lake | str | Path) -> MigrationReport:
    """Convert every file of the earlier layout; what was converted (nothing on a Delta lake)."""
    lake = Lake.of(lake)
    report = MigrationReport()
    if not needs_migration(lake):
        return report
    root = lake.path
    for t in TABLES.values():
        if t.scope in ("knowledge_base", "user"):
            for path in _old_scope_files(root, t.name):
                where = t.scope_where(path.parent.name, path.stem)
                if (frame := _read_old(path)) is not None:
                    _merge_file(lake, t.name, where, frame, path, report)
    for kind in SOURCE_KINDS:
        for name, folder in (
            ("source_files", root / "_state" / "source_files" / kind),
            ("ingestion_errors", root / "ingestion_errors" / kind),
        ):
            for path in sorted(_old(folder.glob("*/*.parquet"))):
                where = {"org_id": path.parent.name, "scope_id": path.stem, "kind": kind}
                if (old := _read_old(path)) is None:
                    continue
                frame = old.with_columns(
                    pl.lit(kind).alias("kind"),
                    pl.lit(path.parent.name).alias("org_id"),
                    pl.lit(path.stem).alias("scope_id"),
                )
                _merge_file(lake, name, where, frame, path, report)
    layout = root / "ingestion_errors" / "layout.parquet"
    if (old := _read_old(layout)) is not None:
        frame = old.with_columns(pl.lit(None, pl.String).alias("scope_id"))
        _merge_file(lake, "ingestion_errors", LAYOUT_ERRORS, frame, layout, report)
    _migrate_sessions(lake, root, report)
    _migrate_bm25(lake, root, report)
    _remove_empty_folders(root)
    if report.converted:
        log.warning(report.summary(lake))
    return report


def _read_old(path: Path) -> pl.DataFrame | None:
    try:
        return pl.read_parquet(path)
    except FileNotFoundError:  # converted meanwhile by another process
        return None


def _merge_file(
    lake: Lake,
    name: str,
    where: dict[str, str | None],
    frame: pl.DataFrame,
    path: Path,
    report: MigrationReport,
) -> None:
    """Merge one old file's rows into its partition (keeping rows the partition already has
    under other keys), then delete the file."""
    rows = frame.height
    current = read_rows(lake, name, where)
    if current.height:
        frame = pl.concat([current, frame], how="diagonal_relaxed")
    write_rows(lake, name, where, frame)
    report.rows[name] = report.rows.get(name, 0) + rows
    report.files += 1
    path.unlink(missing_ok=True)  # (another process migrating at once may have removed it)


def _migrate_sessions(lake: Lake, root: Path, report: MigrationReport) -> None:
    folder = root / "rlm_sessions"
    have = set(read_rows(lake, "rlm_sessions", columns=["session_id"])["session_id"].to_list())
    for path in sorted(folder.glob("date=*/*.parquet")):
        day = _DAY.match(path.parent.name)
        if (old := _read_old(path)) is None:
            continue
        frame = old.with_columns(pl.lit(day.group(1) if day else None, pl.String).alias("date"))
        fresh = frame.filter(~pl.col("session_id").is_in(sorted(have)))
        if fresh.height:
            append_rows(lake, "rlm_sessions", fresh)
            have |= set(fresh["session_id"].to_list())
        report.rows["rlm_sessions"] = report.rows.get("rlm_sessions", 0) + frame.height
        report.files += 1
        path.unlink(missing_ok=True)
    pending = folder / "_pending"
    for marker in sorted(pending.glob("*")) if pending.is_dir() else []:
        put_bytes(lake, f"_state/sessions_pending/{marker.name}", b"")
        marker.unlink()
        report.files += 1


def _migrate_bm25(lake: Lake, root: Path, report: MigrationReport) -> None:
    for marker in sorted((root / "indexes").glob("*_bm25/*/*.source")):
        folder = marker.with_suffix("")
        key = marker.read_text().strip()
        if (folder / "meta.json").exists() and key:
            staging = folder.with_name(f".{folder.name}.migrating")
            shutil.rmtree(staging, ignore_errors=True)
            folder.rename(staging)
            folder.mkdir()
            staging.rename(folder / key[:16])
            (folder / BM25_POINTER).write_text(key)
            report.indexes += 1
        marker.unlink()
    for folder in sorted((root / "indexes").glob("*_bm25/*/*")):
        if folder.is_dir() and (folder / "meta.json").exists():  # unmarked: rebuilt next run
            shutil.rmtree(folder)
            report.indexes += 1


def _remove_empty_folders(root: Path) -> None:
    for day in sorted((root / "rlm_sessions").glob("date=*")):
        if day.is_dir() and not any(day.iterdir()):
            day.rmdir()
    for top in ("_state/source_files", "ingestion_errors", "rlm_sessions/_pending"):
        base = root / top
        for folder in sorted(base.rglob("*"), reverse=True) if base.is_dir() else []:
            if folder.is_dir() and "=" not in folder.name and not any(folder.iterdir()):
                folder.rmdir()
    for t in TABLES.values():
        for folder in (root / t.name).glob("*") if (root / t.name).is_dir() else []:
            old = folder.is_dir() and "=" not in folder.name and folder.name != "_delta_log"
            if old and not any(folder.iterdir()):
                folder.rmdir()
