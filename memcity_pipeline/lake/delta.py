"""The lake's tables on Delta Lake (delta-rs): read a partition's rows, bring them to a wanted
state with one MERGE, delete a partition, list partitions, and keep tables compact.

Contracts:

- Every registered table (`lake.tables.TABLES`) is one Delta table at `<lake>/<folder>`,
  partitioned by its `partition_by` columns (org and knowledge base, user or day) and, for the
  large tables, by `bucket`: a stable hash (crc32) of one column modulo `BUCKETS`, so that a
  partition's rows lie in up to 32 files and a change rewrites only the files of its buckets.
  `bucket` is a storage column: reads leave it out, writes compute it.
- `write_rows(lake, table, where, frame)` makes the rows that match `where` (equalities on the
  partition columns, and possibly one more column such as `kind`) exactly `frame`. It reads those
  rows, finds the keys that are new or whose row changed and the keys that left, and commits ONE
  `MERGE` whose predicate names the partition (so only that partition's files holding changed
  rows are rewritten, and concurrent writers of other partitions do not conflict). With no
  difference it commits nothing and returns None; otherwise the table version it committed.
- A commit that loses a race with a concurrent one (`CommitFailedError`) is retried from the
  read, with jittered backoff: the wanted state is recomputed against what the other run wrote.
- Readers see a committed version, never part of a write; a process killed during a write leaves
  at most data files no version references (removed by `maintain`'s vacuum).
- Reads return the table's columns in schema order, cast to its schema, sorted by its
  `order_by`; a table or partition with no rows is an empty frame of the schema. A read of some
  columns fetches only those (and the ones it filters and sorts on) from storage.
- A column added to a table's schema is added to the stored table by its next write; until
  then (and for rows written before) it reads as null.
"""

import logging
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import polars as pl
import pyarrow as pa
from deltalake import DeltaTable, Field
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from memcity_pipeline.lake.location import Lake
from memcity_pipeline.lake.tables import BUCKET, BUCKETS, Table, Where, table

log = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 12
_DELETE = "_memcity_delete"  # a source row of a MERGE that deletes its match
_FRESH = "_memcity_fresh"  # a source row of a MERGE that is inserted, never matched


def _commit_retries(name: str) -> Retrying:
    """The retries of a commit to table `name` that lost a race with a concurrent one."""
    return Retrying(
        retry=retry_if_exception_type(CommitFailedError),
        stop=stop_after_attempt(COMMIT_ATTEMPTS),
        wait=wait_random_exponential(multiplier=0.05, max=2.0),
        reraise=True,
        before_sleep=lambda s: log.info("%s: concurrent commit, retrying (%s)", name, s.outcome),
    )


def _lake(lake: "Lake | str | Any") -> Lake:
    return Lake.of(lake)


def open_table(lake: Lake | str, name: str) -> DeltaTable | None:
    """The Delta table of `name`, or None when it was never written."""
    lake = _lake(lake)
    try:
        return DeltaTable(table(name).uri(lake), storage_options=lake.storage_options())
    except TableNotFoundError:
        return None


def table_version(lake: Lake | str, name: str) -> int | None:
    """The current version of table `name` (None when it does not exist)."""
    dt = open_table(lake, name)
    return None if dt is None else dt.version()


def _ensure_table(lake: Lake, t: Table) -> DeltaTable:
    dt = open_table(lake, t.name)
    if dt is not None:
        return dt
    return DeltaTable.create(
        t.uri(lake),
        t.storage_schema,
        mode="ignore",
        partition_by=t.storage_partitions,
        name=t.name,
        storage_options=lake.storage_options(),
    )


def _add_new_columns(dt: DeltaTable, t: Table) -> None:
    """Add to the stored table the columns its schema gained since it was created (a
    metadata-only commit; existing rows read them as null)."""
    stored = set(dt.schema().to_arrow().names)
    new = [f for f in t.storage_schema if f.name not in stored]
    if new:
        dt.alter.add_columns([Field.from_arrow(f) for f in new])
        log.info("%s: added the columns %s", t.name, ", ".join(f.name for f in new))


def _literal(value: str | None) -> str:
    if value is None:
        return "NULL"
    return "'" + value.replace("'", "''") + "'"


