"""`search` in the sandbox: the generated code (Python or JavaScript) searches the query's own
knowledge base or memories through the host, past the context's cap, never into another org.

One lake for the module: org `acme` with a knowledge base of more chunks than the context cap
(the fact asked for sits in a chunk the cap leaves out) and a user's memories; org `rival` with
a knowledge base and a user of the same names, holding the same words and a secret. Indexes are
built by the real indexing assets with an OpenAI-compatible embeddings endpoint (the scripted
server's hashed vectors); queries go through `memcity_pipeline.api.rlm_query` with the settings
pointing at that lake, a real local sandbox and the scripted LLM.
"""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pyarrow as pa
import pytest
from rich.console import Console

from memcity_pipeline.cli.rlm import sessions_command
from memcity_pipeline.defs.indexing import bm25_index, chunk_embeddings, memory_index
from memcity_pipeline.lake.delta import write_rows
from memcity_pipeline.lake.tables import ENRICHED_CHUNKS, MEMORIES, RAW_DOCUMENTS, scope_where
from memcity_pipeline.resources.embeddings import EmbeddingsResource
from memcity_pipeline.resources.lake import LakeResource
from memcity_pipeline.resources.sandbox import LocalSandboxResource
from memcity_pipeline.rlm.config import RLMResult
from memcity_pipeline.rlm.context import MAX_CHUNKS
from memcity_pipeline.rlm.sessions import read_sessions
from memcity_pipeline.rlm.trajectory import iteration_line, read_trajectory, trajectory_markdown
from tests.fixtures_sandbox import BWRAP
from tests.rlm.test_rlm import Script, make_client, opening_text, repl
from tests.rlm.test_rlm_js import INTERPRETERS
from tests.scripted_llm_server import ScriptedLLMServer

ORG, RIVAL, KB, USER = "acme", "rival", "manual", "ruth"
DOCUMENTS = MAX_CHUNKS // 5 + 1  # five chunks each: one document more than the cap holds
VAULT = "The lighthouse vault code is 7741, written on the brass plate."
RIVAL_SECRET = "ZEBRA-9999"
SECRET_KEY = "sk-embeddings-key-must-stay-on-the-host-0123456789"
EMBEDDINGS = "openai:hashed"

pytestmark = [
    pytest.mark.skipif(not Path(BWRAP).exists(), reason="bubblewrap is not installed"),
    pytest.mark.bwrap,
]


def _chunk(org: str, document_id: str, ordinal: int, text: str, now: datetime) -> dict[str, Any]:
    return {
        "org_id": org,
        "knowledge_base_id": KB,
        "document_id": document_id,
        "chunk_id": f"{org}-{document_id}-{ordinal}",
        "ordinal": ordinal,
        "section_title": f"Part {ordinal}",
        "start": 0,
        "end": len(text),
        "text": text,
        "resolved_text": None,
        "key_terms": [],
        "summary": None,
        "entities": [],
        "enrichment_status": "off",
        "enrichment_error": None,
        "model": None,
        "context_key": "k",
        "llm_calls": 0.0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_usd": None,
        "enriched_at": now,
        "header": None,
    }


def _document(org: str, document_id: str, title: str, now: datetime) -> dict[str, Any]:
    return {
        "org_id": org,
        "knowledge_base_id": KB,
        "document_id": document_id,
        "source_path": f"orgs/{org}/knowledge_bases/{KB}/{document_id}.md",
        "format": "md",
        "title": title,
        "text": title,
        "char_count": len(title),
        "content_hash": document_id,
        "metadata": "{}",
        "ingested_at": now,
    }


def _memory(org: str, memory_id: str, text: str, at: datetime) -> dict[str, Any]:
    return {
        "org_id": org,
        "user_id": USER,
        "memory_id": memory_id,
        "text": text,
        "created_at": at,
        "metadata": "{}",
        "source_path": f"orgs/{org}/users/{USER}/memories.jsonl",
        "line": 1,
        "content_hash": memory_id,
        "ingested_at": at,
    }


