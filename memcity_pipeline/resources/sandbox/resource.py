"""The sandbox resource: one `dg.ConfigurableResource` for both backends (`MEMCITY_SANDBOX`).

`backend` ``local`` runs each REPL session as an isolated local process (`local.py`), ``daytona``
in Daytona cloud sandboxes (`daytona.py`). Unset fields take their value from the settings
(`MEMCITY_SANDBOX`, `MEMCITY_HOME`, `DAYTONA_API_KEY`, `DAYTONA_API_URL`). Pass the Daytona key
as ``dg.EnvVar("DAYTONA_API_KEY")`` so it never appears in run config.
"""

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from memcity_pipeline.resources.sandbox.base import LLMHandler, SandboxBackend, SandboxSession
from memcity_pipeline.settings import get_settings

BACKENDS = ("local", "daytona")
SANDBOX_MODES = ("shared", "per_org")
ISOLATIONS = ("auto", "bwrap", "none")


class SandboxResource(dg.ConfigurableResource):
    """Hands out persistent REPL sessions (one per RLM query) in a local or Daytona sandbox."""

    backend: str | None = Field(
        default=None, description="`local` or `daytona`; default `MEMCITY_SANDBOX` (local)."
    )
    # Local backend
    sessions_root: str | None = Field(
        default=None, description="Session directories; default `$MEMCITY_HOME/sandboxes`."
    )
    isolation: str = Field(
        default="auto", description="`auto` (bwrap if it runs, else limits only), `bwrap`, `none`."
    )
    cpu_seconds: int = Field(default=300, gt=0, description="CPU seconds per session process.")
    memory_mb: int = Field(default=2048, gt=0, description="Address-space limit per session.")
    max_processes: int = Field(default=64, gt=0, description="Processes/threads per session.")
    max_open_files: int = Field(default=256, gt=0, description="Open files per session.")
    exec_timeout_s: float = Field(default=120.0, gt=0, description="Wall clock per execution.")
    max_llm_concurrency: int = Field(default=4, gt=0, description="Sub-LLM calls in flight.")
    python: str | None = Field(
        default=None, description="Interpreter of local sessions; default the host's base one."
    )
    bun: str | None = Field(
        default=None,
        description="JavaScript interpreter (Bun or Node.js >= 20) of local `bun` runtime "
        "sessions; default `bun` on PATH, then node_modules' Bun, then `node` on PATH.",
    )
    # Daytona backend
    api_key: str | None = Field(default=None, description="Daytona API key (use dg.EnvVar).")
    api_url: str | None = Field(default=None, description="Daytona API URL.")
    target: str | None = Field(default=None, description="Daytona target (region).")
    sandbox_mode: str = Field(
        default="shared", description="`shared` (one sandbox) or `per_org` (one per org)."
    )
    snapshot: str = Field(default="memcity-rlm-v1", description="Snapshot sandboxes start from.")
    auto_stop_minutes: int = Field(default=30, ge=0, description="Idle minutes before stop.")
    auto_archive_minutes: int = Field(default=1440, ge=0, description="Minutes before archive.")
    cpu: int = Field(default=2, gt=0, description="vCPUs of a sandbox.")
    memory_gib: int = Field(default=4, gt=0, description="GiB of RAM of a sandbox.")
    disk_gib: int = Field(default=8, gt=0, description="GiB of disk of a sandbox.")
    network_block_all: bool = Field(default=True, description="Block all sandbox network.")

    _backend: SandboxBackend | None = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def backend_name(self) -> str:
        """The configured backend, checked."""
        name = (self.backend or get_settings().sandbox).strip().lower()
        if name not in BACKENDS:
            raise ValueError(f"sandbox backend must be one of {BACKENDS}, not {name!r}")
        return name

    def get_backend(self) -> SandboxBackend:
        """The backend (built once per resource instance)."""
        with self._lock:
            if self._backend is None:
                self._backend = self._build()
            return self._backend

    def _build(self) -> SandboxBackend:
        if self.backend_name() == "daytona":
            if self.sandbox_mode not in SANDBOX_MODES:
                raise ValueError(
                    f"sandbox_mode must be one of {SANDBOX_MODES}, not {self.sandbox_mode!r}"
                )
            from memcity_pipeline.resources.sandbox.daytona import DaytonaBackend

            return DaytonaBackend.from_resource(self.resolved_daytona_options())
        from memcity_pipeline.resources.sandbox.local import LocalSandboxBackend

        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, not {self.isolation!r}")
        root = Path(self.sessions_root) if self.sessions_root else None
        return LocalSandboxBackend(
            root or get_settings().home.resolve() / "sandboxes",
            cpu_seconds=self.cpu_seconds,
            memory_mb=self.memory_mb,
            max_processes=self.max_processes,
            max_open_files=self.max_open_files,
            exec_timeout_s=self.exec_timeout_s,
            max_llm_concurrency=self.max_llm_concurrency,
            isolation=self.isolation,  # type: ignore[arg-type]
            python=self.python,
            js_interpreter=self.bun,
        )

    def resolved_daytona_options(self) -> SimpleNamespace:
        """This resource's fields with the secret and URL resolved (EnvVar, settings)."""
        settings = get_settings()
        values = {name: getattr(self, name) for name in type(self).model_fields}
        key: Any = self.api_key
        if isinstance(key, dg.EnvVar):
            key = key.get_value()
        values["api_key"] = key or settings.daytona_api_key
        values["api_url"] = self.api_url or settings.daytona_api_url
        return SimpleNamespace(**values)

    def open_session(
        self,
        org_id: str,
        llm_handler: LLMHandler,
        *,
        prelude: str | None = None,
        session_id: str | None = None,
        runtime: str = "python",
    ) -> SandboxSession:
        """Open a persistent REPL session for `org_id` (see `SandboxBackend.open_session`)."""
        return self.get_backend().open_session(
            org_id, llm_handler, prelude=prelude, session_id=session_id, runtime=runtime
        )

    def close(self) -> None:
        """Close the backend and every session it still holds."""
        with self._lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()
