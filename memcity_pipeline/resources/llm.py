"""The LLM resource: which provider to use, and one shared `LLMClient` for every LLM call.

Provider resolution (first match wins):

1. an explicit base URL (`base_url` / `MEMCITY_LLM_BASE_URL`): any OpenAI-compatible server
   (OpenRouter too, if the URL is OpenRouter's); without a model name, the server's first model;
2. an API key (`api_key` / `MEMCITY_LLM_API_KEY` / `OPENROUTER_API_KEY`): OpenRouter, model
   `openai/gpt-4o-mini` unless `MEMCITY_LLM_MODEL` says otherwise, with cost accounting;
3. nothing: the embedded SmolLM2-135M-Instruct, served on loopback once per process.
"""

import atexit
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dagster as dg
from pydantic import Field, PrivateAttr

from memcity_pipeline.lib.llm_client import STRUCTURED_MODES, LLMClient
from memcity_pipeline.lib.local_llm import LocalLLMServer
from memcity_pipeline.settings import OPENROUTER_BASE_URL, get_settings

log = logging.getLogger(__name__)

OPENROUTER_DEFAULT_MODEL = "openai/gpt-4o-mini"
LOCAL_MODEL_PREFIX = "smollm2"


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


LOCAL_TIMEOUT_S = 600.0  # a small CPU model answering a long prompt


def _is_local_model(name: str | None) -> bool:
    return bool(name) and str(name).lower().startswith(LOCAL_MODEL_PREFIX)


def resolve_target(
    *,
    base_url: str | None,
    api_key: str | None,
    model: str | None,
    sub_model: str | None,
    structured_mode: str | None = None,
) -> LLMTarget:
    """Decide the provider from explicit values (already merged with settings)."""
    if structured_mode is not None and structured_mode not in STRUCTURED_MODES:
        raise ValueError(
            f"structured_mode must be one of {STRUCTURED_MODES}, not {structured_mode!r}"
        )
    if base_url:
        base_url = base_url.rstrip("/")
        openrouter = _is_openrouter(base_url)
        local = _is_local_url(base_url) or _is_local_model(model)
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


# -- the embedded server, shared by every resource of this process -------------------------

_local_lock = threading.Lock()
_local_server: LocalLLMServer | None = None
_local_users = 0
_atexit_registered = False


def _is_local_url(url: str) -> bool:
    """Whether `url` is the embedded server this process runs."""
    server = _local_server
    return server is not None and server.base_url.rstrip("/") == url.rstrip("/")


def acquire_local_server(n_ctx: int, log_path: Path | None = None) -> LocalLLMServer:
    """The process's embedded model server, started on first use; pair with a release."""
    global _local_server, _local_users, _atexit_registered
    with _local_lock:
        if _local_server is None or not _local_server.running:
            server = LocalLLMServer(n_ctx=n_ctx, log_path=log_path)
            log.info("starting the local model %s (log %s)", server.model_name, log_path)
            server.start()
            _local_server = server
            if not _atexit_registered:
                atexit.register(stop_local_server)
                _atexit_registered = True
        _local_users += 1
        return _local_server


def release_local_server() -> None:
    """Give back one use of the embedded server; the last one stops it."""
    global _local_users
    with _local_lock:
        _local_users = max(0, _local_users - 1)
        last = _local_users == 0
    if last:
        stop_local_server()


def stop_local_server() -> None:
    """Stop the embedded server if it runs (at exit, or when its last user lets go)."""
    global _local_server, _local_users
    with _local_lock:
        server, _local_server = _local_server, None
        _local_users = 0
    if server is not None:
        server.stop()


def local_server_running() -> bool:
    """Whether this process runs the embedded model server now."""
    server = _local_server
    return server is not None and server.running


# -- the resource ---------------------------------------------------------------------------


