"""The sessions resource: where RLM session rows go (the lake, and Postgres when configured)."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from memcity_pipeline.resources._secrets import secret_value
from memcity_pipeline.rlm.sessions import SessionStore


class SessionsResource(dg.ConfigurableResource):
    """`rlm_sessions` in the lake under `lake_dir` and, with `postgres_url`, in Postgres."""

    lake_dir: str = Field(description="Root folder of the lake.")
    postgres_url: str | None = Field(
        default=None, description="postgresql://... (a secret: use dg.EnvVar)."
    )

    def get_store(self) -> SessionStore:
        return SessionStore(Path(self.lake_dir), secret_value(self.postgres_url))
