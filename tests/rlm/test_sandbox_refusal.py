"""An RLM query where bubblewrap cannot isolate: it fails closed, with the one-line refusal as
its error and a failed session row, and `memcity query` says so without a traceback."""

from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from memcity_pipeline.cli import app
from memcity_pipeline.llm.client import LLMClient
from memcity_pipeline.rlm.query import rlm_query
from memcity_pipeline.rlm.sessions import SessionStore, read_sessions
from memcity_pipeline.sandbox.local import LocalSandboxBackend
from memcity_pipeline.settings import get_settings
from tests.fixtures_sandbox import BROKEN_BWRAP, NO_NAMESPACES
from tests.scripted_llm_server import ScriptedLLMServer

REFUSAL = "bubblewrap cannot isolate sandboxed code here ("
FIXES = (
    "install bubblewrap with user namespaces enabled, use MEMCITY_SANDBOX=daytona, or set "
    "MEMCITY_SANDBOX_ISOLATION=none to run it without isolation"
)


def test_a_query_the_sandbox_refuses_fails_with_the_refusal_and_a_session_row(
    scripted_llm: ScriptedLLMServer,
    sandbox_backend_factory: Callable[..., LocalSandboxBackend],
    memcity_home: Path,
) -> None:
    scripted_llm.responder = lambda request: "```repl\nFINAL('ran')\n```"
    lake = get_settings().lake_dir
    result = rlm_query(
        "acme",
        "How many notes?",
        "custom",
        custom_context=["ferry at 9", "bus at 11"],
        llm=LLMClient(base_url=scripted_llm.base_url, api_key=None, model="root", cache_dir=None),
        sandbox=sandbox_backend_factory(bwrap=BROKEN_BWRAP),
        lake_dir=lake,
        session_store=SessionStore(lake),
    )
    assert result.status == "failed" and result.answer == ""
    assert result.error is not None and "\n" not in result.error
    assert REFUSAL in result.error and result.error.endswith(FIXES)
    assert scripted_llm.chat_requests == []  # refused before any root turn was paid for
    row = read_sessions(lake).row(0, named=True)
    assert row["session_id"] == result.session_id and row["status"] == "failed"
    assert REFUSAL in row["error_message"]


def test_memcity_query_where_bwrap_lacks_namespaces_exits_1_with_the_refusal(
    scripted_llm: ScriptedLLMServer, memcity_home: Path, path_without_namespaces: str
) -> None:
    notes = memcity_home / "notes.json"
    notes.write_text('["ferry at 9", "bus at 11"]')
    scripted_llm.responder = lambda request: "```repl\nFINAL(str(len(context)))\n```"
    env = {
        "PATH": path_without_namespaces,
        "MEMCITY_LLM_BASE_URL": scripted_llm.base_url,
        "MEMCITY_LLM_MODEL": "root",
    }
    args = ["query", "How many?", "--org", "acme", "--context-type", "custom"]
    result = CliRunner().invoke(app, [*args, "--custom-file", str(notes)], env=env)
    shown = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 1, result.output
    assert "failed" in shown and REFUSAL in shown and FIXES in shown
    assert NO_NAMESPACES.removeprefix("bwrap: ") in shown  # the reason bwrap gave
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
