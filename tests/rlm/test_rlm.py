"""The RLM query engine end to end: real OpenAI client against the scripted server, a real
local sandbox (bwrap), a real lake built by ingestion, and the machine's real Postgres."""

import json
import logging
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pyarrow as pa
import pytest

from memcity_pipeline.api import rlm_query
from memcity_pipeline.ingestion.sync import Limits
from memcity_pipeline.lake.delta import read_rows, table_version, write_rows
from memcity_pipeline.lake.tables import ENRICHED_CHUNKS, scope_where
from memcity_pipeline.llm.client import LLMClient
from memcity_pipeline.resources.llm import LLMResource
from memcity_pipeline.resources.sandbox import LocalSandboxResource, SandboxResource
from memcity_pipeline.rlm.config import RLMConfig, RLMRequestError, RLMResult
from memcity_pipeline.rlm.sessions import SessionStore, read_sessions
from memcity_pipeline.settings import build_resources, get_settings
from tests.conftest import POSTGRES_TEST_URL
from tests.fixtures_sandbox import BWRAP
from tests.partitioned import sync_every_scope
from tests.scripted_llm_server import Fault, ScriptedLLMServer

ROOT = "root-model"
SUB = "sub-model"
SAMPLE = Path(__file__).resolve().parents[2] / "memcity_pipeline" / "sample_corpus" / "orgs"
CLOSED_PORT_URL = "postgresql://postgres@127.0.0.1:1/test"

pytestmark = [
    pytest.mark.skipif(not Path(BWRAP).exists(), reason="bubblewrap is not installed"),
    pytest.mark.bwrap,
]


def repl(code: str, prose: str = "Next step.") -> str:
    """A root-LLM reply with one ```repl block."""
    return f"{prose}\n```repl\n{code}\n```"


class Script:
    """Responder of the scripted server: root replies in order, sub-calls by a function."""

    def __init__(
        self,
        *root: str | Fault,
        sub: Callable[[str], str | Fault] | None = None,
        cost: float | None = None,
    ) -> None:
        self.root = list(root)
        self.sub = sub or (lambda prompt: f"sub[{prompt[:30]}]")
        self.cost = cost
        self.root_prompts: list[list[dict[str, Any]]] = []
        self.sub_prompts: list[str] = []

    def __call__(self, request: dict[str, Any]) -> Any:
        messages = request["messages"]
        if request["model"] == ROOT:
            self.root_prompts.append(messages)
            reply = self.root.pop(0) if self.root else "I have no more to say."
        else:
            prompt = str(messages[-1]["content"])
            self.sub_prompts.append(prompt)
            reply = self.sub(prompt)
        if isinstance(reply, str) and self.cost is not None:
            from tests.scripted_llm_server import completion_body

            return completion_body(reply, request, cost=self.cost)
        return reply


@pytest.fixture
def lake(memcity_home: Path) -> Path:
    """A small real lake: the sample org `saltmarsh` ingested, plus an enriched knowledge base."""
    landing = memcity_home / "landing"
    shutil.copytree(SAMPLE / "saltmarsh", landing / "orgs" / "saltmarsh")
    lake_dir = get_settings().lake_dir
    for kind in ("documents", "memories", "conversations"):
        sync_every_scope(kind, landing, lake_dir, Limits(10_000_000, 2_000_000))
    now = datetime.now(UTC)
    rows = [
        {
            "org_id": "saltmarsh",
            "knowledge_base_id": "handbook",
            "document_id": f"doc{d}",
            "chunk_id": f"doc{d}-{i}",
            "ordinal": i,
            "section_title": f"Part {i}",
            "start": 0,
            "end": 10,
            "text": f"It opens at {8 + i}.",
            "resolved_text": f"The ferry office {d} opens at {8 + i}.",
            "key_terms": ["ferry"],
            "summary": "hours",
            "entities": [],
            "enrichment_status": "enriched",
            "enrichment_error": None,
            "model": "m",
            "context_key": "k",
            "llm_calls": 0.5,
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "cost_usd": None,
            "enriched_at": now,
        }
        for d in range(2)
        for i in range(3)
    ]
    frame = pl.from_arrow(pa.Table.from_pylist(rows, schema=ENRICHED_CHUNKS))
    where = scope_where("enriched_chunks", "saltmarsh", "handbook")
    write_rows(lake_dir, "enriched_chunks", where, frame)  # type: ignore[arg-type]
    return lake_dir


