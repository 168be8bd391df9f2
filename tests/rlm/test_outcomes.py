"""How an RLM query ends, as a user sees it: the process exits once the result is out (an
abandoned sub-call never holds it), a timeout names where the time went, `iterations` counts
the root turns made, and a capped context says what it kept.

Real parts throughout: the scripted OpenAI-compatible server, the real client, a real local
sandbox (bwrap) and a lake built by ingestion.
"""

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from memcity_pipeline.ingestion.sync import Limits
from memcity_pipeline.lake.delta import write_rows
from memcity_pipeline.lake.tables import ENRICHED_CHUNKS, scope_where
from memcity_pipeline.llm.client import LLMClient, LLMError
from memcity_pipeline.resources.sandbox import LocalSandboxResource, SandboxResource
from memcity_pipeline.rlm.context import MAX_CHUNKS, MAX_MEMORIES, MAX_SESSIONS, gather_context
from memcity_pipeline.settings import get_settings
from tests.fixtures_sandbox import BWRAP
from tests.partitioned import sync_every_scope
from tests.rlm.test_rlm import ROOT, SUB, Script, ask, opening_text, repl
from tests.scripted_llm_server import Fault, ScriptedLLMServer

pytestmark = [
    pytest.mark.skipif(not Path(BWRAP).exists(), reason="bubblewrap is not installed"),
    pytest.mark.bwrap,
]


@pytest.fixture
def sandbox(memcity_home: Path) -> Iterator[SandboxResource]:
    resource = LocalSandboxResource(
        sessions_root=str(memcity_home / "sandboxes"), isolation="bwrap", exec_timeout_s=20.0
    )
    yield resource
    resource.close()


SLOW_S = 60.0  # a sub-call this slow must never keep a finished query's process alive
EXIT_WITHIN_S = 30.0  # far below SLOW_S, far above any honest exit


# -- item 1: the process ends when its result is out ------------------------------------------

# A query through the public Python API in its own process; prints RESULT <json> when done.
API_QUERY = textwrap.dedent(
    """
    import json, sys
    from memcity_pipeline.api import rlm_query
    from memcity_pipeline.llm.client import LLMClient
    from memcity_pipeline.resources.sandbox import LocalSandboxResource

    base_url, home, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    client = LLMClient(base_url=base_url, api_key=None, model="root-model",
                       sub_model="sub-model", cache_dir=None)
    sandbox = LocalSandboxResource(sessions_root=home + "/sandboxes", isolation="bwrap",
                                   exec_timeout_s=20.0)
    result = rlm_query("saltmarsh", "What is there?", "custom", custom_context="abc",
                       llm=client, sandbox=sandbox.get_backend(), rlm_config=config)
    print("RESULT " + result.model_dump_json(), flush=True)
    """
)


