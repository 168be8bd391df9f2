"""Typed settings, read from environment variables (and a `.env` file), and the resources they
configure.

Settings are read at the edges only: `definitions.py` (once, when the code location loads),
`cli/` (once per command) and `api.py` (once per call without explicit settings). Everything
below takes explicit values. Every variable is listed in `.env.example` and in the README's
configuration table. `load_settings()` turns a bad variable into a one-line `SettingsError`
naming it.
"""

import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import AliasChoices, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    import dagster as dg

    from memcity_pipeline.lake.location import Lake
    from memcity_pipeline.search.embeddings import Embedder


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
    lake_uri: str | None = Field(
        default=None,
        description="The lake: a local folder or an s3://, gs://, az:// URI; default "
        "`$MEMCITY_HOME/lake`.",
    )
    lake_retention_days: float = Field(
        default=7.0,
        ge=0,
        description="Table versions older than this are vacuumed by the weekly maintenance job.",
    )

    # Input limits
    max_file_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    max_document_chars: int = Field(default=2_000_000, gt=0)
    max_custom_context_chars: int = Field(
        default=20_000_000,
        gt=0,
        description="The most characters of an RLM query's custom context (`--custom-file`, "
        "the API's custom_context, the launchpad's).",
    )
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
    llm_local_servers: int | None = Field(default=None, ge=1, le=16)
    llm_cache: Literal["sqlite", "postgres"] = Field(
        default="sqlite",
        description="Where LLM answers are cached: `sqlite` (a file under `$MEMCITY_HOME/cache`, "
        "one machine) or `postgres` (the MEMCITY_POSTGRES_URL database, shared).",
    )

    # Pipeline behaviour
    enrichment: Literal["llm", "off"] = "llm"
    long_documents: Literal["rlm", "windowed"] = Field(
        default="rlm",
        description="Phase 1 of a document over the LLM's window: `rlm` (the RLM engine reads "
        "it whole in a sandbox; windows if that fails) or `windowed`.",
    )
    chunk_tokens: int = Field(default=512, gt=16)
    chunk_overlap_tokens: int = Field(default=64, ge=0)
    enrichment_max_attempts: int = Field(
        default=3,
        gt=0,
        description="Runs that try a document or chunk whose LLM answer failed; then it stays "
        "failed, with its reason, until its text, its context or the model changes.",
    )
    embeddings: str = Field(
        default="local",
        pattern=r"^(local|local-int8|local-torch|openai:\S.*)$",
        description="`local` (all-MiniLM-L6-v2 on ONNX Runtime), `local-int8` (its int8 copy), "
        "`local-torch` (the same model on sentence-transformers) or `openai:<model>`.",
    )
    rerank: Literal["off", "llm"] = "off"
    search_cache_mb: int = Field(
        default=1024,
        ge=0,
        description="Memory for the search indexes one process keeps loaded, in MiB.",
    )

    # Sandboxes
    sandbox: Literal["local", "daytona"] = "local"
    sandbox_isolation: Literal["bwrap", "none"] = Field(
        default="bwrap",
        description="Local sandbox: `bwrap` (LLM-written code is refused when bubblewrap cannot "
        "isolate it) or `none` (runs it without isolation, with a loud warning).",
    )
    daytona_api_key: str | None = Field(
        default=None, validation_alias=AliasChoices("DAYTONA_API_KEY", "MEMCITY_DAYTONA_API_KEY")
    )
    daytona_api_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DAYTONA_API_URL", "MEMCITY_DAYTONA_API_URL")
    )

    # Postgres (rlm_sessions and, in production, Dagster's storage)
    postgres_url: str | None = None

    @model_validator(mode="after")
    def _postgres_cache_needs_a_url(self) -> "Settings":
        if self.llm_cache == "postgres" and not self.postgres_url:
            raise ValueError("MEMCITY_LLM_CACHE=postgres needs MEMCITY_POSTGRES_URL")
        return self

    @cached_property
    def lake(self) -> "Lake":
        """The lake's location (`MEMCITY_LAKE_URI`, default `$MEMCITY_HOME/lake`)."""
        from memcity_pipeline.lake.location import Lake

        return Lake.of(self.lake_uri or self.home.resolve() / "lake")

    @cached_property
    def lake_dir(self) -> Path:
        """The local folder of a local lake (ValueError for object storage)."""
        return self.lake.path

    @cached_property
    def locks_dir(self) -> Path:
        """Where this machine's run locks of `memcity ingest` lie (in `.locks/`): the lake's
        folder when it is local, else the home."""
        return self.lake.path if self.lake.is_local else self.home.resolve()

    @cached_property
    def landing_dir(self) -> Path:
        return (self.landing or self.home / "landing").resolve()

    @cached_property
    def dagster_home(self) -> Path:
        return self.home.resolve() / "dagster_home"

    @cached_property
    def cache_dir(self) -> Path:
        return self.home.resolve() / "cache"


class SettingsError(ValueError):
    """A configuration variable has a value that cannot be used; the message names it."""


def _variable(field: str, loc: tuple[Any, ...]) -> str:
    """The environment variable behind a settings field (or the alias pydantic reports)."""
    name = str(loc[0]) if loc else field
    if name.isupper():
        return name
    info = Settings.model_fields.get(name)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"MEMCITY_{name.upper()}"


