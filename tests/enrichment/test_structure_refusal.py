"""Phase 1 of a long document when the sandbox refuses to run code (bubblewrap cannot isolate):
the document is read in windows, and the refusal is kept in the failed session's row."""

from pathlib import Path

from memcity_pipeline.resources.sandbox import LocalSandboxResource
from memcity_pipeline.settings import get_settings
from tests.enrichment.test_enrichment import (
    KB,
    LONG_DOC,
    RLM_STRUCTURE_PROGRAM,
    _materialize,
    _resources,
    _sessions,
    _table,
    _write,
    rlm_structure_responder,
)
from tests.fixtures_sandbox import BROKEN_BWRAP
from tests.scripted_llm_server import ScriptedLLMServer


def test_a_long_document_is_read_in_windows_when_the_sandbox_refuses(
    scripted_llm: ScriptedLLMServer, memcity_home: Path
) -> None:
    scripted_llm.responder = rlm_structure_responder(RLM_STRUCTURE_PROGRAM)
    _write(get_settings().landing_dir, f"{KB}/long.md", LONG_DOC)
    refusing = LocalSandboxResource(
        sessions_root=str(memcity_home / "sandboxes"), bwrap=BROKEN_BWRAP
    )
    result = _materialize({**_resources(scripted_llm, context_window=1200), "sandbox": refusing})
    assert result.success
    structure = _table("document_structure").row(0, named=True)
    assert (structure["status"], structure["method"]) == ("ok", "llm-windowed")
    assert structure["summary"] == "Combined summary of all parts."
    session = _sessions().row(0, named=True)
    assert (session["status"], session["iterations"]) == ("failed", 0)
    assert "bubblewrap cannot isolate sandboxed code here" in session["error_message"]
    assert "MEMCITY_SANDBOX_ISOLATION=none" in session["error_message"]
