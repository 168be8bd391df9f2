"""The checks that guard the lake's correctness: each table of a partition holds exactly the rows
that its upstream table calls for, every key once.

They are blocking: a failed one fails its step, so nothing downstream is built on a wrong table
in that run, the run fails, and `memcity ingest` exits 1 naming it. The next run of the
partition rewrites what is wrong (`lake.delta.write_rows` heals a damaged partition).
"""

from collections.abc import Iterable, Mapping
from typing import Any

import dagster as dg
import polars as pl


def verdict(check_name: str, problems: Mapping[str, int], **figures: Any) -> dg.AssetCheckResult:
    """A check that passes when every count of `problems` is 0; its description, shown by
    `memcity ingest` and the UI, names the nonzero ones (`2 duplicated chunk ids`)."""
    found = [f"{n:,} {name.replace('_', ' ')}" for name, n in problems.items() if n]
    return dg.AssetCheckResult(
        check_name=check_name,
        passed=not found,
        metadata={**problems, **figures},
        description=", ".join(found) or None,
    )


def same_ids(
    check_name: str, expected: Iterable[str], found: Iterable[str], what: str
) -> dg.AssetCheckResult:
    """Passes when `found` holds each id of `expected` exactly once and nothing else; counts the
    `what` missing, extra (in `found` only) and duplicated, with a few examples of each."""
    want = pl.Series("id", list(expected), pl.String).unique()
    got = pl.Series("id", list(found), pl.String)
    have = got.unique()
    missing = want.filter(~want.is_in(have.implode()))
    extra = have.filter(~have.is_in(want.implode()))
    duplicated = got.filter(got.is_duplicated()).unique()
    examples = {
        f"{name}_examples": ", ".join(sorted(ids.to_list())[:5])
        for name, ids in (("missing", missing), ("extra", extra), ("duplicated", duplicated))
        if ids.len()
    }
    return verdict(
        check_name,
        {
            f"{what}_missing": missing.len(),
            f"{what}_extra": extra.len(),
            f"{what}_duplicated": duplicated.len(),
        },
        **{what: got.len()},
        **examples,
    )


def spec(name: str, asset: str, description: str) -> dg.AssetCheckSpec:
    """A blocking check of `asset` (see the module's text)."""
    return dg.AssetCheckSpec(name, asset=asset, blocking=True, description=description)