def _sql_where(where: Where, alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    parts = [
        f"({prefix}`{col}` IS NULL)" if val is None else f"({prefix}`{col}` = {_literal(val)})"
        for col, val in where.items()
    ]
    return " AND ".join(parts) or "TRUE"


def _polars_where(where: Where) -> pl.Expr:
    expr = pl.lit(True)
    for col, val in where.items():
        expr = expr & (pl.col(col).is_null() if val is None else pl.col(col) == val)
    return expr


def empty_frame(name: str) -> pl.DataFrame:
    """An empty frame of table `name`'s schema."""
    return pl.from_arrow(table(name).schema.empty_table())  # type: ignore[return-value]


def _conform(t: Table, frame: pl.DataFrame, columns: list[str] | None = None) -> pl.DataFrame:
    """`frame` with exactly the table's columns (or `columns` of them), in order, cast to its
    schema; a column the stored table lacks (added to the schema since) is null."""
    names = columns or t.schema.names
    missing = [c for c in names if c not in frame.columns]
    if missing:
        frame = frame.with_columns(pl.lit(None).alias(c) for c in missing)
    schema = pa.schema([t.schema.field(c) for c in names])
    arrow = frame.select(names).to_arrow().cast(schema)
    return pl.from_arrow(arrow)  # type: ignore[return-value]


def _with_bucket(t: Table, frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` (conformed) with the storage column `bucket` of a bucketed table."""
    if not t.bucket_by:
        return frame
    buckets = [zlib.crc32(v.encode()) % BUCKETS for v in frame[t.bucket_by].fill_null("")]
    return frame.with_columns(pl.Series(BUCKET, buckets, pl.Int32))


def _read(dt: DeltaTable | None, t: Table, where: Where, columns: list[str] | None) -> pl.DataFrame:
    if dt is None:
        frame = empty_frame(t.name)
        return frame.select(columns) if columns else frame
    filters = [(c, "=", v) for c, v in where.items() if c in t.partition_by and v is not None]
    order = [c for c in t.order_by if c in t.schema.names]
    wanted = None
    if columns:  # only what is asked, filtered on and sorted by is read from storage
        wanted = list(dict.fromkeys([*columns, *where, *order]))
    stored = set(dt.schema().to_arrow().names)
    arrow = dt.to_pyarrow_table(
        filters=filters or None,
        columns=[c for c in wanted if c in stored] if wanted is not None else None,
    )
    frame = _conform(t, pl.from_arrow(arrow), wanted)  # type: ignore[arg-type]
    frame = frame.filter(_polars_where(where))
    if order:
        frame = frame.sort(order, nulls_last=True, maintain_order=True)
    return frame.select(columns) if columns else frame


def read_rows(
    lake: Lake | str, name: str, where: Where | None = None, columns: list[str] | None = None
) -> pl.DataFrame:
    """The rows of table `name` that match `where` (all rows without it)."""
    t = table(name)
    return _read(open_table(lake, name), t, where or {}, columns)


def has_rows(lake: Lake | str, name: str, where: Where) -> bool:
    """Whether table `name` holds any row matching `where` (from the log: no data file read
    when `where` names only partition columns)."""
    t = table(name)
    if set(where) <= set(t.partition_by):
        return any(_matches(p, where) for p in partitions(lake, name))
    return read_rows(lake, name, where, columns=list(t.key[:1])).height > 0


def _matches(partition: Mapping[str, str | None], where: Where) -> bool:
    return all(partition.get(c) == v for c, v in where.items())


def partitions(lake: Lake | str, name: str) -> list[dict[str, str | None]]:
    """The partitions (partition column -> value) that hold files of table `name`."""
    t = table(name)
    dt = open_table(lake, name)
    if dt is None:
        return []
    actions = pl.from_arrow(pa.table(dt.get_add_actions(flatten=True)))
    cols = [f"partition.{c}" for c in t.partition_by]
    if actions.height == 0:  # type: ignore[union-attr]
        return []
    rows = actions.select(cols).unique().sort(cols, nulls_last=True)  # type: ignore[union-attr]
    return [{c: r[f"partition.{c}"] for c in t.partition_by} for r in rows.iter_rows(named=True)]


def _changes(t: Table, old: pl.DataFrame, new: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """What turns the partition's rows `old` into `new` (unique keys): (rows of `new` to write,
    with `_FRESH` true where they must be inserted rather than matched; whole rows of `old` to
    delete).

    A key of `new` is written when it is new or its row changed; an old row goes when its key
    left. A key whose old rows cannot simply be updated is replaced (its old rows deleted, its
    new row inserted fresh): a row that moves to another bucket (the bucket of some tables
    derives from another column than the key: chunks by their document), and a key held by
    several old rows (a lake damaged by an earlier version), which is how such a lake heals.
    """
    keys = list(t.key)
    hashed_old = old.with_columns(_h=old.hash_rows(seed=7))
    hashed_new = new.with_columns(_h=new.hash_rows(seed=7))
    replaced = old.group_by(keys).len().filter(pl.col("len") > 1).select(keys)
    if t.bucket_by and t.bucket_by not in keys:
        moved = (
            _with_bucket(t, old)
            .join(
                _with_bucket(t, new).select([*keys, pl.col(BUCKET).alias("_to")]),
                on=keys,
                nulls_equal=True,
            )
            .filter(pl.col(BUCKET) != pl.col("_to"))
            .select(keys)
        )
        replaced = pl.concat([replaced, moved]).unique()
    changed = hashed_new.join(
        hashed_old.select([*keys, "_h"]), on=[*keys, "_h"], how="anti", nulls_equal=True
    ).drop("_h")
    writes = pl.concat(
        [
            changed.join(replaced, on=keys, how="anti", nulls_equal=True).with_columns(
                pl.lit(False).alias(_FRESH)
            ),
            new.join(replaced, on=keys, how="semi", nulls_equal=True).with_columns(
                pl.lit(True).alias(_FRESH)
            ),
        ]
    )
    deletes = pl.concat(
        [
            old.join(new.select(keys), on=keys, how="anti", nulls_equal=True),
            old.join(replaced, on=keys, how="semi", nulls_equal=True),
        ]
    )
    # One delete per key and bucket: it removes every target row it matches.
    if t.bucket_by:
        deletes = _with_bucket(t, deletes).unique([*keys, BUCKET]).drop(BUCKET)
    else:
        deletes = deletes.unique(keys)
    return writes, deletes


def write_rows(lake: Lake | str, name: str, where: Where, frame: pl.DataFrame) -> int | None:
    """Make the rows of `name` matching `where` exactly `frame` (one MERGE inside the partition);
    the version committed, or None when nothing differed (nothing is committed then)."""
    lake, t = _lake(lake), table(name)
    wanted = _conform(t, frame).filter(_polars_where(where))
    if wanted.height != frame.height:
        raise ValueError(f"{name}: rows given outside {dict(where)}")
    wanted = wanted.unique(subset=list(t.key), keep="last", maintain_order=True)
    for attempt in _commit_retries(name):
        with attempt:
            return _merge(lake, t, where, wanted)
    return None  # pragma: no cover (Retrying re-raises)


def _merge(lake: Lake, t: Table, where: Where, wanted: pl.DataFrame) -> int | None:
    dt = open_table(lake, t.name)
    old = _read(dt, t, where, None)
    writes, deletes = _changes(t, old, wanted)
    if writes.height == 0 and deletes.height == 0:
        return None
    if dt is None:
        dt = _ensure_table(lake, t)
    _add_new_columns(dt, t)
    source = pl.concat(
        [
            writes.with_columns(pl.lit(False).alias(_DELETE)),
            _conform(t, deletes).with_columns(
                pl.lit(False).alias(_FRESH), pl.lit(True).alias(_DELETE)
            ),
        ]
    )
    source = _with_bucket(t, source).to_arrow()
    # parenthesised: the SQL parser binds `IS NOT DISTINCT FROM` looser than `AND`
    on = " AND ".join(f"(t.`{k}` IS NOT DISTINCT FROM s.`{k}`)" for k in t.key)
    if t.bucket_by:  # lets delta-rs skip the files of other buckets
        on += f" AND t.`{BUCKET}` = s.`{BUCKET}`"
    columns = {c: f"s.`{c}`" for c in t.storage_schema.names}
    (
        dt.merge(
            source,
            predicate=f"{_sql_where(where, 't')} AND {on} AND NOT s.`{_FRESH}`",
            source_alias="s",
            target_alias="t",
        )
        .when_matched_delete(predicate=f"s.`{_DELETE}`")
        .when_matched_update(updates=columns)
        .when_not_matched_insert(updates=columns, predicate=f"NOT s.`{_DELETE}`")
        .execute()
    )
    return dt.version()


def delete_rows(lake: Lake | str, name: str, where: Where) -> int | None:
    """Delete the rows of `name` matching `where`; the version committed, or None when there
    were none (nothing committed)."""
    lake, t = _lake(lake), table(name)
    if not has_rows(lake, name, where):
        return None
    for attempt in _commit_retries(name):
        with attempt:
            dt = open_table(lake, t.name)
            assert dt is not None
            dt.delete(_sql_where(where))
            return dt.version()
    return None  # pragma: no cover


def append_rows(lake: Lake | str, name: str, frame: pl.DataFrame) -> int:
    """Append `frame` to table `name` (appends never conflict with one another)."""
    from deltalake import write_deltalake

    lake, t = _lake(lake), table(name)
    _ensure_table(lake, t)
    for attempt in _commit_retries(name):
        with attempt:
            _add_new_columns(_ensure_table(lake, t), t)
            write_deltalake(
                t.uri(lake),
                _with_bucket(t, _conform(t, frame)).to_arrow(),
                mode="append",
                partition_by=t.storage_partitions,
                storage_options=lake.storage_options(),
            )
    version = table_version(lake, name)
    assert version is not None
    return version


def table_versions(lake: Lake | str, names: Iterable[str]) -> dict[str, int | None]:
    """The current version of each of `names` (None for a table never written)."""
    return {n: table_version(lake, n) for n in names}


def maintain(lake: Lake | str, name: str, retention_hours: float) -> dict[str, Any]:
    """Compact table `name`'s small files and vacuum files older than `retention_hours` that no
    kept version references; what was done."""
    dt = open_table(lake, name)
    if dt is None:
        return {"table": name, "exists": False}
    compacted = dt.optimize.compact()
    removed = dt.vacuum(
        retention_hours=int(retention_hours), dry_run=False, enforce_retention_duration=False
    )
    dt.cleanup_metadata()
    return {
        "table": name,
        "version": dt.version(),
        "files_added": compacted.get("numFilesAdded", 0),
        "files_removed": compacted.get("numFilesRemoved", 0),
        "vacuumed_files": len(removed),
    }