class LLMResource(dg.ConfigurableResource):
    """Every LLM call of the pipeline goes through this resource's `LLMClient`.

    Unset fields come from settings (`MEMCITY_LLM_*`). Declare the key as a secret with
    `LLMResource(api_key=dg.EnvVar("MEMCITY_LLM_API_KEY"))`. Works outside Dagster too:
    `LLMResource().get_client()`.
    """

    base_url: str | None = Field(
        default=None, description="OpenAI-compatible base URL; wins over everything else."
    )
    api_key: str | None = Field(default=None, description="API key (secret: use dg.EnvVar).")
    model: str | None = Field(default=None, description="Model of root/ordinary calls.")
    sub_model: str | None = Field(default=None, description="Model of sub-calls (RLM).")
    max_concurrency: int | None = Field(default=None, description="Calls in flight at once.")
    timeout_s: float | None = Field(default=None, description="Timeout of one HTTP request.")
    max_retries: int | None = Field(default=None, description="Retries of a failed request.")
    cache_dir: str | None = Field(
        default=None, description="Folder of the answer cache; default `$MEMCITY_HOME/cache/llm`."
    )
    use_cache: bool = Field(default=True, description="Keep and reuse answers across runs.")
    context_window: int | None = Field(default=None, description="Context size in tokens.")
    structured_mode: str | None = Field(
        default=None,
        description="json_schema | json_object_schema | json_object; default by provider.",
    )

    _client: LLMClient | None = PrivateAttr(default=None)
    _holds_local: bool = PrivateAttr(default=False)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def _secret(self) -> str | None:
        """The API key, resolving an EnvVar when used outside Dagster."""
        value: Any = self.api_key
        if isinstance(value, dg.EnvVar):
            value = value.get_value()
        return value or get_settings().llm_api_key

    def target(self) -> LLMTarget:
        """Where calls go, from fields and settings (nothing started)."""
        s = get_settings()
        return resolve_target(
            base_url=self.base_url or s.llm_base_url,
            api_key=self._secret(),
            model=self.model or s.llm_model,
            sub_model=self.sub_model or s.llm_sub_model,
            structured_mode=self.structured_mode,
        )

    @property
    def provider(self) -> str:
        """`openrouter`, `openai-compatible` or `local`."""
        return self.target().provider

    def get_client(self) -> LLMClient:
        """This resource's client, created on first use (starts the local model if needed)."""
        with self._lock:
            if self._client is None:
                self._client = self._build_client()
            return self._client

    def _build_client(self) -> LLMClient:
        s = get_settings()
        target = self.target()
        context_window = self.context_window or s.llm_context_window
        base_url, model, sub_model = target.base_url, target.model, target.sub_model
        if target.provider == "local":
            if (s.llm_model or self.model) and not _is_local_model(self.model or s.llm_model):
                log.warning(
                    "MEMCITY_LLM_MODEL=%s ignored: no base URL or API key is set, so the "
                    "embedded local model answers",
                    self.model or s.llm_model,
                )
            server = acquire_local_server(context_window, s.home.resolve() / "logs" / "llm.log")
            self._holds_local = True
            base_url, model, sub_model = server.base_url, server.model_name, server.model_name
        assert base_url is not None
        if model is None:
            model = discover_model(base_url, target.api_key)
        mode = target.structured_mode
        if self.structured_mode is None and _is_local_model(model):
            mode = "json_object_schema"
        cache_dir = None
        if self.use_cache:
            cache_dir = Path(self.cache_dir) if self.cache_dir else s.cache_dir / "llm"
        return LLMClient(
            base_url=base_url,
            api_key=target.api_key,
            model=model,
            sub_model=sub_model,
            structured_mode=mode,  # type: ignore[arg-type]
            cache_dir=cache_dir,
            # The embedded server has one slot: parallel calls only queue there and time out.
            max_concurrency=1
            if target.provider == "local"
            else self.max_concurrency or s.llm_max_concurrency,
            timeout_s=self.timeout_s
            or (
                max(s.llm_timeout_s, LOCAL_TIMEOUT_S)
                if target.provider == "local"
                else s.llm_timeout_s
            ),
            max_retries=self.max_retries if self.max_retries is not None else s.llm_max_retries,
            extra_body=target.extra_body,
            context_window=context_window,
        )

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
