"""Typed settings, read from environment variables (and a `.env` file) in one place.

Every variable is listed in `.env.example` and in the README's configuration table.
"""

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

OPENROUTER_BASE_URL = "https://openrouter.ai/api/v1"


class Settings(BaseSettings):
    """All configuration of memcity-pipeline. Field names map to `MEMCITY_<NAME>` variables."""

    model_config = SettingsConfigDict(
        env_prefix="MEMCITY_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # Where things live
    home: Path = Field(default=Path(".memcity"), description="Root of the lake and local state.")
    landing: Path | None = Field(
        default=None, description="Landing folder; default `$MEMCITY_HOME/landing`."
    )

    # Ingestion limits
    max_file_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    max_document_chars: int = Field(default=2_000_000, gt=0)
    lake_lock_timeout_s: float = Field(default=1800.0, ge=0)

    # LLMs (OpenAI-compatible)
    llm_base_url: str | None = None
    llm_api_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MEMCITY_LLM_API_KEY", "OPENROUTER_API_KEY"),
    )
    llm_model: str | None = None
    llm_sub_model: str | None = None
    llm_max_concurrency: int = Field(default=4, gt=0)
    llm_timeout_s: float = Field(default=120.0, gt=0)
    llm_max_retries: int = Field(default=4, ge=0)
    llm_context_window: int = Field(default=8192, gt=0)

    # Pipeline behaviour
    enrichment: Literal["llm", "off"] = "llm"
    long_documents: Literal["rlm", "windowed"] = Field(
        default="rlm",
        description="Phase 1 of a document over the LLM's window: `rlm` (the RLM engine reads "
        "it whole in a sandbox; windows if that fails) or `windowed`.",
    )
    chunk_tokens: int = Field(default=512, gt=16)
    chunk_overlap_tokens: int = Field(default=64, ge=0)
    embeddings: str = Field(
        default="local", description="`local` (all-MiniLM-L6-v2) or `openai:<model>`."
    )
    rerank: Literal["off", "llm"] = "off"

    # Sandboxes
    sandbox: Literal["local", "daytona"] = "local"
    daytona_api_key: str | None = Field(
        default=None, validation_alias=AliasChoices("DAYTONA_API_KEY", "MEMCITY_DAYTONA_API_KEY")
    )
    daytona_api_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DAYTONA_API_URL", "MEMCITY_DAYTONA_API_URL")
    )

    # Postgres (rlm_sessions and, in production, Dagster's storage)
    postgres_url: str | None = None

    @cached_property
    def lake_dir(self) -> Path:
        return self.home.resolve() / "lake"

    @cached_property
    def landing_dir(self) -> Path:
        return (self.landing or self.home / "landing").resolve()

    @cached_property
    def dagster_home(self) -> Path:
        return self.home.resolve() / "dagster_home"

    @cached_property
    def cache_dir(self) -> Path:
        return self.home.resolve() / "cache"


def get_settings() -> Settings:
    """Settings as the environment says now (not cached: tests and the CLI change it)."""
    return Settings()
