"""Reconcile, "rebuild what changed, drop what left": the one step of every incremental stage.

`plan_rows` compares the rows a stage wants now (`wanted`, one per key, each with a fingerprint
of what its output depends on) with the rows the table holds (`existing`). A row whose key is
still wanted, whose fingerprint is unchanged and which passes `reusable` is kept as it is; every
other wanted key is to be computed; existing keys no longer wanted drop out. Done with polars
joins, so a knowledge base of many thousand chunks costs no Python loop.

A stage then writes a partition's table only when its plan `changed` (something computed,
something dropped, or no table yet), so a rerun on unchanged input writes nothing. Knowledge
bases and users that leave are not reconciled here: their partitions are deleted and their files
removed by `lake.scopes.drop_scope`.
"""

from dataclasses import dataclass

import polars as pl


@dataclass(frozen=True)
class RowPlan:
    """What to do with one scope's rows."""

    reuse: pl.DataFrame  # existing rows kept as they are (all their columns)
    todo: pl.DataFrame  # wanted rows to compute (all the wanted frame's columns)
    dropped: int  # existing rows whose key is no longer wanted, or is recomputed

    @property
    def changed(self) -> bool:
        """Whether the table's content changes: something to compute or to drop."""
        return self.todo.height > 0 or self.dropped > 0


def plan_rows(
    wanted: pl.DataFrame,
    existing: pl.DataFrame,
    *,
    key: str | list[str],
    fingerprint: str,
    existing_fingerprint: str | None = None,
    reusable: pl.Expr | None = None,
    row_key: str | list[str] | None = None,
) -> RowPlan:
    """Split `wanted` into rows to compute and `existing` rows to reuse.

    `fingerprint` names the column of `wanted` that must equal `existing_fingerprint` (the same
    name by default) of an existing row with the same `key` for that row to be reused;
    `reusable` is an extra condition on existing rows (say, "not failed"). Existing rows may
    hold several rows per key (chunks per document): a key is reused only when every one of
    them matches, and then all of them are kept, once per `row_key` (the table's own key, `key`
    by default): an existing row that repeats a kept row's `row_key` is dropped, so that a table
    holding the same row twice (damaged by an earlier version) is rewritten whole.
    """
    keys = [key] if isinstance(key, str) else list(key)
    old_fp = existing_fingerprint or fingerprint
    if existing.height == 0:
        return RowPlan(existing, wanted, 0)
    candidates = existing if reusable is None else existing.filter(reusable)
    # A key is reusable when all its existing rows carry the wanted fingerprint.
    per_key = candidates.group_by(keys).agg(
        pl.col(old_fp).n_unique().alias("_fingerprints"),
        pl.col(old_fp).first().alias("_fingerprint"),
        pl.len().alias("_rows"),
    )
    totals = existing.group_by(keys).agg(pl.len().alias("_all"))
    matched = (
        wanted.select([*keys, pl.col(fingerprint).alias("_wanted")])
        .join(per_key, on=keys, how="inner")
        .join(totals, on=keys, how="inner")
        .filter(
            (pl.col("_fingerprints") == 1)
            & (pl.col("_fingerprint") == pl.col("_wanted"))
            & (pl.col("_rows") == pl.col("_all"))
        )
        .select(keys)
    )
    reuse = existing.join(matched, on=keys, how="semi").unique(
        subset=row_key or keys, keep="first", maintain_order=True
    )
    todo = wanted.join(matched, on=keys, how="anti")
    return RowPlan(reuse, todo, existing.height - reuse.height)