def _write(lake: Path, table: str, schema: pa.Schema, org: str, scope: str, rows: list) -> None:
    frame = pl.from_arrow(pa.Table.from_pylist(rows, schema=schema))
    write_rows(lake, table, scope_where(table, org, scope), frame)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def embeddings_server() -> Iterator[ScriptedLLMServer]:
    """The embeddings endpoint of the indexes and of the host's searches."""
    with ScriptedLLMServer() as server:
        yield server


@pytest.fixture(scope="module")
def search_lake(
    tmp_path_factory: pytest.TempPathFactory, embeddings_server: ScriptedLLMServer
) -> Path:
    """Both orgs' data in a lake, indexed by the indexing assets."""
    lake = tmp_path_factory.mktemp("search") / "lake"
    now = datetime.now(UTC)
    chunks, documents = [], []
    for d in range(DOCUMENTS):
        document_id = f"doc_{d:04d}"
        documents.append(_document(ORG, document_id, f"Manual part {d}", now))
        for o in range(5):
            text = f"Routine {d}.{o}: check the pump, clean the filter and log the pressure."
            chunks.append(_chunk(ORG, document_id, o, text, now))
    chunks[-1] = _chunk(ORG, documents[-1]["document_id"], 4, VAULT, now)  # past the cap
    _write(lake, "enriched_chunks", ENRICHED_CHUNKS, ORG, KB, chunks)
    _write(lake, "raw_documents", RAW_DOCUMENTS, ORG, KB, documents)
    rival_text = f"The lighthouse vault code of the rival is {RIVAL_SECRET}."
    _write(
        lake,
        "enriched_chunks",
        ENRICHED_CHUNKS,
        RIVAL,
        KB,
        [_chunk(RIVAL, "doc_r", 0, rival_text, now)],
    )
    _write(lake, "raw_documents", RAW_DOCUMENTS, RIVAL, KB, [_document(RIVAL, "doc_r", "R", now)])
    day = timedelta(days=1)
    memories = [
        _memory(ORG, "m1", "Ruth takes her tea without sugar.", now - 3 * day),
        _memory(
            ORG, "m2", "Ruth keeps the spare lighthouse key under the blue pot.", now - 2 * day
        ),
        _memory(ORG, "m3", "Ruth walks the dog at seven.", now - day),
    ]
    _write(lake, "memories", MEMORIES, ORG, USER, memories)
    rival_memory = f"Rival Ruth keeps the lighthouse key in the {RIVAL_SECRET} safe."
    _write(lake, "memories", MEMORIES, RIVAL, USER, [_memory(RIVAL, "r1", rival_memory, now)])

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("knowledge_bases", [f"{ORG}/{KB}", f"{RIVAL}/{KB}"])
    instance.add_dynamic_partitions("users", [f"{ORG}/{USER}", f"{RIVAL}/{USER}"])
    resources = {
        "lake": LakeResource(lake_uri=str(lake), landing_dir=str(lake.parent / "landing")),
        "embeddings": EmbeddingsResource(
            setting=EMBEDDINGS, base_url=embeddings_server.base_url, api_key=SECRET_KEY
        ),
    }
    for org in (ORG, RIVAL):
        for assets, key in (
            ([chunk_embeddings, bm25_index], f"{org}/{KB}"),
            ([memory_index], f"{org}/{USER}"),
        ):
            done = dg.materialize(assets, partition_key=key, instance=instance, resources=resources)
            assert done.success
    return lake