@pytest.fixture
def sandbox(memcity_home: Path) -> Iterator[SandboxResource]:
    resource = LocalSandboxResource(
        sessions_root=str(memcity_home / "sandboxes"),
        isolation="bwrap",
        exec_timeout_s=20.0,
        cpu_seconds=60,
        memory_mb=1024,
        max_llm_concurrency=8,
    )
    yield resource
    resource.close()


def make_client(server: ScriptedLLMServer, **options: Any) -> LLMClient:
    options.setdefault("max_retries", 0)
    return LLMClient(
        base_url=server.base_url,
        api_key=None,
        model=ROOT,
        sub_model=SUB,
        cache_dir=None,
        max_concurrency=8,
        **options,
    )


def ask(
    server: ScriptedLLMServer,
    sandbox: SandboxResource,
    context_type: str,
    query: str = "What is there?",
    *,
    client: LLMClient | None = None,
    **kwargs: Any,
) -> RLMResult:
    return rlm_query(
        kwargs.pop("org_id", "saltmarsh"),
        query,
        context_type,
        llm=client or make_client(server),
        sandbox=sandbox.get_backend(),
        **kwargs,
    )


def opening_text(script: Script) -> str:
    """What the root LLM saw before it ran any code (system prompt and metadata)."""
    return "\n".join(str(m["content"]) for m in script.root_prompts[0])


# -- a full query per context type ----------------------------------------------------------


def test_memories_query_ends_with_final_var_and_logs_the_session(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path
) -> None:
    memories = read_rows(lake, "memories", scope_where("memories", "saltmarsh", "ruth"))
    last_text = memories.sort("created_at")["text"][-1]
    script = Script(
        repl("print(len(context))\nprint(context[0][:80])"),
        repl(
            "summary = f'{len(context)} memories, first: {context[0][:20]}'\nFINAL_VAR('summary')"
        ),
    )
    scripted_llm.responder = script
    result = ask(scripted_llm, sandbox, "memories", user_id="ruth")

    assert result.status == "completed", result
    assert result.answer.startswith(f"{memories.height} memories, first: [")
    assert result.iterations == 2
    assert result.warning is None and result.error is None
    assert result.context_items == memories.height
    assert result.prompt_tokens > 0 and result.completion_tokens > 0
    # The root LLM saw metadata and one sample, never the whole context.
    seen = opening_text(script)
    assert f"a list of {memories.height} items" in seen
    assert last_text not in seen
    # The REPL's print output came back to the root LLM.
    assert str(memories.height) in str(script.root_prompts[1][-2]["content"])
    # One session row in the lake, and a trajectory in the rlms logger format.
    rows = read_sessions(lake)
    assert rows.height == 1
    row = rows.row(0, named=True)
    assert row["session_id"] == result.session_id
    assert (row["status"], row["context_type"], row["user_id"]) == ("completed", "memories", "ruth")
    assert row["iterations"] == 2 and row["backend"] == "local" and row["runtime"] == "python"
    assert row["context_chars"] == result.context_chars > 0
    assert result.trajectory_path is not None
    lines = Path(result.trajectory_path).read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert entries[0]["type"] == "metadata"
    assert [e["iteration"] for e in entries[1:]] == [1, 2]
    assert entries[-1]["final_answer"] == result.answer


def test_documents_query_reads_enriched_text_with_batched_sub_calls(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path
) -> None:
    script = Script(
        repl(
            "answers = llm_query_batched([f'Hours? {c}' for c in context])\n"
            "print(len(answers), answers[0])"
        ),
        repl("FINAL(' | '.join(sorted(set(a.split(':')[0] for a in answers))))"),
        sub=lambda prompt: Fault(
            200, delay_s=0.3, content=f"{'enriched' if 'ferry office' in prompt else 'raw'}: ok"
        ),
    )
    scripted_llm.responder = script
    result = ask(scripted_llm, sandbox, "documents", knowledge_base_id="handbook")

    assert result.status == "completed", result
    assert result.answer == "enriched"
    assert result.total_sub_calls == 6 == len(script.sub_prompts)
    assert all("[doc" in p for p in script.sub_prompts)
    assert result.sub_model == SUB and result.root_model == ROOT
    models = {r.body["model"] for r in scripted_llm.chat_requests if r.body}
    assert models == {ROOT, SUB}
    # The sub-calls ran concurrently (the sandbox brokers them to the host in parallel).
    assert scripted_llm.max_in_flight >= 2
    # The trajectory records each sub-call of the iteration that made it.
    assert result.trajectory_path is not None
    lines = Path(result.trajectory_path).read_text().splitlines()
    first = json.loads(lines[1])
    calls = first["code_blocks"][0]["result"]["rlm_calls"]
    assert len(calls) == 6 and {c["root_model"] for c in calls} == {SUB}
    assert all(c["response"] == "enriched: ok" for c in calls)


