"""Ingestion jobs, one per partitioning, their daily schedules, the landing sensor, the job that
removes what left the landing folder, and the sensor of declarative automation.

- `ingest_knowledge_bases`: every asset of one knowledge-base partition (`<org>/<kb>`);
  `ingest_users`: every asset of one user partition (`<org>/<user>`). Both run the multiprocess
  executor (one process per step).
- `landing_sensor`: adds the partitions of new knowledge bases and users, deletes those whose
  folder is gone (and requests `sync_landing_layout`, which removes their data), and requests a
  run for each partition whose files changed since it last looked (a fingerprint per partition in
  its cursor).
- `daily_ingest_knowledge_bases` / `daily_ingest_users`: every partition, at 02:00 UTC.
- `memcity_automation`: materializes downstream assets whose upstream partition changed outside
  an ingestion run (say, `raw_documents` of one knowledge base from the UI), and refreshes
  `rlm_session_report` hourly. Off by default; turn it on in the UI (Automation).
"""

import json
from typing import Any

import dagster as dg
from pydantic import Field

from memcity_pipeline.defs.enrichment import chunks, document_structure, enriched_chunks
from memcity_pipeline.defs.indexing import bm25_index, chunk_embeddings, memory_index
from memcity_pipeline.defs.ingestion import conversations, memories, raw_documents
from memcity_pipeline.defs.partitions import PARTITIONS_DEFS, knowledge_bases, users
from memcity_pipeline.ingestion.landing import (
    compare_scopes,
    landing_scopes,
    problems_fingerprint,
)
from memcity_pipeline.ingestion.sync import sync_layout_errors
from memcity_pipeline.lake.scopes import drop_scope
from memcity_pipeline.lake.tables import ScopeKind, parse_scope_key
from memcity_pipeline.resources.lake import LakeResource

KNOWLEDGE_BASE_ASSETS = [
    raw_documents,
    document_structure,
    chunks,
    enriched_chunks,
    chunk_embeddings,
    bm25_index,
]
USER_ASSETS = [memories, conversations, memory_index]

# Steps in child processes, forked from a server that imported the pipeline (and the local
# embedding model's runtime) once, so a step does not re-import them.
PRELOAD = ["memcity_pipeline.definitions", "onnxruntime", "tokenizers"]


def execution_config(max_concurrent: int = 2, *, in_process: bool = False) -> dict[str, Any]:
    """Run config of the ingestion jobs' executor: multiprocess (a process per step, at most
    `max_concurrent` at once), or every step in the run's own process (`in_process`)."""
    if in_process:
        return {"execution": {"config": {"in_process": {}}}}
    return {
        "execution": {
            "config": {
                "multiprocess": {
                    "max_concurrent": max_concurrent,
                    "start_method": {"forkserver": {"preload_modules": PRELOAD}},
                }
            }
        }
    }


EXECUTION = execution_config()

ingest_knowledge_bases = dg.define_asset_job(
    name="ingest_knowledge_bases",
    selection=dg.AssetSelection.assets(*KNOWLEDGE_BASE_ASSETS),
    partitions_def=knowledge_bases,
    description="Every stage of one knowledge base: documents, structure, chunks, enrichment, "
    "vectors and BM25.",
    config=EXECUTION,
)
ingest_users = dg.define_asset_job(
    name="ingest_users",
    selection=dg.AssetSelection.assets(*USER_ASSETS),
    partitions_def=users,
    description="Every stage of one user: memories, conversations, the memory index.",
    config=EXECUTION,
)
INGEST_JOBS: dict[ScopeKind, Any] = {
    "knowledge_base": ingest_knowledge_bases,
    "user": ingest_users,
}


class LandingLayoutConfig(dg.Config):
    """The partitions whose landing folder is gone (their data is removed)."""

    knowledge_bases: list[str] = Field(default_factory=list, description="Keys `<org>/<kb>`.")
    users: list[str] = Field(default_factory=list, description="Keys `<org>/<user>`.")


