"""The one `dg.Definitions` of memcity-pipeline: assets, checks, jobs, schedules, sensors, resources.

`dagster dev -w workspace.yaml` loads `defs` from here; so does the `memcity` CLI.
"""

import dagster as dg

from memcity_pipeline.assets import enrichment, indexing, ingestion
from memcity_pipeline.jobs import rlm_query
from memcity_pipeline.jobs.ingest import daily_ingest_schedule, ingest_job, landing_sensor
from memcity_pipeline.resources.embeddings import EmbeddingsResource
from memcity_pipeline.resources.enrichment import EnrichmentResource
from memcity_pipeline.resources.lake import LakeResource
from memcity_pipeline.resources.llm import LLMResource
from memcity_pipeline.resources.sandbox import SandboxResource
from memcity_pipeline.settings import Settings, get_settings

STAGE_MODULES = [ingestion, enrichment, indexing, rlm_query]


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    """Definitions wired to `settings` (the environment's by default)."""
    s = settings or get_settings()
    return dg.Definitions(
        # Modules are not searched for AssetSpecs: `rlm_sessions` (reported by rlm_query) is added.
        assets=[*dg.load_assets_from_modules(STAGE_MODULES), rlm_query.rlm_sessions],
        asset_checks=dg.load_asset_checks_from_modules(STAGE_MODULES),
        jobs=[ingest_job, rlm_query.rlm_query_job],
        schedules=[daily_ingest_schedule],
        sensors=[landing_sensor],
        resources={
            "lake": LakeResource.from_settings(s),
            "llm": LLMResource(),
            "enrichment": EnrichmentResource.from_settings(s),
            "embeddings": EmbeddingsResource.from_settings(s),
            "sandbox": SandboxResource(),
        },
    )


defs = build_definitions()
