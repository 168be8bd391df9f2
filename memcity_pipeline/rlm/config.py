"""The one configuration model of an RLM query (the spec's `rlmConfig` and sandbox options),
and the result a query returns.

`RLMConfig` is the single declaration: the Python API takes it (or a dict in snake or camel
case), the `rlm_query` job's launchpad config is derived from it (`defs/rlm.py`), and so are the
`memcity query` options (`cli/rlm.py`). Field descriptions are what the launchpad and `--help`
show.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

Status = Literal["completed", "partial", "failed", "timeout"]
MAX_PROMPT_CHARS = 100_000
"""The most characters of a query and of a custom system prompt: each goes with every root LLM
call, and 100,000 characters (about 25,000 tokens) already fill most models' windows."""
AVAILABLE_RUNTIMES = ("python", "bun")

# Sandbox options of the spec -> fields of SandboxResource.
SANDBOX_OPTION_FIELDS = {
    "sandbox_mode": "sandbox_mode",
    "sandbox_snapshot": "snapshot",
    "sandbox_auto_stop_minutes": "auto_stop_minutes",
    "sandbox_auto_archive_minutes": "auto_archive_minutes",
    "sandbox_cpu": "cpu",
    "sandbox_memory": "memory_gib",
    "sandbox_disk": "disk_gib",
    "sandbox_exec_timeout_s": "exec_timeout_s",
}


class RLMRequestError(ValueError):
    """The request is wrong (parameters, ids, config); nothing was run."""


class RLMConfig(BaseModel):
    """The engine's options (the spec's `rlmConfig`); camelCase names are accepted too."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel)

    runtime: Literal["python", "bun"] = Field(
        default="python", description="Runtime of the REPL in the sandbox."
    )
    runtime_fallback_to_python: bool = Field(
        default=True, description="Run on python again when the requested runtime fails."
    )
    max_iterations: int = Field(default=20, ge=1, le=200, description="Root LLM turns at most.")
    max_depth: int = Field(
        default=1,
        ge=1,
        le=3,
        description="Recursion depth: at 1 llm_query is a plain LLM call; above, a child RLM.",
    )
    model: str | None = Field(default=None, description="Root model (default: the LLM's model).")
    sub_model: str | None = Field(
        default=None, description="Model of llm_query calls (default: model, else the sub-model)."
    )
    sub_temperature: float = Field(
        default=0.0, ge=0.0, le=2.0, description="Sampling temperature of llm_query calls."
    )
    cache_sub_calls: bool | None = Field(
        default=None,
        description="Serve an llm_query prompt already answered for the same model and "
        "parameters from the LLM cache, free (null: on when sub_temperature is 0).",
    )
    custom_system_prompt: str | None = Field(
        default=None,
        max_length=MAX_PROMPT_CHARS,
        description="Replaces the built-in system prompt (advanced).",
    )
    max_timeout: float = Field(default=600.0, gt=0, description="Seconds for the whole query.")
    max_budget: float | None = Field(
        default=None, ge=0, description="USD cap per query (null: unlimited)."
    )
    max_errors: int | None = Field(
        default=None, ge=1, description="Consecutive REPL errors before stopping (null: no cap)."
    )
    max_tokens_per_call: int | None = Field(
        default=None, gt=0, description="max_tokens of each LLM call (null: the server's)."
    )
    # Sandbox options (applied to the sandbox resource when set; null keeps its own).
    sandbox_mode: Literal["shared", "per_org"] | None = Field(
        default=None, description="Daytona: one sandbox for all orgs, or one per org."
    )
    sandbox_snapshot: str | None = Field(
        default=None, description="Daytona snapshot sandboxes start from (memcity-rlm-v1)."
    )
    sandbox_auto_stop_minutes: int | None = Field(
        default=None, ge=0, description="Daytona: idle minutes before a sandbox stops (30)."
    )
    sandbox_auto_archive_minutes: int | None = Field(
        default=None, ge=0, description="Daytona: minutes after stop before archiving (1440)."
    )
    sandbox_cpu: int | None = Field(default=None, gt=0, description="Daytona: vCPUs (2).")
    sandbox_memory: int | None = Field(default=None, gt=0, description="Daytona: GiB of RAM (4).")
    sandbox_disk: int | None = Field(default=None, gt=0, description="Daytona: GiB of disk (8).")
    sandbox_exec_timeout_s: float | None = Field(
        default=None, gt=0, description="Wall clock of one code execution (120)."
    )

    @property
    def caches_sub_calls(self) -> bool:
        """Whether sub-calls use the LLM cache: `cache_sub_calls`, else a temperature of 0."""
        if self.cache_sub_calls is not None:
            return self.cache_sub_calls
        return self.sub_temperature == 0

    def sandbox_overrides(self) -> dict[str, Any]:
        """The sandbox options that are set, as SandboxResource field values."""
        return {
            target: getattr(self, name)
            for name, target in SANDBOX_OPTION_FIELDS.items()
            if getattr(self, name) is not None
        }


class RLMResult(BaseModel):
    """What a query returns (and what its session row records). `iterations`,
    `total_sub_calls`, the tokens and `cost` cover every child RLM of the query."""

    answer: str
    status: Status
    iterations: int = 0
    total_sub_calls: int = 0
    search_calls: int = 0  # `search` calls the sandboxed code made
    sub_call_cache_hits: int = 0  # sub-calls answered from the LLM cache (free)
    depth_reached: int = 0  # deepest RLM level that ran: 1 root only, 2-3 child RLMs
    cost: float | None = None  # USD; None when the provider reports no cost
    prompt_tokens: int = 0
    completion_tokens: int = 0
    warning: str | None = None
    error: str | None = None
    session_id: str
    execution_time_s: float = 0.0
    context_type: str
    context_chars: int = 0
    context_items: int = 0  # items loaded into the sandbox
    context_total_items: int = 0  # items there were (more than loaded when a cap cut them)
    root_model: str | None = None
    sub_model: str | None = None
    runtime: str = "python"
    runtime_used: str | None = None
    trajectory_path: str | None = None
    logged_to_postgres: bool = False


def parse_config(rlm_config: "RLMConfig | dict[str, Any] | None") -> RLMConfig:
    """An RLMConfig from a model, a dict (snake or camel case) or None; RLMRequestError."""
    if isinstance(rlm_config, RLMConfig):
        return rlm_config
    try:
        return RLMConfig.model_validate(rlm_config or {})
    except ValidationError as exc:
        raise RLMRequestError(f"invalid rlm_config: {exc}") from exc