@dg.op(
    description="Remove every lake file of knowledge bases and users whose landing folder is "
    "gone, and record the landing paths that lie in no knowledge base or user folder."
)
def sync_landing_layout(
    context: dg.OpExecutionContext, config: LandingLayoutConfig, lake: LakeResource
) -> None:
    for scope, keys in (("knowledge_base", config.knowledge_bases), ("user", config.users)):
        for key in keys:
            removed = drop_scope(lake.lake, scope, *parse_scope_key(key))  # type: ignore[arg-type]
            context.log.info(f"{key}: removed {len(removed)} lake parts: {', '.join(removed)}")
    problems = landing_scopes(lake.landing).unscoped
    for p in problems:
        context.log.warning(f"landing: {p.rel_path}: {p.reason}")
    sync_layout_errors(lake.lake, problems)


@dg.job(
    description="Remove the data of knowledge bases and users that left the landing folder.",
    executor_def=dg.in_process_executor,
)
def sync_landing_layout_job() -> None:
    sync_landing_layout()


def layout_run_config(removed: dict[str, list[str]]) -> dict[str, Any]:
    """Run config of `sync_landing_layout_job` for the removed partitions (by partitions name)."""
    return {
        "ops": {
            "sync_landing_layout": {
                "config": {
                    "knowledge_bases": removed.get(knowledge_bases.name, []),
                    "users": removed.get(users.name, []),
                }
            }
        }
    }


def _daily(job: Any, name: str) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=f"daily_{job.name}",
        job=job,
        cron_schedule="0 2 * * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Every {name} partition at 02:00 UTC (unchanged files cost nothing).",
    )
    def _schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
        keys = context.instance.get_dynamic_partitions(job.partitions_def.name)  # type: ignore[union-attr]
        if not keys:
            return dg.SkipReason(f"no {name} partition yet")
        return [dg.RunRequest(partition_key=key) for key in keys]

    return _schedule


daily_schedules = [
    _daily(ingest_knowledge_bases, "knowledge base"),
    _daily(ingest_users, "user"),
]


@dg.sensor(
    jobs=[ingest_knowledge_bases, ingest_users, sync_landing_layout_job],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Adds a partition for each new knowledge base and user of the landing folder, "
    "removes those whose folder is gone (with their data), and requests a run for each partition "
    "whose files were added, edited or removed (a fingerprint of paths, sizes and mtimes per "
    "partition, kept in the cursor).",
)
def landing_sensor(context: dg.SensorEvaluationContext, lake: LakeResource) -> dg.SensorResult:
    found = landing_scopes(lake.landing)
    seen: dict[str, Any] = json.loads(context.cursor) if context.cursor else {}
    runs: list[dg.RunRequest] = []
    partition_requests: list[Any] = []
    removed: dict[str, list[str]] = {}
    for scope, job in INGEST_JOBS.items():
        pdef = PARTITIONS_DEFS[scope]
        current = found.of(scope)
        changes = compare_scopes(
            current, context.instance.get_dynamic_partitions(pdef.name), seen.get(pdef.name, {})
        )
        if changes.added:
            partition_requests.append(pdef.build_add_request(changes.added))
        gone = [k for k in changes.removed if not found.hidden(scope, k)]
        if gone:
            partition_requests.append(pdef.build_delete_request(gone))
            removed[pdef.name] = gone
        runs += [dg.RunRequest(job_name=job.name, partition_key=key) for key in changes.changed]
    layout = problems_fingerprint(found.unscoped)
    if removed or layout != seen.get("layout"):
        runs.append(
            dg.RunRequest(
                job_name=sync_landing_layout_job.name, run_config=layout_run_config(removed)
            )
        )
    cursor = json.dumps(
        {"knowledge_bases": found.knowledge_bases, "users": found.users, "layout": layout},
        sort_keys=True,
    )
    if not runs and not partition_requests:
        return dg.SensorResult(skip_reason="no change in the landing folder", cursor=cursor)
    return dg.SensorResult(
        run_requests=runs, dynamic_partitions_requests=partition_requests, cursor=cursor
    )


memcity_automation = dg.AutomationConditionSensorDefinition(
    "memcity_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Declarative automation: downstream partitions follow their upstream (`eager`), "
    "and `rlm_session_report` refreshes hourly.",
)
