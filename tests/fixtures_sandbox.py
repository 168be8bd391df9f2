"""Sandbox fixtures: real local sandbox backends (bwrap processes) and a recording LLM handler."""

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memcity_pipeline.sandbox.local import (
    Isolation,
    LocalSandboxBackend,
    bwrap_trial,
    default_python,
    find_bwrap,
)

BWRAP = "/usr/bin/bwrap"
BROKEN_BWRAP = "/bin/false"  # exists, runs, and fails: bubblewrap that cannot isolate


@functools.cache
def isolation_for_tests() -> Isolation:
    """`bwrap` where bubblewrap isolates on this machine, else the explicit opt-out `none`.

    For tests whose subject is not the sandbox (enrichment, crash safety): they run their RLM
    sessions isolated where they can, and still run where bubblewrap cannot isolate.
    """
    return "bwrap" if bwrap_trial(find_bwrap(), str(default_python())) is None else "none"


class RecordingLLM:
    """A host-side LLM handler that answers `echo:<prompt>` and records what it saw.

    `delay_s` makes each call take that long, so overlapping (concurrent) calls become visible
    in `max_in_flight`. `fail_on` makes prompts containing that text raise.
    """

    def __init__(self, delay_s: float = 0.0, fail_on: str | None = None) -> None:
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.calls: list[tuple[list[str], str | None]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def __call__(self, prompts: list[str], model: str | None) -> list[str]:
        with self.lock:
            self.calls.append((list(prompts), model))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.fail_on and any(self.fail_on in p for p in prompts):
                raise RuntimeError(f"upstream LLM refused {self.fail_on!r}")
            return [f"echo:{p}" for p in prompts]
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def recording_llm() -> RecordingLLM:
    """A fresh recording LLM handler."""
    return RecordingLLM()


@pytest.fixture
def sandbox_backend_factory(
    memcity_home: Path,
) -> Iterator[Callable[..., LocalSandboxBackend]]:
    """Build local sandbox backends (small limits; bwrap required unless isolation='none').

    Skips when bubblewrap is required and not installed (unless the test names its own `bwrap`).
    Every backend built is closed at teardown, so no sandbox process outlives a test.
    """
    built: list[LocalSandboxBackend] = []

    def make(**options: Any) -> LocalSandboxBackend:
        options.setdefault("isolation", "bwrap")
        if options["isolation"] == "bwrap" and "bwrap" not in options and not Path(BWRAP).exists():
            pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")
        defaults: dict[str, Any] = {
            "cpu_seconds": 60,
            "memory_mb": 1024,
            "max_processes": 32,
            "max_open_files": 128,
            "exec_timeout_s": 20.0,
            "kill_grace_s": 1.0,
            "max_llm_concurrency": 4,
        }
        backend = LocalSandboxBackend(memcity_home / "sandboxes", **{**defaults, **options})
        built.append(backend)
        return backend

    yield make
    for backend in built:
        backend.close()


@pytest.fixture
def sandbox_backend(
    sandbox_backend_factory: Callable[..., LocalSandboxBackend],
) -> LocalSandboxBackend:
    """An isolated (bwrap) local sandbox backend with test-sized limits."""
    return sandbox_backend_factory()


NO_NAMESPACES = (
    "bwrap: No permissions to create new namespace, likely because the kernel does not allow "
    "non-privileged user namespaces."
)


@pytest.fixture
def path_without_namespaces(tmp_path: Path) -> str:
    """A PATH whose first `bwrap` fails as bubblewrap does in a container without user
    namespaces (for code that finds bwrap on PATH: the CLI, `memcity doctor`)."""
    bin_dir = tmp_path / "bin-without-namespaces"
    bin_dir.mkdir()
    fake = bin_dir / "bwrap"
    fake.write_text(f"#!/bin/sh\necho '{NO_NAMESPACES}' >&2\nexit 1\n")
    fake.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
