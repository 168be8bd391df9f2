"""The one `dg.Definitions` of memcity-pipeline: assets, checks, jobs, schedules, sensors, resources.

`dagster dev -w workspace.yaml` loads `defs` from here; so does the `memcity` CLI. The settings
are read once, here, and mapped to resources by `build_resources`; a bad variable stops the
load with a one-line error naming it.
"""

import dagster as dg

from memcity_pipeline.defs import enrichment, indexing, ingestion, rlm
from memcity_pipeline.defs.ingest import (
    daily_schedules,
    ingest_knowledge_bases,
    ingest_users,
    landing_sensor,
    memcity_automation,
    sync_landing_layout_job,
)
from memcity_pipeline.defs.maintenance import lake_maintenance_job, weekly_maintenance
from memcity_pipeline.settings import Settings, SettingsError, build_resources, load_settings

STAGE_MODULES = [ingestion, enrichment, indexing, rlm]


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    """Definitions wired to `settings` (the environment's by default)."""
    settings = settings or load_settings()
    return dg.Definitions(
        # Modules are not searched for AssetSpecs: `rlm_sessions` (reported by rlm_query) is added.
        assets=[*dg.load_assets_from_modules(STAGE_MODULES), rlm.rlm_sessions],
        asset_checks=dg.load_asset_checks_from_modules(STAGE_MODULES),
        jobs=[
            ingest_knowledge_bases,
            ingest_users,
            sync_landing_layout_job,
            rlm.rlm_query_job,
            lake_maintenance_job,
        ],
        schedules=[*daily_schedules, weekly_maintenance(settings.lake_retention_days)],
        sensors=[landing_sensor, memcity_automation],
        resources=build_resources(settings),
    )


try:
    defs = build_definitions()
except SettingsError as exc:
    # One line naming the variable, not a traceback through the settings model.
    raise SystemExit(f"memcity_pipeline: {exc}") from None
