"""Which partitions `memcity ingest` can leave alone: up to date with the landing folder, the
settings and their own last run.

A partition is up to date when its latest run materialized its last steps, that run had the
settings that change what ingestion makes (`settings_fingerprint`, kept in the run's
`SETTINGS_TAG`), the lake's bookkeeping matches its landing files (paths, sizes, mtimes), and no
document or chunk of it failed its LLM phase with attempts left (those are retried by the next
run).
"""

import hashlib
import json

import dagster as dg

from memcity_pipeline.cli.events import PARTITION_TAG
from memcity_pipeline.enrichment.retries import retries_due
from memcity_pipeline.ingestion.sync import scope_is_current
from memcity_pipeline.lake.delta import read_rows
from memcity_pipeline.lake.location import Lake
from memcity_pipeline.lake.tables import PARTITIONS, ScopeKind, parse_scope_key, scope_where
from memcity_pipeline.settings import Settings

SETTINGS_TAG = "memcity/settings"  # `settings_fingerprint` of the command that ran it
# Steps whose status says whether a partition was brought up to date to the end.
LAST_STEPS: dict[ScopeKind, list[str]] = {
    "knowledge_base": ["chunk_embeddings", "bm25_index"],
    "user": ["conversations", "memory_index"],
}


def finished_partitions(
    instance: dg.DagsterInstance, scope: ScopeKind, keys: list[str]
) -> set[str]:
    """The partitions whose last steps all materialized in their latest run."""
    if not keys:
        return set()
    done = set(keys)
    pdef = dg.DynamicPartitionsDefinition(name=PARTITIONS[scope])
    for asset in LAST_STEPS[scope]:
        status = instance.get_status_by_partition(dg.AssetKey(asset), keys, pdef)
        done &= {k for k, v in (status or {}).items() if v == dg.AssetPartitionStatus.MATERIALIZED}
    return done


# Settings that change what ingestion makes: a partition last run with others is run again.
PIPELINE_SETTINGS = (
    "enrichment",
    "long_documents",
    "chunk_tokens",
    "chunk_overlap_tokens",
    "embeddings",
    "llm_base_url",
    "llm_model",
    "llm_context_window",
    "max_file_bytes",
    "max_document_chars",
)


def settings_fingerprint(settings: Settings) -> str:
    """A short hash of the settings that change what ingestion makes (a run's `SETTINGS_TAG`)."""
    values = json.dumps({name: str(getattr(settings, name)) for name in PIPELINE_SETTINGS})
    return hashlib.sha256(values.encode()).hexdigest()[:16]


def _same_settings(instance: dg.DagsterInstance, key: str, settings: Settings) -> bool:
    """Whether the partition's latest successful run had these settings."""
    records = instance.get_run_records(
        dg.RunsFilter(tags={PARTITION_TAG: key}, statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1
    )
    latest = records[0].dagster_run.tags.get(SETTINGS_TAG) if records else None
    return latest == settings_fingerprint(settings)


def _has_retries_due(lake: Lake, scope: ScopeKind, key: str, max_attempts: int) -> bool:
    """Whether a knowledge base has documents or chunks whose LLM phase failed and that the
    next run tries again (until each has had `max_attempts`)."""
    if scope != "knowledge_base":
        return False
    org, kb = parse_scope_key(key)
    for table, column in (
        ("document_structure", "status"),
        ("enriched_chunks", "enrichment_status"),
    ):
        rows = read_rows(lake, table, scope_where(table, org, kb), columns=[column, "attempts"])
        if retries_due(rows, column, max_attempts):
            return True
    return False


def up_to_date(
    instance: dg.DagsterInstance, settings: Settings, scope: ScopeKind, key: str
) -> bool:
    """Whether a partition whose last run finished needs no run now (see the module's text)."""
    return (
        _same_settings(instance, key, settings)
        and scope_is_current(settings.landing_dir, settings.lake, scope, *parse_scope_key(key))
        and not _has_retries_due(settings.lake, scope, key, settings.enrichment_max_attempts)
    )