def exits_after_result(argv: list[str], marker: str) -> tuple[str, int | None]:
    """Run `argv`; once a stdout line starts with `marker`, give the process EXIT_WITHIN_S to
    exit. Returns that line and the exit code (None: it was still running, then killed)."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    try:
        line = next((ln for ln in proc.stdout if ln.startswith(marker)), "")
        assert line, "the process ended without printing its result"
        try:
            return line, proc.wait(timeout=EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            return line, None
    finally:
        proc.kill()
        proc.wait()


def test_a_query_process_exits_once_its_result_is_out_despite_an_abandoned_sub_call(
    scripted_llm: ScriptedLLMServer, memcity_home: Path
) -> None:
    scripted_llm.responder = Script(
        repl("x = llm_query('take your time')\nFINAL(x)", "Asking."),
        sub=lambda prompt: Fault(200, delay_s=SLOW_S, content="late"),
    )
    config = {"max_timeout": 3}
    argv = [sys.executable, "-c", API_QUERY, scripted_llm.base_url, str(memcity_home)]
    line, code = exits_after_result([*argv, json.dumps(config)], "RESULT ")
    result = json.loads(line.removeprefix("RESULT "))
    assert result["status"] == "timeout" and result["answer"] == "Asking."
    assert code == 0, "the process outlived its result, waiting for the abandoned sub-call"


def test_a_query_process_exits_when_an_execution_timeout_left_a_sub_call_behind(
    scripted_llm: ScriptedLLMServer, memcity_home: Path
) -> None:
    # The execution's own timeout (not the query's) gives up on the sub-call; the query then
    # completes, with the sub-call still unanswered on the host.
    scripted_llm.responder = Script(
        repl("x = llm_query('take your time')", "Asking."),
        "It took too long.\nFINAL(no answer in time)",
        sub=lambda prompt: Fault(200, delay_s=SLOW_S, content="late"),
    )
    config = {"max_timeout": 300, "sandbox_exec_timeout_s": 2}
    argv = [sys.executable, "-c", API_QUERY, scripted_llm.base_url, str(memcity_home)]
    line, code = exits_after_result([*argv, json.dumps(config)], "RESULT ")
    result = json.loads(line.removeprefix("RESULT "))
    assert result["status"] == "completed" and result["answer"] == "no answer in time"
    assert code == 0, "the process outlived its result, waiting for the abandoned sub-call"


def test_memcity_query_exits_once_it_printed_the_answer(
    scripted_llm: ScriptedLLMServer, memcity_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMCITY_LLM_BASE_URL", scripted_llm.base_url)
    monkeypatch.setenv("MEMCITY_LLM_MODEL", ROOT)
    monkeypatch.setenv("MEMCITY_LLM_SUB_MODEL", SUB)
    custom = memcity_home / "notes.txt"
    custom.write_text("abc")
    scripted_llm.responder = Script(
        repl("x = llm_query('take your time')\nFINAL(x)", "ANSWER-SO-FAR"),
        sub=lambda prompt: Fault(200, delay_s=SLOW_S, content="late"),
    )
    memcity = Path(sys.executable).with_name("memcity")
    argv = [str(memcity), "query", "--org", "saltmarsh", "--context-type", "custom"]
    argv += ["--custom-file", str(custom), "--max-timeout", "3", "What is there?"]
    line, code = exits_after_result(argv, "ANSWER-SO-FAR")
    assert code == 1  # a timeout is exit code 1; what matters is that it exited at all
    assert line.strip() == "ANSWER-SO-FAR"


def test_an_llm_call_with_a_time_limit_drops_its_request_and_starts_no_other(
    scripted_llm: ScriptedLLMServer,
) -> None:
    scripted_llm.push(Fault(200, delay_s=SLOW_S, content="late"))
    client = LLMClient(
        base_url=scripted_llm.base_url, api_key=None, model=ROOT, cache_dir=None, max_retries=4
    )
    with pytest.raises(LLMError, match="time limit"):
        client.complete([{"role": "user", "content": "hi"}], time_limit_s=1.0, use_cache=False)
    assert scripted_llm.call_count == 1  # no retry once the time was spent
    assert client.complete([{"role": "user", "content": "hi"}]).text == "ok"  # a free slot


# -- item 2: honest outcome messages ----------------------------------------------------------

HANG = Fault(200, delay_s=SLOW_S, content=repl("FINAL('late')"))


@pytest.mark.parametrize(
    ("replies", "sub", "config", "where", "iterations"),
    [
        pytest.param(
            [repl("import time\ntime.sleep(60)", "Waiting.")],
            None,
            {},
            "during code execution in the sandbox",
            1,
            id="code",
        ),
        pytest.param(
            [repl("print(1)", "Waiting."), HANG],
            None,
            {},
            "during a root LLM call",
            1,  # the second root call never answered: one turn was made
            id="root-call",
        ),
        pytest.param(
            [repl("x = llm_query('slow')\nFINAL(x)", "Waiting.")],
            lambda prompt: Fault(200, delay_s=SLOW_S, content="late"),
            {},
            "during a sub-call (llm_query from the sandboxed code)",
            1,
            id="sub-call",
        ),
        pytest.param(
            [repl("x = llm_query('count: a b')\nFINAL(x)", "Waiting."), HANG],
            None,
            {"max_depth": 2},
            "during a root LLM call of the child RLM at depth 1",
            1,  # the parent's turn; the child's only root call never answered
            id="child-root-call",
        ),
    ],
)
def test_a_timeout_names_where_the_time_went_and_counts_the_turns_made(
    scripted_llm: ScriptedLLMServer,
    sandbox: SandboxResource,
    replies: list[Any],
    sub: Any,
    config: dict[str, Any],
    where: str,
    iterations: int,
) -> None:
    scripted_llm.responder = Script(*replies, sub=sub)
    result = ask(
        scripted_llm,
        sandbox,
        "custom",
        custom_context="abc",
        rlm_config={"max_timeout": 3, **config},
    )
    assert result.status == "timeout", result
    assert result.answer == "Waiting."
    warning = result.warning or ""
    assert warning.startswith("max_timeout of 3 s reached after ")
    assert f"the time ran out {where};" in warning
    assert result.iterations == iterations


# -- a capped context says what it kept -------------------------------------------------------


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture
def big_lake(memcity_home: Path) -> Path:
    """A user with more memories and conversations than a query loads, and a knowledge base
    with more chunks."""
    user = memcity_home / "landing" / "orgs" / "bigorg" / "users" / "kim"
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def at(minutes: int) -> str:
        return (start + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")

    memories = [  # m00000 is the oldest
        {"id": f"m{i:05d}", "text": f"memory {i}", "created_at": at(i)}
        for i in range(MAX_MEMORIES + 200)
    ]
    _jsonl(user / "memories.jsonl", memories)
    for s in range(MAX_SESSIONS + 5):
        turn = {"role": "user", "content": f"question {s}", "created_at": at(60 * s)}
        _jsonl(user / "conversations" / f"s{s:03d}.jsonl", [turn])
    lake_dir = get_settings().lake_dir
    for kind in ("memories", "conversations"):
        sync_every_scope(kind, memcity_home / "landing", lake_dir, Limits(10_000_000, 2_000_000))
    rows = [
        {
            "org_id": "bigorg",
            "knowledge_base_id": "manual",
            "document_id": f"doc{i // 1000}",
            "chunk_id": f"c{i}",
            "ordinal": i % 1000,
            "text": f"chunk {i}",
            "key_terms": [],
            "entities": [],
            "enrichment_status": "off",
        }
        for i in range(MAX_CHUNKS + 10)
    ]
    table = pa.Table.from_pylist(rows, schema=ENRICHED_CHUNKS)
    where = scope_where("enriched_chunks", "bigorg", "manual")
    write_rows(lake_dir, "enriched_chunks", where, pl.from_arrow(table))  # type: ignore[arg-type]
    return lake_dir


def test_a_capped_context_says_how_many_it_kept_of_how_many(big_lake: Path) -> None:
    memories = gather_context(big_lake, "bigorg", "memories", user_id="kim")
    assert memories.cap_note == "the most recent 1,000 of 1,200 memories"
    assert memories.payload[-1].startswith("[m01199 |")  # the newest is kept, the oldest not
    assert not any(item.startswith("[m00000 |") for item in memories.payload)
    sessions = gather_context(big_lake, "bigorg", "conversation", user_id="kim")
    assert sessions.cap_note == f"the most recent 50 of {MAX_SESSIONS + 5} conversation sessions"
    chunks = gather_context(big_lake, "bigorg", "documents", knowledge_base_id="manual")
    assert chunks.cap_note == "the first 5,000 of 5,010 chunks (in document order)"
    whole = gather_context(big_lake, "bigorg", "custom", custom_context="a string")
    assert whole.cap_note is None and whole.total_available == 1


def test_a_query_over_a_capped_context_warns_and_tells_the_root_llm(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, big_lake: Path
) -> None:
    script = Script(repl("FINAL(str(len(context)))"))
    scripted_llm.responder = script
    result = ask(scripted_llm, sandbox, "memories", org_id="bigorg", user_id="kim")
    assert result.status == "completed" and result.answer == "1000"
    assert result.warning == (
        "the context was capped: the most recent 1,000 of 1,200 memories were loaded"
    )
    assert (result.context_items, result.context_total_items) == (1000, 1200)
    assert "It holds the most recent 1,000 of 1,200 memories" in opening_text(script)