def test_documents_of_a_kb_without_enrichment_use_the_ingested_documents(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path
) -> None:
    script = Script(repl("FINAL(str(sum('refund' in c.lower() for c in context)))"))
    scripted_llm.responder = script
    result = ask(scripted_llm, sandbox, "documents", knowledge_base_id="operations")
    assert result.status == "completed", result
    assert int(result.answer) >= 1


def test_conversation_query(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path
) -> None:
    script = Script(repl("FINAL(context[0].splitlines()[0])"))
    scripted_llm.responder = script
    result = ask(scripted_llm, sandbox, "conversation", user_id="ruth")
    assert result.status == "completed", result
    assert result.answer.startswith("Session ")
    assert result.context_items == 1


def test_custom_context_show_vars_and_text_final(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path
) -> None:
    script = Script(
        repl("total = len(context)\nprint(SHOW_VARS())"),
        "The text holds the answer.\nFINAL(the context has 12 characters)",
    )
    scripted_llm.responder = script
    result = ask(scripted_llm, sandbox, "custom", custom_context="hello world!")
    assert result.status == "completed", result
    assert result.answer == "the context has 12 characters"
    feedback = str(script.root_prompts[1][-2]["content"])
    assert "total" in feedback and "int" in feedback
    assert "a string of 12 characters" in opening_text(script)


def test_an_error_in_generated_code_is_shown_and_the_loop_goes_on(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path
) -> None:
    script = Script(
        repl("x = 1 / 0"),
        repl("FINAL_VAR('missing_name')"),
        repl("FINAL('recovered')"),
    )
    scripted_llm.responder = script
    result = ask(scripted_llm, sandbox, "custom", custom_context=["a"])
    assert result.status == "completed"
    assert result.answer == "recovered"
    assert "ZeroDivisionError" in str(script.root_prompts[1][-2]["content"])
    assert "missing_name" in str(script.root_prompts[2][-2]["content"])
    assert result.iterations == 3


# -- limits: the best answer so far, a warning, never an exception ---------------------------


def test_max_iterations_gives_a_partial_answer(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path
) -> None:
    script = Script(repl("print(1)"), repl("print(2)"), "My best guess: two items.")
    scripted_llm.responder = script
    result = ask(
        scripted_llm, sandbox, "custom", custom_context=["a", "b"], rlm_config={"maxIterations": 2}
    )
    assert result.status == "partial"
    assert result.answer == "My best guess: two items."
    assert "max_iterations (2)" in (result.warning or "")
    assert read_sessions(lake).row(0, named=True)["status"] == "partial"


def test_max_depth_2_answers_llm_query_with_a_child_rlm(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path
) -> None:
    parent = "a = llm_query('count: a b c d')\nFINAL('words=' + a)"
    child = "FINAL(str(len(context.split())))"  # runs in the child's own sandbox session
    script = Script(repl(parent), repl(child))
    scripted_llm.responder = script
    result = ask(scripted_llm, sandbox, "custom", custom_context="x", rlm_config={"max_depth": 2})
    assert result.status == "completed" and result.answer == "words=5"
    assert script.sub_prompts == []  # no plain sub-LLM call: the child RLM answered
    child_opening = "\n".join(str(m["content"]) for m in script.root_prompts[1])
    assert "a request that a program sent" in child_opening
    assert "count: a b c d" in child_opening  # the prompt is the child's context (a sample)
    assert result.total_sub_calls == 1 and result.iterations == 2
    # The parent's trajectory holds the child's, inside the sub-call it answered (as rlms does).
    assert result.trajectory_path is not None
    lines = Path(result.trajectory_path).read_text().splitlines()
    (call,) = json.loads(lines[1])["code_blocks"][0]["result"]["rlm_calls"]
    assert call["prompt"] == "count: a b c d" and call["response"] == "5"
    child_iterations = call["metadata"]["iterations"]
    assert [i["code_blocks"][0]["code"] for i in child_iterations] == [child]

    script = Script(repl(parent))
    scripted_llm.responder = script
    flat = ask(scripted_llm, sandbox, "custom", custom_context="x", rlm_config={"max_depth": 1})
    assert flat.answer == "words=sub[count: a b c d]" and len(script.sub_prompts) == 1


