"""The `ingest` job, its daily schedule, and the sensor that runs it when landing files change."""

import dagster as dg

from memcity_pipeline.ingestion.landing import landing_fingerprint
from memcity_pipeline.resources.lake import LakeResource

# Every stage of ingestion and enrichment; the RLM assets are not part of it.
INGEST_GROUPS = ["ingestion", "enrichment", "indexing"]

ingest_job = dg.define_asset_job(
    name="ingest",
    selection=dg.AssetSelection.groups(*INGEST_GROUPS),
    description="Ingest everything in the landing folder through every stage of the pipeline.",
    config={"execution": {"config": {"multiprocess": {"max_concurrent": 2}}}},
)

daily_ingest_schedule = dg.ScheduleDefinition(
    name="daily_ingest",
    job=ingest_job,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    description="Full ingestion every day at 02:00 UTC (unchanged files cost nothing).",
    default_status=dg.DefaultScheduleStatus.STOPPED,
)


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests an ingestion run when files in the landing folder are added, edited or "
    "removed (compares a fingerprint of paths, sizes and mtimes with the last one seen).",
)
def landing_sensor(
    context: dg.SensorEvaluationContext, lake: LakeResource
) -> dg.SensorResult | dg.SkipReason:
    fingerprint = landing_fingerprint(lake.landing)
    if fingerprint == context.cursor:
        return dg.SkipReason("no change in the landing folder")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=fingerprint)],
        cursor=fingerprint,
    )
