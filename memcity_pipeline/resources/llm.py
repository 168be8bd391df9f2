"""The LLM resource: one shared `LLMClient` for every LLM call of a run.

A thin wrapper over `memcity_pipeline.llm.providers`: every field is explicit (the definitions
fill them from settings), the API key is a secret (`dg.EnvVar`), and `get_client()` builds the
client once (starting the embedded model when no base URL or key is set).
"""

import logging
import threading
from enum import StrEnum
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from memcity_pipeline.llm.client import LLMClient
from memcity_pipeline.llm.providers import (
    ClientOptions,
    LLMTarget,
    is_local_model,
    open_client,
    release_local_server,
    resolve_target,
)
from memcity_pipeline.resources._secrets import secret_value

log = logging.getLogger(__name__)


class StructuredOutput(StrEnum):
    """How structured output is asked for (see `LLMClient`)."""

    json_schema = "json_schema"
    json_object_schema = "json_object_schema"
    json_object = "json_object"


class LLMResource(dg.ConfigurableResource):
    """Every LLM call of the pipeline goes through this resource's `LLMClient`.

    With neither `base_url` nor `api_key` the embedded local model answers. Declare the key as a
    secret: `LLMResource(api_key=dg.EnvVar("MEMCITY_LLM_API_KEY"))`. Works outside Dagster too:
    `LLMResource(...).get_client()`.
    """

    base_url: str | None = Field(
        default=None, description="OpenAI-compatible base URL; wins over everything else."
    )
    api_key: str | None = Field(default=None, description="API key (a secret: use dg.EnvVar).")
    model: str | None = Field(default=None, description="Model of root/ordinary calls.")
    sub_model: str | None = Field(default=None, description="Model of sub-calls (RLM).")
    max_concurrency: int = Field(default=4, gt=0, description="Calls in flight at once.")
    timeout_s: float = Field(default=120.0, gt=0, description="Timeout of one HTTP request.")
    max_retries: int = Field(default=4, ge=0, description="Retries of a failed request.")
    cache_dir: str | None = Field(
        default=None, description="Folder of the persistent answer cache (none: no cache)."
    )
    cache_url: str | None = Field(
        default=None,
        description="postgresql://... to keep the answer cache in Postgres instead of "
        "`cache_dir` (a secret: use dg.EnvVar).",
    )
    use_cache: bool = Field(default=True, description="Keep and reuse answers across runs.")
    context_window: int = Field(default=8192, gt=0, description="Context size in tokens.")
    structured_mode: StructuredOutput | None = Field(
        default=None, description="How structured output is asked for; default by provider."
    )
    log_dir: str | None = Field(
        default=None, description="Folder of the embedded model server's log."
    )
    local_servers: int | None = Field(
        default=None, ge=1, description="Embedded model server processes (default: one per core)."
    )

    _client: LLMClient | None = PrivateAttr(default=None)
    _holds_local: bool = PrivateAttr(default=False)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def target(self) -> LLMTarget:
        """Where calls go (nothing started)."""
        return resolve_target(
            base_url=self.base_url,
            api_key=secret_value(self.api_key),
            model=self.model,
            sub_model=self.sub_model,
            structured_mode=self.structured_mode.value if self.structured_mode else None,
        )

    @property
    def provider(self) -> str:
        """`openrouter`, `openai-compatible` or `local`."""
        return self.target().provider

    def get_client(self) -> LLMClient:
        """This resource's client, created on first use (starts the local model if needed)."""
        with self._lock:
            if self._client is None:
                target = self.target()
                if target.provider == "local" and self.model and not is_local_model(self.model):
                    log.warning(
                        "MEMCITY_LLM_MODEL=%s ignored: no base URL or API key is set, so the "
                        "embedded local model answers",
                        self.model,
                    )
                options = ClientOptions(
                    max_concurrency=self.max_concurrency,
                    timeout_s=self.timeout_s,
                    max_retries=self.max_retries,
                    context_window=self.context_window,
                    cache_dir=Path(self.cache_dir) if self.use_cache and self.cache_dir else None,
                    cache_url=secret_value(self.cache_url) if self.use_cache else None,
                    local_log_path=Path(self.log_dir) / "llm.log" if self.log_dir else None,
                    local_servers=self.local_servers,
                    explicit_structured_mode=self.structured_mode is not None,
                )
                self._client, self._holds_local = open_client(target, options)
            return self._client

    def close(self) -> None:
        """Close the client and let go of the embedded server (if this resource used it)."""
        with self._lock:
            client, self._client = self._client, None
            holds, self._holds_local = self._holds_local, False
        if client is not None:
            client.close()
        if holds:
            release_local_server()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()
