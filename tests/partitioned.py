"""Test helpers for the partitioned pipeline: every scope of a landing folder, and
materializing assets partition by partition on one instance."""

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from memcity_pipeline.ingestion.landing import landing_scopes
from memcity_pipeline.ingestion.sync import Limits, SyncReport, sync_sources
from memcity_pipeline.lake.tables import PARTITIONS, SCOPE_OF_KIND, SourceKind, parse_scope_key


def scope_keys(landing: Path) -> dict[str, list[str]]:
    """Partition keys of the landing folder, by partitions name (`knowledge_bases`, `users`)."""
    found = landing_scopes(landing)
    return {
        PARTITIONS["knowledge_base"]: sorted(found.knowledge_bases),
        PARTITIONS["user"]: sorted(found.users),
    }


def sync_every_scope(kind: SourceKind, landing: Path, lake: Path, limits: Limits) -> SyncReport:
    """`sync_sources` of every knowledge base or user of the landing folder, added up."""
    keys = scope_keys(landing)[PARTITIONS[SCOPE_OF_KIND[kind]]]
    return SyncReport.combined(
        kind,
        [sync_sources(kind, landing, lake, limits, *parse_scope_key(k)) for k in keys],
    )


def materialize_partitions(
    assets: Sequence[Any],
    resources: dict[str, Any],
    landing: Path,
    *,
    instance: dg.DagsterInstance | None = None,
    keys: Iterable[str] | None = None,
) -> dict[str, dg.ExecuteInProcessResult]:
    """Materialize `assets` once per partition of the landing folder (or only `keys`), each
    partitions definition's assets together; the results by partition key."""
    instance = instance or dg.DagsterInstance.ephemeral()
    found = scope_keys(landing)
    wanted = set(keys) if keys is not None else None
    results: dict[str, dg.ExecuteInProcessResult] = {}
    for name, partition_keys in found.items():
        group = [a for a in assets if getattr(a.partitions_def, "name", None) == name]
        if not group:
            continue
        instance.add_dynamic_partitions(name, partition_keys)
        for key in partition_keys:
            if wanted is not None and key not in wanted:
                continue
            results[key] = dg.materialize(
                group, partition_key=key, instance=instance, resources=resources
            )
    return results


def metadata(results: dict[str, dg.ExecuteInProcessResult], asset: str) -> dict[str, dict]:
    """Each partition's materialization metadata of `asset` (plain values)."""
    out: dict[str, dict] = {}
    for key, result in results.items():
        for event in result.get_asset_materialization_events():
            if event.asset_key.to_user_string() == asset:
                out[key] = {
                    k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()
                }
    return out