def test_an_llm_that_fails_mid_query_gives_a_partial_answer(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path
) -> None:
    scripted_llm.responder = Script(
        repl("n = len(context)\nprint(n)", prose="The context has one item."), Fault(500)
    )
    result = ask(scripted_llm, sandbox, "custom", custom_context=["x"])
    assert result.status == "partial" and result.answer == "The context has one item."
    assert "the LLM failed" in (result.warning or "")
    assert read_sessions(lake).row(0, named=True)["status"] == "partial"


def test_max_errors_gives_a_partial_answer(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path
) -> None:
    script = Script(
        repl("print('found: 42')", "It is probably 42."),
        repl("raise ValueError('bad 1')"),
        repl("raise ValueError('bad 2')"),
        repl("FINAL('never')"),
    )
    scripted_llm.responder = script
    result = ask(
        scripted_llm, sandbox, "custom", custom_context="x", rlm_config=RLMConfig(max_errors=2)
    )
    assert result.status == "partial"
    assert "consecutive errors" in (result.warning or "")
    assert result.iterations == 3
    assert "never" not in result.answer


def test_max_budget_gives_a_partial_answer_with_the_cost(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path
) -> None:
    script = Script(
        repl("print(len(context))", "Counting."),
        repl("print(llm_query('hi'))", "The count is 3."),
        repl("FINAL('never')"),
        cost=0.01,
    )
    scripted_llm.responder = script
    result = ask(
        scripted_llm,
        sandbox,
        "custom",
        custom_context=["a", "b", "c"],
        rlm_config={"max_budget": 0.025},
    )
    assert result.status == "partial"
    assert "Budget exceeded" in (result.warning or "")
    assert result.answer == "The count is 3."
    assert result.cost == pytest.approx(0.03)
    assert read_sessions(lake).row(0, named=True)["cost_usd"] == pytest.approx(0.03)


def test_max_timeout_bounds_a_hung_llm_call(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path
) -> None:
    script = Script(
        repl("print(1)", "First look."),
        Fault(200, delay_s=30, content=repl("FINAL('late')")),
    )
    scripted_llm.responder = script
    result = ask(
        scripted_llm, sandbox, "custom", custom_context="abc", rlm_config={"max_timeout": 3}
    )
    assert result.status == "timeout"
    assert "max_timeout" in (result.warning or "")
    assert result.answer == "First look."
    assert result.execution_time_s < 25  # not the 30 s the server would have taken


def test_max_timeout_bounds_a_hung_execution(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path
) -> None:
    script = Script(repl("import time\ntime.sleep(60)", "Waiting."), repl("FINAL('late')"))
    scripted_llm.responder = script
    result = ask(
        scripted_llm, sandbox, "custom", custom_context="abc", rlm_config={"max_timeout": 3}
    )
    assert result.status == "timeout"
    assert result.answer == "Waiting."
    assert result.execution_time_s < 30


# -- bad requests fail before any LLM call -----------------------------------------------------


