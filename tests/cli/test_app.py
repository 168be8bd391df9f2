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


def test_a_failed_step_names_its_own_cause_and_a_failed_check_names_the_check(
    memcity_home: Path,
) -> None:
    """A step that fails names its own error in one line (not Dagster's wrapper); a failed
    check fails the partition, naming the check and what it found, and the command exits 1."""
    user = memcity_home / "landing/orgs/acme/users/ann"
    (user / "conversations").mkdir(parents=True)
    (user / "memories.jsonl").write_text('{"id": "m1", "text": "likes tea"}\n')
    (user / "conversations/s1.jsonl").write_text('{"role": "user", "content": "hi"}\n')
    (memcity_home / "lake").mkdir()
    (memcity_home / "lake/conversations").write_text("not a table")  # where the table should be
    code, output = run("ingest")
    flat = " ".join(output.split())
    assert code == 1
    assert "acme/ann failed" in flat and "conversations: DeltaError: " in flat
    assert "Dagster" not in flat.split("acme/ann failed", 1)[1] and "Traceback" not in flat

    (memcity_home / "lake/conversations").unlink()
    kb = memcity_home / "landing/orgs/acme/knowledge_bases/kb"
    kb.mkdir(parents=True)
    (kb / "a.md").write_text("# Hives\n\nA hive scale weighs the hive.\n")
    assert run("ingest")[0] == 0
    import polars as pl

    from memcity_pipeline.lake.delta import append_rows, read_rows, write_rows
    from memcity_pipeline.lake.tables import scope_where

    lake = memcity_home / "lake"
    append_rows(lake, "conversations", read_rows(lake, "conversations"))  # a turn twice
    (user / "conversations/s1.jsonl").touch()  # the partition runs again: its write heals it
    docs = read_rows(lake, "raw_documents")  # a lake whose text no longer fits its chunks
    bad = docs.with_columns(pl.col("text").str.replace("scale", "SCALE"))
    write_rows(lake, "raw_documents", scope_where("raw_documents", "acme", "kb"), bad)
    (kb / "a.md").touch()
    code, output = run("ingest")
    flat = " ".join(output.split())
    assert code == 1
    assert "acme/kb failed" in flat and "acme/ann failed" not in flat
    assert "check chunk_offsets_valid of chunks failed: 1 chunks with wrong offsets" in flat
    assert read_rows(lake, "conversations").height == 1


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


# -- exit codes and errors: one convention for every command ---------------------------------


