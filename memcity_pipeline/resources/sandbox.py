"""Sandbox resources: one base resource, a local and a Daytona implementation.

`LocalSandboxResource` runs each REPL session as an isolated local process
(`memcity_pipeline.sandbox.local`), `DaytonaSandboxResource` in Daytona cloud sandboxes
(`memcity_pipeline.sandbox.daytona`). Assets and ops ask for `sandbox: SandboxResource`; the
definitions bind the one `MEMCITY_SANDBOX` names. The Daytona key is a secret (`dg.EnvVar`).
"""

import threading
from enum import StrEnum
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from memcity_pipeline.resources._secrets import secret_value
from memcity_pipeline.sandbox.base import LLMHandler, SandboxBackend, SandboxSession, ToolHandler
from memcity_pipeline.sandbox.snapshot import DEFAULT_SNAPSHOT


class Isolation(StrEnum):
    """How a local session is isolated: `bwrap` (required: fail closed) or `none` (opt-out)."""

    bwrap = "bwrap"
    none = "none"


class SandboxMode(StrEnum):
    """Which Daytona sandbox a session runs in."""

    shared = "shared"
    per_org = "per_org"


class SandboxResource(dg.ConfigurableResource):
    """Hands out persistent REPL sessions (one per RLM query); see the two implementations."""

    exec_timeout_s: float = Field(default=120.0, gt=0, description="Wall clock per execution.")
    max_llm_concurrency: int = Field(default=4, gt=0, description="Sub-LLM calls in flight.")

    _backend: SandboxBackend | None = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def build_backend(self) -> SandboxBackend:
        """A new backend from this resource's fields."""
        raise NotImplementedError

    def get_backend(self) -> SandboxBackend:
        """The backend (built once per resource instance)."""
        with self._lock:
            if self._backend is None:
                self._backend = self.build_backend()
            return self._backend

    def with_options(self, **options: Any) -> "SandboxResource":
        """A copy with `options` (field names) applied; those this backend lacks are ignored."""
        fields = type(self).model_fields
        if not any(name in fields for name in options):
            return self
        values = {name: getattr(self, name) for name in fields}
        values.update({k: v for k, v in options.items() if k in fields})
        return type(self)(**values)

    def open_session(
        self,
        org_id: str,
        llm_handler: LLMHandler,
        *,
        prelude: str | None = None,
        session_id: str | None = None,
        runtime: str = "python",
        tool_handler: ToolHandler | None = None,
    ) -> SandboxSession:
        """Open a persistent REPL session for `org_id` (see `SandboxBackend.open_session`)."""
        return self.get_backend().open_session(
            org_id,
            llm_handler,
            prelude=prelude,
            session_id=session_id,
            runtime=runtime,
            tool_handler=tool_handler,
        )

    def close(self) -> None:
        """Close the backend and every session it still holds."""
        with self._lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()


class LocalSandboxResource(SandboxResource):
    """Each session is a local process isolated by bubblewrap (refused when it cannot be, unless
    isolation is `none`), with limits."""

    sessions_root: str = Field(description="Folder of the sessions' working directories.")
    isolation: Isolation = Field(
        default=Isolation.bwrap,
        description="`bwrap` (sessions are refused when bubblewrap cannot isolate them) or "
        "`none` (no isolation, limits only: trusted code only).",
    )
    bwrap: str | None = Field(
        default=None, description="The bubblewrap binary; default `bwrap` on PATH."
    )
    cpu_seconds: int = Field(default=300, gt=0, description="CPU seconds per session process.")
    memory_mb: int = Field(default=2048, gt=0, description="Address-space limit per session.")
    max_processes: int = Field(default=64, gt=0, description="Processes/threads per session.")
    max_open_files: int = Field(default=256, gt=0, description="Open files per session.")
    python: str | None = Field(
        default=None, description="Interpreter of local sessions; default the host's base one."
    )
    bun: str | None = Field(
        default=None,
        description="JavaScript interpreter (Bun or Node.js >= 20) of `bun` runtime sessions; "
        "default `bun` on PATH, then node_modules' Bun, then `node` on PATH.",
    )

    def build_backend(self) -> SandboxBackend:
        from memcity_pipeline.sandbox.local import LocalSandboxBackend

        return LocalSandboxBackend(
            Path(self.sessions_root),
            cpu_seconds=self.cpu_seconds,
            memory_mb=self.memory_mb,
            max_processes=self.max_processes,
            max_open_files=self.max_open_files,
            exec_timeout_s=self.exec_timeout_s,
            max_llm_concurrency=self.max_llm_concurrency,
            isolation=self.isolation.value,  # type: ignore[arg-type]
            bwrap=self.bwrap,
            python=self.python,
            js_interpreter=self.bun,
        )


class DaytonaSandboxResource(SandboxResource):
    """Sessions in Daytona sandboxes created from a snapshot, shared or one per org."""

    api_key: str | None = Field(default=None, description="Daytona API key (use dg.EnvVar).")
    api_url: str | None = Field(default=None, description="Daytona API URL.")
    target: str | None = Field(default=None, description="Daytona target (region).")
    sandbox_mode: SandboxMode = Field(
        default=SandboxMode.shared, description="`shared` (one sandbox) or `per_org` (one per org)."
    )
    snapshot: str = Field(default=DEFAULT_SNAPSHOT, description="Snapshot sandboxes start from.")
    auto_stop_minutes: int = Field(default=30, ge=0, description="Idle minutes before stop.")
    auto_archive_minutes: int = Field(default=1440, ge=0, description="Minutes before archive.")
    cpu: int = Field(default=2, gt=0, description="vCPUs of a sandbox (set in the snapshot).")
    memory_gib: int = Field(default=4, gt=0, description="GiB of RAM (set in the snapshot).")
    disk_gib: int = Field(default=8, gt=0, description="GiB of disk (set in the snapshot).")
    network_block_all: bool = Field(default=True, description="Block all sandbox network.")

    def build_backend(self) -> SandboxBackend:
        from memcity_pipeline.sandbox.daytona import DaytonaBackend

        return DaytonaBackend(
            api_key=secret_value(self.api_key),
            api_url=self.api_url,
            target=self.target,
            sandbox_mode=self.sandbox_mode.value,
            snapshot=self.snapshot,
            auto_stop_minutes=self.auto_stop_minutes,
            auto_archive_minutes=self.auto_archive_minutes,
            network_block_all=self.network_block_all,
            cpu=self.cpu,
            memory_gib=self.memory_gib,
            disk_gib=self.disk_gib,
            exec_timeout_s=self.exec_timeout_s,
            max_llm_concurrency=self.max_llm_concurrency,
        )