@pytest.mark.parametrize(
    ("org", "context_type", "kwargs", "message"),
    [
        ("saltmarsh", "memories", {}, "needs user_id"),
        ("saltmarsh", "conversation", {}, "needs user_id"),
        ("saltmarsh", "documents", {}, "needs knowledge_base_id"),
        ("nowhere", "documents", {"knowledge_base_id": "operations"}, "unknown org 'nowhere'"),
        ("saltmarsh", "memories", {"user_id": "zed"}, "unknown user 'zed'"),
        ("saltmarsh", "documents", {"knowledge_base_id": "nokb"}, "unknown knowledge base 'nokb'"),
        ("saltmarsh", "custom", {}, "needs custom_context"),
        ("saltmarsh", "everything", {}, "context_type must be one of"),
        (
            "saltmarsh",
            "custom",
            {"custom_context": "x", "rlm_config": {"max_iterations": 0}},
            "rlm_config",
        ),
        ("../etc", "memories", {"user_id": "ruth"}, "invalid org_id"),
        (
            "saltmarsh",
            "custom",
            {"custom_context": "x" * 20_000_001},
            r"custom_context is 20,000,001 characters, over the limit of 20,000,000 "
            r"\(MEMCITY_MAX_CUSTOM_CONTEXT_CHARS\)",
        ),
        (
            "saltmarsh",
            "custom",
            {"custom_context": "x", "query": "?" * 100_001},
            "query is 100,001 characters, over the limit of 100,000",
        ),
        (
            "saltmarsh",
            "custom",
            {"custom_context": "x", "rlm_config": {"custom_system_prompt": "p" * 100_001}},
            "at most 100000 characters",
        ),
    ],
    ids=lambda value: value[:40] if isinstance(value, str) else None,
)
def test_bad_requests_fail_before_any_llm_call(
    scripted_llm: ScriptedLLMServer,
    sandbox: SandboxResource,
    lake: Path,
    org: str,
    context_type: str,
    kwargs: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(RLMRequestError, match=message):
        ask(scripted_llm, sandbox, context_type, org_id=org, **kwargs)
    assert scripted_llm.call_count == 0
    assert read_sessions(lake).is_empty()


def test_the_custom_context_limit_is_a_setting_of_the_api_and_the_launchpad(
    scripted_llm: ScriptedLLMServer,
    sandbox: SandboxResource,
    lake: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from memcity_pipeline.defs.rlm import rlm_query_job

    monkeypatch.setenv("MEMCITY_MAX_CUSTOM_CONTEXT_CHARS", "5")
    message = (
        "custom_context is 6 characters, over the limit of 5 (MEMCITY_MAX_CUSTOM_CONTEXT_CHARS)"
    )
    with pytest.raises(RLMRequestError) as caught:
        ask(scripted_llm, sandbox, "custom", custom_context=["abc", "def"])
    assert str(caught.value) == message
    scripted_llm.responder = Script(repl("FINAL('five')"))
    assert ask(scripted_llm, sandbox, "custom", custom_context=["ab", "cde"]).answer == "five"

    configured = build_resources(get_settings())
    llm = LLMResource(base_url=scripted_llm.base_url, model=ROOT, sub_model=SUB, use_cache=False)
    calls = scripted_llm.call_count
    run = rlm_query_job.execute_in_process(
        run_config={
            "ops": {
                "run_rlm_query": {"config": {"context_type": "custom", "custom_context": "abcdef"}}
            }
        },
        resources={**configured, "llm": llm, "sandbox": sandbox},
        raise_on_error=False,
    )
    assert not run.success
    [failure] = [e for e in run.all_events if e.event_type_value == "STEP_FAILURE"]
    assert message in str(failure.event_specific_data)
    assert scripted_llm.call_count == calls


# -- session rows in Postgres -----------------------------------------------------------------


@pytest.fixture
def pg_table() -> Iterator[str]:
    """A table name of this test alone in the test database, dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    try:
        psycopg.connect(POSTGRES_TEST_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"Postgres is not reachable at {POSTGRES_TEST_URL}: {exc}")
    table = f"rlm_sessions_test_{uuid.uuid4().hex[:10]}"
    yield table
    with psycopg.connect(POSTGRES_TEST_URL, autocommit=True) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{table}"')


def pg_rows(table: str) -> list[dict[str, Any]]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(POSTGRES_TEST_URL, row_factory=dict_row) as conn:
        return list(conn.execute(f'SELECT * FROM "{table}" ORDER BY started_at'))


@pytest.mark.postgres
def test_session_row_lands_in_postgres_with_its_indexes(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path, pg_table: str
) -> None:
    scripted_llm.responder = Script(repl("FINAL('pg')"))
    store = SessionStore(lake, POSTGRES_TEST_URL, table=pg_table)
    result = ask(scripted_llm, sandbox, "memories", user_id="ruth", session_store=store)
    assert result.logged_to_postgres
    rows = pg_rows(pg_table)
    assert len(rows) == 1
    row = rows[0]
    assert row["session_id"] == result.session_id
    assert (row["org_id"], row["user_id"], row["context_type"]) == ("saltmarsh", "ruth", "memories")
    assert (row["status"], row["iterations"], row["root_model"]) == ("completed", 1, ROOT)
    assert row["started_at"] <= row["ended_at"]
    import psycopg

    with psycopg.connect(POSTGRES_TEST_URL) as conn:
        indexes = {
            r[0]
            for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = %s", [pg_table]
            )
        }
    assert {f"{pg_table}_org_started_idx", f"{pg_table}_started_idx"} <= indexes


@pytest.mark.postgres
def test_postgres_down_keeps_the_row_in_the_lake_and_the_next_session_catches_up(
    scripted_llm: ScriptedLLMServer,
    sandbox: SandboxResource,
    lake: Path,
    pg_table: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scripted_llm.responder = Script(repl("FINAL('one')"), repl("FINAL('two')"))
    down = SessionStore(lake, CLOSED_PORT_URL, table=pg_table)
    with caplog.at_level(logging.ERROR):
        first = ask(scripted_llm, sandbox, "custom", custom_context="x", session_store=down)
    assert first.status == "completed" and not first.logged_to_postgres
    assert "not written to Postgres" in caplog.text
    up = SessionStore(lake, POSTGRES_TEST_URL, table=pg_table)
    second = ask(scripted_llm, sandbox, "custom", custom_context="y", session_store=up)
    assert second.logged_to_postgres
    ids = [r["session_id"] for r in pg_rows(pg_table)]
    assert sorted(ids) == sorted([first.session_id, second.session_id])  # first caught up
    assert up.sync_to_postgres() == 0  # an explicit catch-up finds nothing more
    assert read_sessions(lake).height == 2


@pytest.mark.postgres
def test_the_answer_comes_before_the_session_is_recorded(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path, pg_table: str
) -> None:
    scripted_llm.responder = Script(repl("FINAL('first')"))
    store = SessionStore(lake, POSTGRES_TEST_URL, table=pg_table)
    seen: list[tuple[str, int, bool]] = []

    def on_answer(result: RLMResult) -> None:
        seen.append((result.answer, read_sessions(lake).height, result.logged_to_postgres))

    result = ask(
        scripted_llm,
        sandbox,
        "custom",
        custom_context="x",
        session_store=store,
        on_answer=on_answer,
    )
    assert seen == [("first", 0, False)]  # the answer, and no row anywhere yet
    assert result.logged_to_postgres and read_sessions(lake).height == 1
    assert [r["session_id"] for r in pg_rows(pg_table)] == [result.session_id]


ADDED_COLUMNS = {"search_calls": 0, "sub_call_cache_hits": 0, "depth_reached": 1}
"""Session columns added since the first version of the table, and their values for a query
of one turn over a custom context."""


@pytest.mark.postgres
def test_session_tables_of_an_earlier_version_gain_the_new_columns(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path, pg_table: str
) -> None:
    import psycopg
    from deltalake import write_deltalake

    from memcity_pipeline.lake.tables import RLM_SESSIONS, table
    from memcity_pipeline.rlm.sessions import _PG_TYPES, COLUMNS

    old_schema = pa.schema([f for f in RLM_SESSIONS if f.name not in ADDED_COLUMNS])
    started = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    old_row = {
        **{name: None for name in old_schema.names},
        "session_id": "old-session",
        "org_id": "saltmarsh",
        "status": "completed",
        "started_at": started,
        "ended_at": started,
        "date": "2026-01-05",
    }
    write_deltalake(
        table("rlm_sessions").uri(lake),
        pa.Table.from_pylist([old_row], schema=old_schema),
        partition_by=["org_id", "date"],
    )
    old_columns = [
        f'"{f.name}" {_PG_TYPES[f.type]}'
        for f in old_schema
        if f.name in COLUMNS and f.name != "session_id"
    ]
    with psycopg.connect(POSTGRES_TEST_URL, autocommit=True) as conn:
        conn.execute(
            f'CREATE TABLE "{pg_table}" (session_id TEXT PRIMARY KEY, {", ".join(old_columns)})'
        )
        conn.execute(f'INSERT INTO "{pg_table}" (session_id) VALUES (%s)', ["old-session"])

    scripted_llm.responder = Script(repl("FINAL('new')"))
    store = SessionStore(lake, POSTGRES_TEST_URL, table=pg_table)
    result = ask(scripted_llm, sandbox, "custom", custom_context="x", session_store=store)
    assert result.status == "completed" and result.logged_to_postgres, result

    rows = {r["session_id"]: r for r in read_sessions(lake).to_dicts()}
    assert set(rows) == {"old-session", result.session_id}
    for column, value in ADDED_COLUMNS.items():
        assert rows["old-session"][column] is None
        assert rows[result.session_id][column] == value
    pg = {r["session_id"]: r for r in pg_rows(pg_table)}
    assert set(pg) == {"old-session", result.session_id}
    for column, value in ADDED_COLUMNS.items():
        assert pg["old-session"][column] is None
        assert pg[result.session_id][column] == value


# -- Dagster: the job and the report asset ----------------------------------------------------


def test_rlm_query_job_reports_an_rlm_sessions_materialization(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path
) -> None:
    from memcity_pipeline.defs.rlm import rlm_query_job, rlm_session_report

    scripted_llm.responder = Script(repl("FINAL('from dagster')"))
    llm = LLMResource(base_url=scripted_llm.base_url, model=ROOT, sub_model=SUB, use_cache=False)
    run_config = {
        "ops": {
            "run_rlm_query": {
                "config": {
                    "org_id": "saltmarsh",
                    "query": "Anything?",
                    "context_type": "memories",
                    "user_id": "ruth",
                    "knowledge_base_id": "",
                }
            }
        }
    }
    configured = build_resources(get_settings())
    resources = {
        "llm": llm,
        "sandbox": sandbox,
        "lake": configured["lake"],
        "sessions": configured["sessions"],
        "embeddings": configured["embeddings"],
    }
    instance = dg.DagsterInstance.ephemeral()
    result = rlm_query_job.execute_in_process(
        run_config=run_config, resources=resources, instance=instance
    )
    assert result.success
    events = result.asset_materializations_for_node("run_rlm_query")
    assert [e.asset_key for e in events] == [dg.AssetKey("rlm_sessions")]
    metadata = events[0].metadata
    assert metadata["status"].value == "completed"
    assert metadata["iterations"].value == 1
    assert metadata["table_version"].value == table_version(configured["lake"].lake, "rlm_sessions")
    assert result.output_for_node("run_rlm_query")["answer"] == "from dagster"
    trajectory = metadata["trajectory"].value
    assert "### Iteration 1" in trajectory and "FINAL('from dagster')" in trajectory
    assert "**FINAL**: from dagster" in trajectory
    logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any(m.startswith("iteration 1: 1 code block (1 line)") for m in logged), logged
    session_id = metadata["session_id"].value
    assert f"session {session_id} completed: from dagster" in logged  # before it was recorded

    report = dg.materialize([rlm_session_report], resources={"lake": configured["lake"]})
    assert report.success
    [mat] = report.asset_materializations_for_node("rlm_session_report")
    assert mat.metadata["sessions"].value == 1
    assert "memories" in mat.metadata["by_context_type"].value


# -- the real local model ---------------------------------------------------------------------


@pytest.mark.local_model
def test_a_query_with_the_real_local_model_ends_cleanly(
    local_llm_server: Any, sandbox: SandboxResource, lake: Path
) -> None:
    client = LLMClient(
        base_url=local_llm_server.base_url,
        api_key=None,
        model=local_llm_server.model_name,
        cache_dir=None,
        max_concurrency=1,
        timeout_s=120,
        max_retries=0,
    )
    result = rlm_query(
        "saltmarsh",
        "When does the winter timetable start?",
        "memories",
        user_id="ruth",
        llm=client,
        sandbox=sandbox.get_backend(),
        rlm_config={"max_iterations": 2, "max_timeout": 240, "max_tokens_per_call": 200},
    )
    assert result.status in {"completed", "partial", "timeout"}, result
    assert result.iterations >= 1
    assert read_sessions(lake).row(0, named=True)["session_id"] == result.session_id


# -- the CLI functions ------------------------------------------------------------------------


def test_query_and_sessions_commands(
    scripted_llm: ScriptedLLMServer,
    lake: Path,
    memcity_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rich.console import Console

    from memcity_pipeline.cli.rlm import query_command, sessions_command

    monkeypatch.setenv("MEMCITY_LLM_BASE_URL", scripted_llm.base_url)
    monkeypatch.setenv("MEMCITY_LLM_MODEL", ROOT)
    monkeypatch.setenv("MEMCITY_LLM_SUB_MODEL", SUB)
    custom = memcity_home / "notes.json"
    custom.write_text('["ferry at 9", "ferry at 10"]')
    scripted_llm.responder = Script(repl("FINAL(str(len(context)) + ' notes')"))
    out, err = Console(record=True, width=200), Console(record=True, width=200)
    code = query_command(
        "How many notes?",
        org="saltmarsh",
        context_type="custom",
        custom_file=custom,
        max_iterations=3,
        out=out,
        err=err,
    )
    figures = err.export_text()
    assert code == 0, figures
    assert "2 notes" in out.export_text()
    assert "completed" in figures and "1 iterations" in figures
    # the iteration was reported as it ended, on stderr
    assert re.search(
        r"^iteration 1: 1 code block \(1 line\), printed 0 chars, 0 sub-calls, [\d.]+ s, FINAL "
        r"· so far 0 sub-calls, [\d,]+ tokens, cost n/a$",
        figures,
        re.MULTILINE,
    ), figures

    calls = scripted_llm.call_count
    code = query_command("?", org="saltmarsh", context_type="memories", out=out, err=err)
    assert code == 2 and "needs user_id" in err.export_text()
    assert scripted_llm.call_count == calls

    listing = Console(record=True, width=200)
    assert sessions_command(org="saltmarsh", out=listing, err=err) == 0
    text = listing.export_text()
    assert "custom" in text and "completed" in text and "How many notes?" in text

    # one session's trajectory, as markdown and as JSON; an unknown or malformed id is refused
    session_id = read_sessions(lake).row(0, named=True)["session_id"]
    shown = Console(record=True, width=200)
    assert sessions_command(trajectory=session_id, out=shown, err=err) == 0
    markdown = shown.export_text()
    assert markdown.startswith("**1 iteration**") and "### Iteration 1" in markdown
    assert "FINAL(str(len(context)) + ' notes')" in markdown and "**FINAL**: 2 notes" in markdown
    as_json = Console(record=True, width=200)
    assert sessions_command(trajectory=session_id, as_json=True, out=as_json, err=err) == 0
    entries = json.loads(as_json.export_text())
    assert [e["type"] for e in entries] == ["metadata", "iteration"]
    assert sessions_command(trajectory="0" * 32, out=shown, err=err) == 2
    assert sessions_command(trajectory="../../etc/passwd", out=shown, err=err) == 2
    assert "is not a session id" in err.export_text()


def test_rlm_extract_validates_the_final_json_against_a_schema(
    scripted_llm: ScriptedLLMServer, sandbox: SandboxResource, lake: Path
) -> None:
    from memcity_pipeline.enrichment.structure import DocumentStructureOut
    from memcity_pipeline.rlm.query import rlm_extract

    document = "# Ferries\nThe winter timetable starts on 1 November.\n" * 50
    script = Script(
        repl(
            "import json\nparts = llm_query_batched([context[:500], context[500:1000]])\n"
            "result = {'summary': 'Winter ferries.', 'entities': [{'name': 'Saltmarsh'}],"
            " 'sections': [{'title': 'Ferries', 'starts_with': 'The winter timetable'}]}\n"
            "FINAL(json.dumps(result))"
        ),
        repl("FINAL('not json at all')"),
    )
    scripted_llm.responder = script
    parsed, result = rlm_extract(
        "saltmarsh",
        document,
        "Analyse the document.",
        DocumentStructureOut,
        llm=make_client(scripted_llm),
        sandbox=sandbox.get_backend(),
        lake_dir=lake,
    )
    assert isinstance(parsed, DocumentStructureOut), result
    assert parsed.summary == "Winter ferries." and parsed.entities[0].name == "Saltmarsh"
    assert result.total_sub_calls == 2
    assert '"summary"' in opening_text(script)  # the schema was in the query

    bad, result = rlm_extract(
        "saltmarsh",
        document,
        "Analyse the document.",
        DocumentStructureOut,
        llm=make_client(scripted_llm),
        sandbox=sandbox.get_backend(),
        lake_dir=lake,
    )
    assert bad is None and "does not match DocumentStructureOut" in (result.error or "")


def test_an_unreachable_llm_ends_the_session_as_failed_and_logs_it(
    sandbox: SandboxResource, lake: Path
) -> None:
    client = LLMClient(
        base_url="http://127.0.0.1:1/v1", api_key=None, model=ROOT, cache_dir=None, max_retries=0
    )
    result = rlm_query(
        "saltmarsh",
        "Anything?",
        "custom",
        custom_context="x",
        llm=client,
        sandbox=sandbox.get_backend(),
    )
    assert result.status == "failed"
    assert "LLMError" in (result.error or "")
    row = read_sessions(lake).row(0, named=True)
    assert row["status"] == "failed" and "LLMError" in row["error_message"]


def test_a_chunk_in_the_context_says_where_it_sits() -> None:
    from memcity_pipeline.rlm.context import _chunk_text

    row = {"document_id": "doc_1", "ordinal": 2, "text": "Run it.", "section_title": "Install"}
    assert (
        _chunk_text({**row, "header": "Guide › Install"}) == "[doc_1#2 | Guide › Install]\nRun it."
    )
    assert _chunk_text({**row, "header": None}) == "[doc_1#2 | Install]\nRun it."