def describe_settings_error(exc: ValidationError) -> str:
    """One line per bad variable: its name, what it holds, and what is wrong."""
    parts = []
    for err in exc.errors():
        loc = tuple(err.get("loc") or ())
        if not loc:  # a rule across variables: its message names them
            parts.append(str(err.get("msg")).removeprefix("Value error, "))
            continue
        variable = _variable(str(loc[0]) if loc else "", loc)
        value = err.get("input")
        shown = f"={value!r}" if isinstance(value, str | int | float) else ""
        parts.append(f"{variable}{shown}: {_problem(err, loc)}")
    return "invalid configuration: " + "; ".join(parts)


def _problem(err: Any, loc: tuple[Any, ...]) -> str:
    """What is wrong with a value; for a value that does not match a field's pattern, what the
    field takes (its description) rather than the regular expression."""
    info = Settings.model_fields.get(str(loc[0])) if loc else None
    if err.get("type") == "string_pattern_mismatch" and info is not None and info.description:
        return f"should be {info.description.rstrip('.')}"
    return str(err.get("msg"))


def load_settings() -> Settings:
    """Settings as the environment says now; SettingsError (one line) for a bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(describe_settings_error(exc)) from None


def get_settings() -> Settings:
    """Settings as the environment says now (not cached: tests and the CLI change it)."""
    return load_settings()


def secret_env(value: str | None, *names: str) -> "dg.EnvVar | None":
    """A secret as a `dg.EnvVar` (never a plain string in run config or the UI).

    The first of `names` set in the environment is used; a value that came from the `.env` file
    only is put into this process's environment under the first name, so the EnvVar resolves.
    """
    import dagster as dg

    for name in names:
        if os.environ.get(name):
            return dg.EnvVar(name)
    if value:
        os.environ[names[0]] = value
        return dg.EnvVar(names[0])
    return None


def build_embedder(settings: Settings) -> "Embedder":
    """The embedder the `embeddings` resource of `build_resources` gives, built without Dagster
    (searches from the API and the CLI): the same setting, base URL and key."""
    from memcity_pipeline.search.embeddings import shared_embedder

    s = settings
    return shared_embedder(s.embeddings, base_url=s.llm_base_url, api_key=s.llm_api_key)


def build_resources(settings: Settings) -> dict[str, Any]:
    """The pipeline's resources, configured from `settings` (the only place that maps them)."""
    from memcity_pipeline.resources.embeddings import EmbeddingsResource
    from memcity_pipeline.resources.enrichment import EnrichmentResource
    from memcity_pipeline.resources.lake import LakeResource
    from memcity_pipeline.resources.llm import LLMResource
    from memcity_pipeline.resources.sandbox import DaytonaSandboxResource, LocalSandboxResource
    from memcity_pipeline.resources.sessions import SessionsResource

    s = settings
    llm_key = secret_env(s.llm_api_key, "MEMCITY_LLM_API_KEY", "OPENROUTER_API_KEY")
    sandbox = (
        DaytonaSandboxResource(
            api_key=secret_env(s.daytona_api_key, "DAYTONA_API_KEY", "MEMCITY_DAYTONA_API_KEY"),
            api_url=s.daytona_api_url,
        )
        if s.sandbox == "daytona"
        else LocalSandboxResource(
            sessions_root=str(s.home.resolve() / "sandboxes"), isolation=s.sandbox_isolation
        )
    )
    return {
        "lake": LakeResource(
            lake_uri=s.lake.uri,
            landing_dir=str(s.landing_dir),
            max_file_bytes=s.max_file_bytes,
            max_document_chars=s.max_document_chars,
            max_custom_context_chars=s.max_custom_context_chars,
        ),
        "llm": LLMResource(
            base_url=s.llm_base_url,
            api_key=llm_key,
            model=s.llm_model,
            sub_model=s.llm_sub_model,
            max_concurrency=s.llm_max_concurrency,
            timeout_s=s.llm_timeout_s,
            max_retries=s.llm_max_retries,
            cache_dir=str(s.cache_dir / "llm"),
            cache_url=secret_env(s.postgres_url, "MEMCITY_POSTGRES_URL")
            if s.llm_cache == "postgres"
            else None,
            context_window=s.llm_context_window,
            local_servers=s.llm_local_servers,
            log_dir=str(s.home.resolve() / "logs"),
        ),
        "enrichment": EnrichmentResource(
            mode=s.enrichment,
            chunk_tokens=s.chunk_tokens,
            chunk_overlap_tokens=min(s.chunk_overlap_tokens, s.chunk_tokens // 2),
            max_workers=s.llm_max_concurrency,
            long_documents=s.long_documents,
            max_attempts=s.enrichment_max_attempts,
        ),
        "embeddings": EmbeddingsResource(
            setting=s.embeddings, base_url=s.llm_base_url, api_key=llm_key
        ),
        "sandbox": sandbox,
        "sessions": SessionsResource(
            lake_uri=s.lake.uri,
            postgres_url=secret_env(s.postgres_url, "MEMCITY_POSTGRES_URL"),
        ),
    }
