"""The sessions resource: where RLM session rows go (the lake, and Postgres when configured)."""

import dagster as dg
from pydantic import Field

from memcity_pipeline.resources._secrets import secret_value
from memcity_pipeline.rlm.sessions import SessionStore


class SessionsResource(dg.ConfigurableResource):
    """`rlm_sessions` in the lake at `lake_uri` and, with `postgres_url`, in Postgres."""

    lake_uri: str = Field(description="The lake: a local folder or an s3://, gs://, az:// URI.")
    postgres_url: str | None = Field(
        default=None, description="postgresql://... (a secret: use dg.EnvVar)."
    )

    def get_store(self) -> SessionStore:
        return SessionStore(self.lake_uri, secret_value(self.postgres_url))
