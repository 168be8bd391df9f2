"""Which LLM provider answers, and the one place an `LLMClient` is built from explicit values.

Provider resolution (first match wins):

1. an explicit base URL: any OpenAI-compatible server (OpenRouter too, if the URL is
   OpenRouter's); without a model name, the server's first model;
2. an API key: OpenRouter, model `openai/gpt-4o-mini` unless one is given, with cost accounting;
3. nothing: the embedded SmolLM2-135M-Instruct, served on loopback once per process and shared by
   every client of the process (the last client to close stops it). A llama.cpp server decodes
   one sequence at a time, so the model runs as one server process per core (at most
   `MAX_LOCAL_SERVERS`, or `ClientOptions.local_servers`), each on its own core, and the client
   sends each call to a free one: two calls answered side by side on 2 cores instead of one
   after the other with a core idle while a single thread generates.
"""

import atexit
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from memcity_pipeline.llm.client import STRUCTURED_MODES, LLMClient, StructuredMode
from memcity_pipeline.llm.local_server import LocalLLMServer

log = logging.getLogger(__name__)

OPENROUTER_BASE_URL = "https://openrouter.ai/api/v1"
OPENROUTER_DEFAULT_MODEL = "openai/gpt-4o-mini"
LOCAL_MODEL_PREFIX = "smollm2"
LOCAL_TIMEOUT_S = 600.0  # a small CPU model answering a long prompt
MAX_LOCAL_SERVERS = 4  # default: one embedded model server per core, at most this many


@dataclass(frozen=True)
class LLMTarget:
    """Where LLM calls go, decided from configuration alone (nothing started, nothing called).

    `base_url` is None for `local` until the embedded server runs; `model` is None when it must
    be asked from the server (`/v1/models`).
    """

    provider: str  # openrouter | openai-compatible | local
    base_url: str | None
    api_key: str | None = field(repr=False)
    model: str | None
    sub_model: str | None
    structured_mode: str
    extra_body: dict[str, Any] = field(default_factory=dict)