def run_split(*args: str, env: dict[str, str | None] | None = None) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one command."""
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_a_wrong_option_value_is_one_line_with_the_choices_or_json_with_json() -> None:
    code, stdout, stderr = run_split("query", "?", "--org", "acme", "--runtime", "ruby")
    line = one_line(stderr)
    assert code == 2 and stdout == ""
    assert line.startswith("error: ") and "'ruby' is not one of 'python', 'bun'" in line
    assert "Value error" not in line and "Usage" not in stderr and "╭" not in stderr

    code, stdout, stderr = run_split("query", "?", "--org", "acme", "--context-type", "books")
    line = one_line(stderr)
    assert code == 2
    for choice in ("memories", "documents", "conversation", "custom"):
        assert choice in line, choice

    code, stdout, stderr = run_split("query", "?", "--org", "acme", "--runtime", "ruby", "--json")
    assert code == 2 and stderr == ""
    error = json.loads(stdout)
    assert error["code"] == 2 and "'ruby' is not one of 'python', 'bun'" in error["error"]


def test_an_engine_option_out_of_range_names_the_option_not_the_model() -> None:
    code, _, stderr = run_split("query", "?", "--org", "acme", "--max-iterations", "0")
    line = one_line(stderr)
    assert code == 2 and "--max-iterations 0: Input should be greater than or equal to 1" in line
    assert "RLMConfig" not in stderr and "pydantic" not in stderr


def test_a_bad_variable_is_json_with_json_and_help_still_works() -> None:
    code, stdout, stderr = run_split("sessions", "--json", env={"MEMCITY_SANDBOX": "foo"})
    assert code == 2 and stderr == ""
    error = json.loads(stdout)
    assert error["code"] == 2 and "MEMCITY_SANDBOX='foo'" in error["error"]
    assert "'local' or 'daytona'" in error["error"]
    code, stdout, _ = run_split("sessions", "--help", env={"MEMCITY_SANDBOX": "foo"})
    assert code == 0 and "--limit" in stdout


def test_a_variable_that_misses_its_pattern_says_what_it_takes() -> None:
    code, _, stderr = run_split("sessions", env={"MEMCITY_EMBEDDINGS": "bert"})
    line = one_line(stderr)
    assert code == 2 and "MEMCITY_EMBEDDINGS='bert'" in line
    assert "should be `local`" in line and "`openai:<model>`" in line  # the field's words
    assert "pattern" not in line and "^(" not in line


def test_search_and_query_from_another_folder_share_one_message_naming_the_lake(
    tmp_path: Path,
) -> None:
    away = {"MEMCITY_HOME": None}  # as run from a folder other than the one that ingested
    lake = tmp_path / ".memcity" / "lake"  # the tests run in tmp_path
    code_s, _, search_err = run_split("search", "ferry", "--org", "acme", "--kb", "wiki", env=away)
    code_q, _, query_err = run_split("query", "ferry", "--org", "acme", "--kb", "wiki", env=away)
    assert code_s == code_q == 2
    assert one_line(search_err) == one_line(query_err)
    assert f"unknown org 'acme' in the lake at {lake}" in search_err

    code_s, search_out, _ = run_split("search", "x", "--org", "acme", "--kb", "w", "--json")
    code_q, query_out, _ = run_split("query", "x", "--org", "acme", "--kb", "w", "--json")
    assert code_s == code_q == 2 and json.loads(search_out) == json.loads(query_out)

    code_s, _, search_err = run_split("search", "x", "--org", "../acme", "--kb", "w")
    code_q, _, query_err = run_split("query", "x", "--org", "../acme", "--kb", "w")
    assert code_s == code_q == 2 and one_line(search_err) == one_line(query_err)


def test_a_malformed_custom_context_file_is_named(memcity_home: Path) -> None:
    broken = memcity_home / "notes.json"
    broken.write_text('["ferry at 9", ')
    lines = memcity_home / "notes.jsonl"
    lines.write_text('"ferry at 9"\n{oops\n')
    for path, where in ((broken, f"{broken}: not valid JSON"), (lines, f"{lines}, line 2")):
        code, _, stderr = run_split(
            "query", "?", "--org", "acme", "--context-type", "custom", "--custom-file", str(path)
        )
        line = one_line(stderr)
        assert code == 2 and where in line and "--custom-file" in line
    code, _, stderr = run_split(
        "query", "?", "--org", "acme", "--context-type", "custom", "--custom-file", "gone.txt"
    )
    assert code == 2 and "--custom-file gone.txt: No such file or directory" in one_line(stderr)


def test_a_custom_file_over_the_limit_is_refused_before_it_is_read(memcity_home: Path) -> None:
    huge = memcity_home / "huge.txt"
    with huge.open("wb") as file:
        file.truncate(289_000_000)  # 289 MB by its size (sparse: nothing on disk)
    query = ("query", "?", "--org", "acme", "--context-type", "custom", "--custom-file")
    code, _, stderr = run_split(*query, str(huge))
    assert code == 2
    assert one_line(stderr) == (
        f"error: --custom-file {huge} is 289,000,000 bytes, over the limit of 20,000,000 "
        "characters (MEMCITY_MAX_CUSTOM_CONTEXT_CHARS)"
    )
    notes = memcity_home / "notes.jsonl"
    notes.write_text('"ferry at 9"\n"ferry at 10"\n')  # 27 bytes
    code, _, stderr = run_split(*query, str(notes), env={"MEMCITY_MAX_CUSTOM_CONTEXT_CHARS": "20"})
    assert code == 2 and "27 bytes, over the limit of 20 characters" in one_line(stderr)
    code, stdout, _ = run_split(
        *query, str(notes), "--json", env={"MEMCITY_MAX_CUSTOM_CONTEXT_CHARS": "20"}
    )
    assert code == 2 and "MEMCITY_MAX_CUSTOM_CONTEXT_CHARS" in json.loads(stdout)["error"]


def test_a_system_prompt_file_over_the_limit_is_refused_before_it_is_read(
    memcity_home: Path,
) -> None:
    prompt = memcity_home / "prompt.txt"
    prompt.write_text("p" * 100_001)
    code, _, stderr = run_split(
        "query", "?", "--org", "acme", "--kb", "w", "--system-prompt-file", str(prompt)
    )
    assert code == 2
    assert f"--system-prompt-file {prompt} is 100,001 bytes, over the limit of 100,000" in (
        one_line(stderr)
    )


def test_an_ingest_selection_error_is_json_with_json(memcity_home: Path) -> None:
    code, stdout, stderr = run_split("ingest", "--org", "globex", "--json")
    assert code == 2 and stderr == ""
    error = json.loads(stdout)
    assert error["code"] == 2 and "no org 'globex'" in error["error"]


def test_create_snapshot_without_a_daytona_key_is_one_line() -> None:
    code, stdout, stderr = run_split("daytona", "create-snapshot")
    assert code == 2 and stdout == ""
    assert "DAYTONA_API_KEY is not set" in one_line(stderr) and "Traceback" not in stderr


# -- memcity sessions ---------------------------------------------------------------------------


def test_sessions_show_id_status_and_error_uncut_and_json_has_every_column(
    memcity_home: Path,
) -> None:
    from datetime import UTC, datetime

    from memcity_pipeline.rlm.sessions import COLUMNS, write_session_row

    lake = memcity_home.resolve() / "lake"
    error = (
        "LLMError: LLM call to root-model at http://127.0.0.1:9/v1 failed after 5 attempt(s): "
        "connection error (ConnectError: [Errno 111] Connection refused)"
    )
    question = "Which ferries leave Saltmarsh harbour before nine in the morning in the winter?"
    write_session_row(
        lake,
        {
            "session_id": "5f0c2d9e8b7a4c1d9e8f7a6b5c4d3e2f",
            "org_id": "saltmarsh",
            "query": question,
            "context_type": "memories",
            "iterations": 0,
            "sub_calls": 0,
            "execution_time_s": 2.5,
            "status": "failed",
            "error_message": error,
            "started_at": datetime(2026, 12, 1, 9, 30, tzinfo=UTC),
        },
    )
    code, stdout, _ = run_split("sessions")
    assert code == 0
    row = next(line for line in stdout.splitlines() if "5f0c2d9e" in line)
    for cell in ("5f0c2d9e8b7a4c1d9e8f7a6b5c4d3e2f", "failed", question, error):
        assert cell in row, cell  # whole, on the session's line, whatever the width
    code, stdout, _ = run_split("sessions", "--json")
    (listed,) = json.loads(stdout)
    assert set(listed) == {*COLUMNS, "date"} and listed["error_message"] == error


def test_no_session_yet_names_the_lake(memcity_home: Path) -> None:
    code, _, stderr = run_split("sessions")
    assert code == 0 and f"no RLM session yet in the lake at {memcity_home.resolve()}" in stderr


# -- MEMCITY_HOME: the embedded Dagster instance -------------------------------------------------


def test_a_first_ingest_on_a_new_home_prints_no_dagster_telemetry_banner(
    memcity_home: Path,
) -> None:
    docs = memcity_home / "landing/orgs/acme/knowledge_bases/handbook"
    docs.mkdir(parents=True)
    (docs / "a.md").write_text("# Ferries\n\nThe ferry leaves at nine.")
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    memcity = Path(sys.executable).with_name("memcity")
    done = subprocess.run(
        [str(memcity), "ingest"], capture_output=True, text=True, env=env, timeout=600
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed
    assert "acme/handbook" in printed
    assert "Telemetry" not in printed and "Welcome to Dagster" not in printed
    assert "enabled: false" in (memcity_home / "dagster_home/dagster.yaml").read_text()
