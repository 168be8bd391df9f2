"""Shared pytest fixtures. Area fixtures live in tests/fixtures_*.py and are registered here."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property-based tests: no per-example deadline (these machines are shared and noisy), fixtures
# of the test function are shared by its examples on purpose, and CI (`CI=true`) draws the same
# examples on every run so that a red run can be replayed.
settings.register_profile(
    "memcity",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=bool(os.environ.get("CI")),
    print_blob=True,
)
settings.load_profile("memcity")

pytest_plugins = [
    "tests.fixtures_llm",
    "tests.fixtures_sandbox",
    "tests.fixtures_s3",
]

# Variables that would point a test at real services or real secrets.
_SCRUBBED = [
    "DAGSTER_HOME",
    "MEMCITY_LANDING",
    "MEMCITY_LLM_BASE_URL",
    "MEMCITY_LLM_API_KEY",
    "OPENROUTER_API_KEY",
    "MEMCITY_LLM_MODEL",
    "MEMCITY_LLM_SUB_MODEL",
    "MEMCITY_POSTGRES_URL",
    "MEMCITY_DAGSTER_POSTGRES_URL",
    "MEMCITY_ENRICHMENT",
    "MEMCITY_EMBEDDINGS",
    "MEMCITY_SANDBOX",
    "DAYTONA_API_KEY",
    "DAYTONA_API_URL",
    "MEMCITY_LAKE_URI",
    "MEMCITY_LLM_CACHE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ALLOW_HTTP",
    "AWS_PROFILE",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
]


@pytest.fixture(autouse=True)
def memcity_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own MEMCITY_HOME (lake, landing, Dagster instance) and no secrets."""
    home = tmp_path / "memcity"
    home.mkdir()
    monkeypatch.setenv("MEMCITY_HOME", str(home))
    for name in _SCRUBBED:
        monkeypatch.delenv(name, raising=False)
    # Whole-job tests run without LLM phases (minutes on the CPU model); the tests of the LLM
    # phases give their own resources, and one runs them on the real local model.
    monkeypatch.setenv("MEMCITY_ENRICHMENT", "off")
    monkeypatch.chdir(tmp_path)  # no stray .env from the working directory
    yield home


POSTGRES_TEST_URL = "postgresql://postgres@127.0.0.1:5432/test"
