"""Sandboxes that run LLM-written code: one interface, a local and a Daytona backend."""

from memcity_pipeline.resources.sandbox.base import (
    ExecResult,
    LLMHandler,
    ReplClient,
    ReplSession,
    SandboxBackend,
    SandboxError,
    SandboxSession,
)
from memcity_pipeline.resources.sandbox.local import LocalSandboxBackend, LocalSandboxSession
from memcity_pipeline.resources.sandbox.resource import SandboxResource

__all__ = [
    "ExecResult",
    "LLMHandler",
    "LocalSandboxBackend",
    "LocalSandboxSession",
    "ReplClient",
    "ReplSession",
    "SandboxBackend",
    "SandboxError",
    "SandboxResource",
    "SandboxSession",
]
