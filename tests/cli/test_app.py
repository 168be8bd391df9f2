"""The `memcity` command as a user types it: settings errors, the RLM options, a query."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memcity_pipeline.cli import app
from memcity_pipeline.rlm.config import RLMConfig
from tests.fixtures_sandbox import BWRAP
from tests.scripted_llm_server import ScriptedLLMServer

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.output  # stdout and stderr, as a terminal shows them


def test_a_bad_variable_is_one_line_naming_it_and_exit_code_2() -> None:
    code, output = run("sessions", env={"MEMCITY_CHUNK_TOKENS": "many"})
    assert code == 2
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "MEMCITY_CHUNK_TOKENS='many'" in lines[0] and "Traceback" not in output
    code, output = run("sessions", env={"MEMCITY_SANDBOX": "docker"})
    assert code == 2 and "MEMCITY_SANDBOX='docker'" in output


def test_dagster_definitions_validate_names_a_bad_variable_without_a_traceback(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "MEMCITY_ENRICHMENT": "sometimes", "DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    dagster = Path(sys.executable).with_name("dagster")
    bad = subprocess.run(
        [str(dagster), "definitions", "validate", "-m", "memcity_pipeline.definitions"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert bad.returncode != 0
    assert "MEMCITY_ENRICHMENT='sometimes'" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr + bad.stdout


def test_version_is_printed_even_with_a_bad_variable() -> None:
    code, output = run("--version", env={"MEMCITY_CHUNK_TOKENS": "many"})
    assert code == 0 and output.startswith("memcity-pipeline 0.")


def test_ingest_picks_partitions_and_refuses_ones_the_landing_folder_lacks(
    memcity_home: Path,
) -> None:
    docs = memcity_home / "landing/orgs/acme/knowledge_bases/handbook"
    docs.mkdir(parents=True)
    (docs / "a.md").write_text("# A\n\ntext")
    code, output = run("ingest", "--kb", "acme/wiki")
    assert code == 2
    assert "no knowledge base 'acme/wiki' in the landing folder" in output
    assert "known: acme/handbook" in output and "Traceback" not in output
    code, output = run("ingest", "--user", "acme")
    assert code == 2 and "invalid partition key 'acme'" in output
    code, output = run("ingest", "--org", "globex")
    assert code == 2 and "no org 'globex'" in output and "known: acme" in output
    code, output = run("ingest", "--help")
    for option in ("--org", "--kb", "--user", "--all", "--parallel"):
        assert option in output, option


def test_query_help_lists_every_engine_option_with_its_choices() -> None:
    code, output = run("query", "--help", env={"COLUMNS": "200"})
    assert code == 0
    for name in RLMConfig.model_fields:
        option = (
            "--system-prompt-file"
            if name == "custom_system_prompt"
            else "--" + name.replace("_", "-")
        )
        assert option in output, option
    assert "python|bun" in output and "shared|per_org" in output
    assert "memories|documents|conversation|custom" in output


def test_a_runtime_that_does_not_exist_is_a_wrong_request_with_the_choices() -> None:
    code, output = run("query", "?", "--org", "acme", "--runtime", "ruby")
    assert code == 2 and "ruby" in output and "python" in output and "bun" in output


@pytest.mark.bwrap
@pytest.mark.skipif(not Path(BWRAP).exists(), reason="bubblewrap is not installed")
def test_a_query_from_the_command_line_takes_the_engine_options(
    scripted_llm: ScriptedLLMServer, memcity_home: Path
) -> None:
    notes = memcity_home / "notes.json"
    notes.write_text('["ferry at 9", "ferry at 10", "bus at 11"]')
    prompt = memcity_home / "prompt.txt"
    prompt.write_text("You are a counting engine. Write ```repl code.")
    scripted_llm.responder = lambda request: "```repl\nFINAL(str(len(context)))\n```"
    code, output = run(
        "query",
        "How many notes?",
        "--org",
        "acme",
        "--context-type",
        "custom",
        "--custom-file",
        str(notes),
        "--max-iterations",
        "2",
        "--max-depth",
        "1",
        "--sandbox-exec-timeout-s",
        "30",
        "--system-prompt-file",
        str(prompt),
        "--json",
        env={"MEMCITY_LLM_BASE_URL": scripted_llm.base_url, "MEMCITY_LLM_MODEL": "root"},
    )
    assert code == 0, output
    result = json.loads(output[output.index("{") :])
    assert result["status"] == "completed" and result["answer"] == "3"
    first = scripted_llm.chat_requests[0].body["messages"][0]["content"]
    assert first.startswith("You are a counting engine.")