@pytest.fixture
def settings_env(
    search_lake: Path, embeddings_server: ScriptedLLMServer, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The settings of a deployment on that lake: its embeddings, with a key."""
    monkeypatch.setenv("MEMCITY_LAKE_URI", str(search_lake))
    monkeypatch.setenv("MEMCITY_EMBEDDINGS", EMBEDDINGS)
    monkeypatch.setenv("MEMCITY_LLM_BASE_URL", embeddings_server.base_url)
    monkeypatch.setenv("MEMCITY_LLM_API_KEY", SECRET_KEY)
    return search_lake


def make_sandbox(memcity_home: Path, **options: Any) -> LocalSandboxResource:
    return LocalSandboxResource(
        sessions_root=str(memcity_home / "sandboxes"),
        isolation="bwrap",
        exec_timeout_s=30.0,
        cpu_seconds=60,
        memory_mb=1024,
        **options,
    )


@pytest.fixture
def sandbox(memcity_home: Path) -> Iterator[LocalSandboxResource]:
    resource = make_sandbox(memcity_home)
    yield resource
    resource.close()


def query(
    server: ScriptedLLMServer,
    sandbox: LocalSandboxResource,
    context_type: str,
    **kwargs: Any,
) -> RLMResult:
    from memcity_pipeline.api import rlm_query

    if context_type == "documents":
        kwargs.setdefault("knowledge_base_id", KB)
    if context_type == "memories":
        kwargs.setdefault("user_id", USER)
    return rlm_query(
        ORG,
        "What is the vault code?",
        context_type,
        llm=make_client(server),
        sandbox=sandbox.get_backend(),
        **kwargs,
    )


def session_row(lake: Path, session_id: str) -> dict[str, Any]:
    rows = read_sessions(lake).filter(pl.col("session_id") == session_id)
    assert rows.height == 1
    return rows.row(0, named=True)


def prompt_words(script: Script) -> str:
    """The opening messages with their line breaks as spaces (the prompt is wrapped)."""
    return " ".join(opening_text(script).split())


def everything_the_root_saw(script: Script) -> str:
    return "\n".join(str(m["content"]) for messages in script.root_prompts for m in messages)


# -- documents ----------------------------------------------------------------------------------


def test_search_in_python_finds_a_chunk_the_cap_left_out_and_only_its_own_orgs(
    scripted_llm: ScriptedLLMServer,
    sandbox: LocalSandboxResource,
    settings_env: Path,
    embeddings_server: ScriptedLLMServer,
) -> None:
    script = Script(
        repl(
            "import os\n"
            "print(len(context), any('7741' in c for c in context))\n"
            "hits = search('lighthouse vault code', k=5)\n"
            "print(sorted(hits[0]), hits[0]['title'], hits[0]['section'])\n"
            "print(hits[0]['text'])\n"
            "wide = search(f'rival {hits[0][\"text\"]}', k=50)\n"
            "print(len(wide), sorted({h['chunk_id'].split('-')[0] for h in wide}))\n"
            "print('key in sandbox:', any('sk-' in v for v in os.environ.values()))"
        ),
        repl("FINAL(hits[0]['text'])"),
    )
    scripted_llm.responder = script
    result = query(scripted_llm, sandbox, "documents")

    assert result.status == "completed", result
    assert result.answer == VAULT
    assert (result.context_items, result.context_total_items) == (MAX_CHUNKS, DOCUMENTS * 5)
    # The system prompt describes search, and the metadata says what the cap left out.
    opening = prompt_words(script)
    assert "`search(query, k=10) -> list[dict]`" in opening
    assert "{chunk_id, document_id, title, section, text, score}" in opening
    assert "a cap left 5 out" in opening
    assert f"`search(query)` searches all {DOCUMENTS * 5:,}" in opening
    # What the code printed came back to the root LLM: the cap had left the fact out, search
    # found it with its fields, and the widest search held acme's chunks only.
    seen = everything_the_root_saw(script)
    assert f"{MAX_CHUNKS} False" in seen
    assert (
        "['chunk_id', 'document_id', 'score', 'section', 'text', 'title'] "
        f"Manual part {DOCUMENTS - 1} Part 4"
    ) in seen
    assert "50 ['acme']" in seen
    assert RIVAL_SECRET not in seen
    assert "key in sandbox: False" in seen
    # The key was used, on the host: the embeddings endpoint received it.
    assert any(
        r.headers.get("authorization") == f"Bearer {SECRET_KEY}" for r in embeddings_server.requests
    )
    assert result.search_calls == 2
    row = session_row(settings_env, result.session_id)
    assert row["search_calls"] == 2 and row["status"] == "completed"


@pytest.mark.parametrize("name", ["bun", "node"])
def test_search_in_javascript_is_awaited_and_scoped_the_same(
    name: str, scripted_llm: ScriptedLLMServer, settings_env: Path, memcity_home: Path
) -> None:
    interpreter = INTERPRETERS[name]
    if interpreter is None:
        pytest.skip(f"no {name} here")
    script = Script(
        repl(
            "const hits = await search('lighthouse vault code', 3)\n"
            "const wide = await search('rival lighthouse vault code', 50)\n"
            "console.log(hits.length, Object.keys(hits[0]).sort().join(','))\n"
            "console.log(wide.every(h => h.chunk_id.startsWith('acme-')), "
            "wide.some(h => h.text.includes('ZEBRA')))\n"
            "let refused = ''\n"
            "try { await search(42) } catch (e) { refused = e.message }\n"
            "console.log(refused)"
        ),
        repl("FINAL(hits[0].text)"),
    )
    scripted_llm.responder = script
    sandbox = make_sandbox(memcity_home, bun=interpreter)
    try:
        result = query(scripted_llm, sandbox, "documents", rlm_config={"runtime": "bun"})
    finally:
        sandbox.close()
    assert result.status == "completed", result
    assert result.runtime_used == "bun" and result.answer == VAULT
    assert "`await search(query, k = 10)` -> array of objects" in prompt_words(script)
    feedback = everything_the_root_saw(script)
    assert "3 chunk_id,document_id,score,section,text,title" in feedback
    assert "true false" in feedback
    assert "search failed: query must be a string, not a number" in feedback
    assert result.search_calls == 2
    assert session_row(settings_env, result.session_id)["search_calls"] == 2
    # the trajectory shows the JavaScript and its searches, the refused one included
    shown = Console(record=True, width=200)
    assert sessions_command(trajectory=result.session_id, out=shown, err=shown) == 0
    text = shown.export_text()
    assert "```javascript\nconst hits = await search('lighthouse vault code', 3)" in text
    assert "- search `lighthouse vault code`, k=3 → 3 hits" in text
    assert "- search (no text query), k=10 → error: query must be a string, not a number" in text


def test_bad_search_arguments_are_errors_in_the_code_and_the_query_goes_on(
    scripted_llm: ScriptedLLMServer, sandbox: LocalSandboxResource, settings_env: Path
) -> None:
    script = Script(
        repl(
            "errors = []\n"
            "for args in [(123,), ('   ',), ('x' * 2001,), ('vault', 0), ('vault', 51),\n"
            "             ('vault', 2.5), ('vault', True), (['vault'],), (object(),),\n"
            "             ('vault', {1, 2})]:\n"
            "    try:\n"
            "        search(*args)\n"
            "    except RuntimeError as exc:\n"
            "        errors.append(str(exc))\n"
            "print('\\n'.join(errors))\n"
            "print('hits:', len(search('vault', k=2)))"
        ),
        repl("FINAL('done')"),
    )
    scripted_llm.responder = script
    result = query(scripted_llm, sandbox, "documents")
    assert result.status == "completed" and result.answer == "done", result
    printed = str(script.root_prompts[1][-2]["content"])
    for message in (
        "search failed: query must be a string, not a number",
        "search failed: query is empty",
        "search failed: query has 2,001 characters; at most 2,000",
        "search failed: k must be from 1 to 50, not 0",
        "search failed: k must be from 1 to 50, not 51",
        "search failed: k must be an integer, not a number",
        "search failed: k must be an integer, not a boolean",
        "search failed: query must be a string, not a list",
        "search failed: query must be a string, not object",  # refused in the sandbox
        "search failed: k must be an integer, not set",
    ):
        assert message in printed
    assert "hits: 2" in printed
    assert result.search_calls == 1  # the refused calls searched nothing


def test_each_iteration_is_reported_as_it_ends_and_the_trajectory_shows_its_calls(
    scripted_llm: ScriptedLLMServer, sandbox: LocalSandboxResource, settings_env: Path
) -> None:
    script = Script(
        repl(
            "print('x' * 5000)\n"
            "hits = search('lighthouse vault code', k=5)\n"
            "try:\n"
            "    search('vault', k=0)\n"
            "except RuntimeError:\n"
            "    pass\n"
            "notes = llm_query_batched(['note one', 'note two'])"
        ),
        repl("FINAL(hits[0]['text'])", prose="I have it."),
    )
    scripted_llm.responder = script
    events: list[tuple[str, dict[str, Any]]] = []
    result = query(
        scripted_llm, sandbox, "documents", progress=lambda e, d: events.append((e, dict(d)))
    )
    assert result.status == "completed" and result.answer == VAULT, result

    assert [e for e, _ in events] == [
        "sandbox_opening",
        "context_loaded",
        "iteration_start",
        "iteration_done",
        "iteration_start",
        "iteration_done",
    ]
    first, second = (d for e, d in events if e == "iteration_done")
    assert first["iteration"] == 1 and first["code_blocks"] == 1 and first["code_lines"] == 7
    assert first["output_chars"] >= 5000
    assert (first["sub_calls"], first["search_calls"], first["final"]) == (2, 1, False)
    assert (second["sub_calls"], second["search_calls"], second["final"]) == (0, 0, True)
    assert second["total_sub_calls"] == 2 and second["tokens"] > 0
    assert iteration_line(first).startswith(
        "iteration 1: 1 code block (7 lines), printed 5,001 chars, 2 sub-calls, 1 search, "
    )

    trajectory = read_trajectory(settings_env, result.session_id)
    assert trajectory is not None and trajectory.skipped_lines == 0
    text = trajectory_markdown(trajectory)
    assert text.startswith("**2 iterations**")
    assert "print('x' * 5000)" in text and "more characters)" in text
    assert "Sub-calls (2):" in text and "`note one` → `sub[note one]`" in text
    assert "Searches (2):" in text
    assert "- search `lighthouse vault code`, k=5 → 5 hits" in text
    assert "- search `vault`, k=0 → error: k must be from 1 to 50, not 0" in text
    assert "> I have it." in text and f"**FINAL**: {VAULT}" in text


# -- memories and other contexts ----------------------------------------------------------------


def test_search_over_memories_returns_the_users_own_memories(
    scripted_llm: ScriptedLLMServer, sandbox: LocalSandboxResource, settings_env: Path
) -> None:
    script = Script(
        repl(
            "hits = search('where is the lighthouse key', k=10)\n"
            "print(sorted(hits[0]), sorted(h['memory_id'] for h in hits))\n"
            "from datetime import datetime\n"
            "print(datetime.fromisoformat(hits[0]['created_at']).tzinfo is not None)"
        ),
        repl("FINAL(hits[0]['text'])"),
    )
    scripted_llm.responder = script
    result = query(scripted_llm, sandbox, "memories")
    assert result.status == "completed", result
    assert result.answer == "Ruth keeps the spare lighthouse key under the blue pot."
    assert "over ALL the user's memories" in prompt_words(script)
    assert "{memory_id, text, created_at, score}" in prompt_words(script)
    seen = everything_the_root_saw(script)
    assert "['created_at', 'memory_id', 'score', 'text'] ['m1', 'm2', 'm3']" in seen
    assert "True" in seen and RIVAL_SECRET not in seen
    assert result.search_calls == 1


def test_a_custom_context_has_no_search(
    scripted_llm: ScriptedLLMServer, sandbox: LocalSandboxResource, settings_env: Path
) -> None:
    script = Script(
        repl("try:\n    search('vault')\nexcept RuntimeError as exc:\n    print(exc)"),
        repl("FINAL('no search')"),
    )
    scripted_llm.responder = script
    result = query(scripted_llm, sandbox, "custom", custom_context=["a note"])
    assert result.answer == "no search", result
    assert "search(" not in opening_text(script)
    assert "search failed: there is nothing to search for this query" in everything_the_root_saw(
        script
    )
    assert result.search_calls == 0
