"""Lake upkeep: a weekly job that compacts each Delta table's small files and vacuums the files
of versions older than the retention (`MEMCITY_LAKE_RETENTION_DAYS`, default 7 days; time travel
reaches back that far), and reports what it did per table."""

import dagster as dg
from pydantic import Field

from memcity_pipeline.lake.delta import maintain
from memcity_pipeline.lake.tables import TABLES
from memcity_pipeline.resources.lake import LakeResource


class MaintenanceConfig(dg.Config):
    """How far back old table versions stay readable."""

    retention_days: float = Field(
        default=7.0, ge=0, description="Files of versions older than this are vacuumed."
    )


@dg.op(description="Compact small files and vacuum old versions of every lake table.")
def compact_and_vacuum(
    context: dg.OpExecutionContext, config: MaintenanceConfig, lake: LakeResource
) -> None:
    rows = []
    for name in TABLES:
        done = maintain(lake.lake, name, retention_hours=config.retention_days * 24)
        if done.get("exists", True):
            context.log.info(f"{name}: {done}")
            rows.append(done)
    context.log.info(
        f"lake maintenance: {len(rows)} tables, "
        f"{sum(r['files_removed'] for r in rows)} small files compacted, "
        f"{sum(r['vacuumed_files'] for r in rows)} old files vacuumed"
    )


@dg.job(
    description="Compact and vacuum the lake's Delta tables (weekly).",
    executor_def=dg.in_process_executor,
)
def lake_maintenance_job() -> None:
    compact_and_vacuum()


def weekly_maintenance(retention_days: float) -> dg.ScheduleDefinition:
    """Sundays at 03:00 UTC, with the configured retention."""
    return dg.ScheduleDefinition(
        name="weekly_lake_maintenance",
        job=lake_maintenance_job,
        cron_schedule="0 3 * * 0",
        execution_timezone="UTC",
        run_config={"ops": {"compact_and_vacuum": {"config": {"retention_days": retention_days}}}},
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Compact small files and vacuum versions older than {retention_days:g} days.",
    )