def _is_openrouter(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host == "openrouter.ai" or host.endswith(".openrouter.ai")


def is_local_model(name: str | None) -> bool:
    """Whether `name` is the embedded model's."""
    return bool(name) and str(name).lower().startswith(LOCAL_MODEL_PREFIX)


def resolve_target(
    *,
    base_url: str | None,
    api_key: str | None,
    model: str | None,
    sub_model: str | None,
    structured_mode: str | None = None,
) -> LLMTarget:
    """Decide the provider from explicit values."""
    if structured_mode is not None and structured_mode not in STRUCTURED_MODES:
        raise ValueError(
            f"structured_mode must be one of {STRUCTURED_MODES}, not {structured_mode!r}"
        )
    if base_url:
        base_url = base_url.rstrip("/")
        openrouter = _is_openrouter(base_url)
        local = _is_local_url(base_url) or is_local_model(model)
        return LLMTarget(
            provider="openrouter" if openrouter else "openai-compatible",
            base_url=base_url,
            api_key=api_key,
            model=model,
            sub_model=sub_model,
            structured_mode=structured_mode or ("json_object_schema" if local else "json_schema"),
            extra_body={"usage": {"include": True}} if openrouter else {},
        )
    if api_key:
        return LLMTarget(
            provider="openrouter",
            base_url=OPENROUTER_BASE_URL,
            api_key=api_key,
            model=model or OPENROUTER_DEFAULT_MODEL,
            sub_model=sub_model,
            structured_mode=structured_mode or "json_schema",
            extra_body={"usage": {"include": True}},
        )
    return LLMTarget(
        provider="local",
        base_url=None,
        api_key=None,
        model=None,
        sub_model=None,
        structured_mode=structured_mode or "json_object_schema",
    )


# -- the embedded server, shared by every client of this process ----------------------------

_local_lock = threading.Lock()
_local_servers: list[LocalLLMServer] = []
_local_users = 0
_atexit_registered = False


def _is_local_url(url: str) -> bool:
    """Whether `url` is one of the embedded servers this process runs."""
    return any(s.base_url.rstrip("/") == url.rstrip("/") for s in list(_local_servers))


def default_local_servers() -> int:
    """One embedded model server per core, at most `MAX_LOCAL_SERVERS`."""
    return max(1, min(os.cpu_count() or 1, MAX_LOCAL_SERVERS))


def _log_path(log_path: Path | None, index: int) -> Path | None:
    """`llm.log` for the first server, `llm-2.log` for the second, ..."""
    if log_path is None or index == 0:
        return log_path
    return log_path.with_name(f"{log_path.stem}-{index + 1}{log_path.suffix}")


def acquire_local_servers(
    n_ctx: int, count: int | None = None, log_path: Path | None = None
) -> list[LocalLLMServer]:
    """The process's embedded model servers (`count`, default one per core), started on first
    use, each with the cores shared out; pair with a release."""
    global _local_servers, _local_users, _atexit_registered
    with _local_lock:
        if not _local_servers or not all(s.running for s in _local_servers):
            for old in _local_servers:
                old.stop()
            count = count or default_local_servers()
            threads = max(1, (os.cpu_count() or 1) // count)
            servers = [
                LocalLLMServer(
                    n_ctx=n_ctx,
                    log_path=_log_path(log_path, i),
                    n_threads=threads,
                    n_threads_batch=threads,
                )
                for i in range(count)
            ]
            log.info("starting %d servers of the local model (log %s)", count, log_path)
            try:
                for server in servers:
                    server.start()
            except BaseException:
                for server in servers:
                    server.stop()
                raise
            _local_servers = servers
            if not _atexit_registered:
                atexit.register(stop_local_server)
                _atexit_registered = True
        _local_users += 1
        return list(_local_servers)


def release_local_server() -> None:
    """Give back one use of the embedded server; the last one stops it."""
    global _local_users
    with _local_lock:
        _local_users = max(0, _local_users - 1)
        last = _local_users == 0
    if last:
        stop_local_server()


def stop_local_server() -> None:
    """Stop the embedded servers if they run (at exit, or when their last user lets go)."""
    global _local_servers, _local_users
    with _local_lock:
        servers, _local_servers = _local_servers, []
        _local_users = 0
    for server in servers:
        server.stop()


def local_server_running() -> bool:
    """Whether this process runs an embedded model server now."""
    return any(s.running for s in list(_local_servers))


# -- building a client ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClientOptions:
    """Everything a client needs besides where it goes (see `LLMClient`)."""

    max_concurrency: int = 4
    timeout_s: float = 120.0
    max_retries: int = 4
    context_window: int = 8192
    cache_dir: Path | None = None
    cache_url: str | None = None  # a Postgres URL: the cache lives there instead
    local_log_path: Path | None = None
    local_servers: int | None = None  # embedded model server processes (None: one per core)
    explicit_structured_mode: bool = False  # else a local model name picks json_object_schema


def open_client(target: LLMTarget, options: ClientOptions) -> tuple[LLMClient, bool]:
    """A client for `target`, and whether it holds the embedded server (release it on close).

    For the `local` provider the embedded server is started (or shared) and answers every call;
    a model name of another provider is ignored there, with a warning.
    """
    base_url, model, sub_model = target.base_url, target.model, target.sub_model
    holds_local = False
    replicas: list[str] = []
    if target.provider == "local":
        servers = acquire_local_servers(
            options.context_window, options.local_servers, options.local_log_path
        )
        holds_local = True
        base_url, model, sub_model = servers[0].base_url, servers[0].model_name, None
        replicas = [s.base_url for s in servers[1:]]
    assert base_url is not None
    try:
        if model is None:
            model = discover_model(base_url, target.api_key)
        mode = target.structured_mode
        if is_local_model(model) and not options.explicit_structured_mode:
            mode = "json_object_schema"
        local = target.provider == "local"
        client = LLMClient(
            base_url=base_url,
            api_key=target.api_key,
            model=model,
            sub_model=sub_model,
            structured_mode=mode,  # type: ignore[arg-type]
            cache_dir=options.cache_dir,
            cache_url=options.cache_url,
            # Each embedded server has one slot: a call goes to a free one.
            max_concurrency=1 if local else options.max_concurrency,
            replica_urls=replicas,
            timeout_s=max(options.timeout_s, LOCAL_TIMEOUT_S) if local else options.timeout_s,
            max_retries=options.max_retries,
            extra_body=target.extra_body,
            context_window=options.context_window,
        )
    except BaseException:
        if holds_local:
            release_local_server()
        raise
    return client, holds_local


def discover_model(base_url: str, api_key: str | None) -> str:
    """The first model a server lists at `/models` (for servers that serve one model)."""
    from openai import OpenAI, OpenAIError

    client = OpenAI(base_url=base_url, api_key=api_key or "not-needed", max_retries=1, timeout=10)
    try:
        models = [m.id for m in client.models.list()]
    except OpenAIError as exc:
        raise ValueError(
            f"no LLM model configured and {base_url}/models did not list one ({exc}); "
            "set MEMCITY_LLM_MODEL"
        ) from exc
    finally:
        client.close()
    if not models:
        raise ValueError(f"{base_url}/models lists no model; set MEMCITY_LLM_MODEL")
    return models[0]


__all__ = [
    "OPENROUTER_BASE_URL",
    "ClientOptions",
    "LLMTarget",
    "StructuredMode",
    "acquire_local_servers",
    "default_local_servers",
    "is_local_model",
    "local_server_running",
    "open_client",
    "release_local_server",
    "resolve_target",
    "stop_local_server",
]
