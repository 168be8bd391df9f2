"""The three enrichment phases as Dagster assets, against a scripted LLM and the real SmolLM2."""

import json
import re
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest

from memcity_pipeline.cli.runner import sample_corpus_dir
from memcity_pipeline.defs.enrichment import chunks, document_structure, enriched_chunks
from memcity_pipeline.defs.ingestion import raw_documents
from memcity_pipeline.lake.delta import read_rows, table_version
from memcity_pipeline.resources.enrichment import EnrichmentResource
from memcity_pipeline.resources.llm import LLMResource
from memcity_pipeline.settings import build_resources, get_settings
from tests.fixtures_sandbox import isolation_for_tests
from tests.partitioned import materialize_partitions
from tests.scripted_llm_server import ScriptedLLMServer

KB = "orgs/acme/knowledge_bases/handbook"
PARTITION = "acme/handbook"  # the knowledge base's partition key
# The checks are check specs of these assets: their results come with the materializations.
ASSETS = [raw_documents, document_structure, chunks, enriched_chunks]

DOC_A = """# Acme Widget

The Acme Widget is a small hive sensor. It weighs 40 grams and it ships in spring.

## Warranty

It is covered for three years. The company repairs it for free.

## Support

Support is run by Dana Reyes. She answers within two days.
"""

DOC_B = """# Returns

Customers may return a Widget within 30 days. They must keep the receipt.
POISON marks a paragraph that the scripted model refuses to enrich properly.
"""


def _user_text(request: dict[str, Any]) -> str:
    return next(m["content"] for m in request["messages"] if m["role"] == "user")


def smart_responder(request: dict[str, Any]) -> str:
    """Answers structure and enrichment prompts with plausible JSON derived from the text."""
    system = request["messages"][0]["content"]
    text = _user_text(request)
    if system.startswith("You analyse one document"):
        headings = re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)
        return json.dumps(
            {
                "summary": "A document about the Acme Widget. " + text[:80].replace("\n", " "),
                "entities": [
                    {
                        "name": "Acme Widget",
                        "type": "product",
                        "aliases": ["Widget"],
                        "description": "a hive sensor",
                    },
                    {
                        "name": "Dana Reyes",
                        "type": "person",
                        "aliases": [],
                        "description": "runs support",
                    },
                ],
                "relationships": [
                    {"source": "Dana Reyes", "relation": "runs", "target": "Support"}
                ],
                "sections": [{"title": h, "starts_with": h} for h in headings],
            }
        )
    if system.startswith("You combine partial summaries"):
        return json.dumps({"summary": "Combined summary of all parts."})
    if system.startswith("You prepare chunks"):
        blocks = re.findall(
            r"\[chunk (\d+)\]\n(.*?)(?=\n\n\[chunk \d+\]\n|\Z)", text, flags=re.DOTALL
        )
        out = []
        for index, body in blocks:
            if "POISON" in body:
                out.append(
                    {
                        "index": int(index),
                        "references": [],
                        "key_terms": [],
                        "summary": "",
                        "entities": [],
                    }
                )
                continue
            out.append(
                {
                    "index": int(index),
                    "references": [
                        {"phrase": "It", "refers_to": "Acme Widget"},
                        {"phrase": "She", "refers_to": "Dana Reyes"},
                        {"phrase": "nowhere to be found", "refers_to": "ignored"},
                    ],
                    "key_terms": body.split()[:3],
                    "summary": body.strip().split(".")[0] + ".",
                    "entities": ["Acme Widget"],
                }
            )
        return json.dumps({"chunks": out})
    return "{}"


def _write(landing: Path, rel: str, text: str) -> None:
    path = landing / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _resources(
    server: ScriptedLLMServer, mode: str = "llm", long_documents: str = "rlm", **llm: Any
) -> dict[str, Any]:
    configured = build_resources(get_settings())
    return {
        **configured,
        "sandbox": configured["sandbox"].with_options(isolation=isolation_for_tests()),
        "llm": LLMResource(
            base_url=server.base_url,
            model="scripted-model",
            cache_dir=configured["llm"].cache_dir,
            **llm,
        ),
        "enrichment": EnrichmentResource(
            mode=mode, chunk_tokens=64, chunk_overlap_tokens=8, long_documents=long_documents
        ),
    }


def _table(name: str) -> pl.DataFrame:
    return read_rows(get_settings().lake, name)


def _materialize(
    resources: dict[str, Any], partition: str = PARTITION
) -> dg.ExecuteInProcessResult:
    """The enrichment assets materialized for the landing folder's one knowledge base."""
    results = materialize_partitions(ASSETS, resources, get_settings().landing_dir)
    assert list(results) == [partition]
    return results[partition]


def _meta(result: dg.ExecuteInProcessResult, key: str) -> dict[str, Any]:
    for event in result.get_asset_materialization_events():
        if event.asset_key.to_user_string() == key:
            return {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}
    raise KeyError(key)


def test_three_phases_enrich_and_a_rerun_makes_no_llm_call(scripted_llm: ScriptedLLMServer) -> None:
    scripted_llm.responder = smart_responder
    landing = get_settings().landing_dir
    _write(landing, f"{KB}/widget.md", DOC_A)
    result = _materialize(_resources(scripted_llm))
    assert result.success

    structure = _table("document_structure").row(0, named=True)
    assert structure["status"] == "ok" and structure["method"] == "llm"
    assert [s["title"] for s in structure["sections"]] == ["Acme Widget", "Warranty", "Support"]
    starts = [s["start"] for s in structure["sections"]]
    assert starts == sorted(starts) and DOC_A[starts[1] :].startswith("## Warranty")
    assert {e["name"] for e in structure["entities"]} == {"Acme Widget", "Dana Reyes"}

    ch = _table("chunks")
    assert ch.height >= 3 and ch["token_count"].max() <= 64
    assert set(ch["section_title"].to_list()) == {"Acme Widget", "Warranty", "Support"}
    enriched = _table("enriched_chunks")
    assert set(enriched["enrichment_status"].to_list()) == {"enriched"}
    warranty = enriched.filter(pl.col("section_title") == "Warranty").row(0, named=True)
    assert "It (Acme Widget) is covered" in warranty["resolved_text"]
    support = enriched.filter(pl.col("section_title") == "Support").row(0, named=True)
    assert "She (Dana Reyes) answers" in support["resolved_text"]
    assert warranty["text"].startswith("## Warranty")  # the original is kept beside it
    meta = _meta(result, "enriched_chunks")
    assert meta["llm_calls"] >= 1 and meta["prompt_tokens"] > 0
    assert "resolved_text" in meta["preview"]

    calls_before = scripted_llm.call_count
    again = _materialize(_resources(scripted_llm))
    assert again.success and scripted_llm.call_count == calls_before
    assert _meta(again, "document_structure")["processed"] == 0
    assert _meta(again, "enriched_chunks")["chunks_processed"] == 0
    for table in ("document_structure", "chunks", "enriched_chunks"):  # versions, unchanged
        assert _meta(again, table)["table_version"] == _meta(result, table)["table_version"]

    # With the lake's enrichment tables gone, the persistent response cache still answers.
    for table in ("document_structure", "enriched_chunks"):
        shutil.rmtree(get_settings().lake_dir / table)
    third = _materialize(_resources(scripted_llm))
    assert third.success and scripted_llm.call_count == calls_before
    assert _meta(third, "enriched_chunks")["cache_hits"] >= 1


def test_a_failed_chunk_keeps_its_text_and_only_it_is_retried(
    scripted_llm: ScriptedLLMServer,
) -> None:
    scripted_llm.responder = smart_responder
    landing = get_settings().landing_dir
    _write(landing, f"{KB}/widget.md", DOC_A)
    _write(landing, f"{KB}/returns.md", DOC_B)
    result = _materialize(_resources(scripted_llm))
    assert result.success
    enriched = _table("enriched_chunks")
    failed = enriched.filter(pl.col("enrichment_status") == "failed")
    assert failed.height == 1
    row = failed.row(0, named=True)
    assert "POISON" in row["text"] and row["resolved_text"] is None
    assert "empty summary" in row["enrichment_error"]
    assert enriched.filter(pl.col("enrichment_status") == "enriched").height == enriched.height - 1
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["chunks_enriched_or_explained"] is True

    scripted_llm.reset()
    scripted_llm.responder = smart_responder
    again = _materialize(_resources(scripted_llm, use_cache=False))
    assert again.success
    prompts = [_user_text(r.body) for r in scripted_llm.chat_requests]
    assert prompts and all("POISON" in p for p in prompts)  # only the failed chunk went again
    assert _meta(again, "enriched_chunks")["chunks_processed"] == 1


def test_retries_of_a_rejected_answer_ask_the_model_and_stop_after_their_attempts(
    scripted_llm: ScriptedLLMServer,
) -> None:
    """The POISON chunk's answer is always rejected and DOC_B's structure never parses. Each
    retry asks the model again (the cache kept neither answer), until each row has had its 3
    attempts; then a run asks nothing and commits nothing, until the text changes."""

    def responder(request: dict[str, Any]) -> str:
        if "Customers may return" in _user_text(request) and "You analyse one" in str(request):
            return "this is not JSON at all"
        answer = smart_responder(request)
        if "POISON" not in _user_text(request) or "You prepare chunks" not in str(request):
            return answer
        # Valid for the schema, rejected by the pipeline: the summary is the chunk itself.
        chunks = json.loads(answer)["chunks"]
        bodies = re.findall(
            r"\[chunk \d+\]\n(.*?)(?=\n\n\[chunk \d+\]\n|\Z)", _user_text(request), re.S
        )
        for chunk, body in zip(chunks, bodies, strict=True):
            if "POISON" in body:
                chunk["summary"] = body.strip()
        return json.dumps({"chunks": chunks})

    scripted_llm.responder = responder
    landing = get_settings().landing_dir
    _write(landing, f"{KB}/widget.md", DOC_A)
    _write(landing, f"{KB}/returns.md", DOC_B)

    def poison_prompts() -> int:  # enrichment requests (not structure) that carry the chunk
        return sum(
            "POISON" in _user_text(r.body)
            and r.body["messages"][0]["content"].startswith("You prepare chunks")
            for r in scripted_llm.chat_requests
        )

    for attempt in (1, 2, 3):
        scripted_llm.reset()
        scripted_llm.responder = responder
        _materialize(_resources(scripted_llm))
        assert poison_prompts() >= 1, f"run {attempt} did not ask the model again"
        failed = _table("enriched_chunks").filter(pl.col("enrichment_status") == "failed")
        assert failed["attempts"].to_list() == [attempt] * failed.height
        structure = _table("document_structure").filter(pl.col("status") == "failed")
        assert structure["attempts"].to_list() == [attempt]
    versions = {
        t: table_version(get_settings().lake, t) for t in ("document_structure", "enriched_chunks")
    }

    scripted_llm.reset()
    scripted_llm.responder = responder
    quiet = _materialize(_resources(scripted_llm))
    assert scripted_llm.call_count == 0  # given up: no call, no commit, the reasons kept
    assert {t: table_version(get_settings().lake, t) for t in versions} == versions
    assert _meta(quiet, "enriched_chunks")["chunks_processed"] == 0
    row = (
        _table("enriched_chunks").filter(pl.col("enrichment_status") == "failed").row(0, named=True)
    )
    assert "summary is the chunk itself" in row["enrichment_error"]

    # A new text is a new input: it gets its attempts again.
    _write(landing, f"{KB}/returns.md", DOC_B.replace("POISON marks", "POISON now marks"))
    _materialize(_resources(scripted_llm))
    assert poison_prompts() >= 1
    failed = _table("enriched_chunks").filter(pl.col("enrichment_status") == "failed")
    assert failed["attempts"].to_list() == [1]


def test_enrichment_off_calls_no_llm_and_chunks_by_headings(
    scripted_llm: ScriptedLLMServer,
) -> None:
    landing = get_settings().landing_dir
    _write(landing, f"{KB}/widget.md", DOC_A)
    result = _materialize(_resources(scripted_llm, mode="off"))
    assert result.success and scripted_llm.call_count == 0
    assert _meta(result, "document_structure")["summary"] == (
        "1 document: 1 structured by headings (enrichment off), 0 unchanged"
    )
    structure = _table("document_structure").row(0, named=True)
    assert structure["method"] == "headings" and structure["summary"] == ""
    assert [s["title"] for s in structure["sections"]] == ["Acme Widget", "Warranty", "Support"]
    assert set(_table("enriched_chunks")["enrichment_status"].to_list()) == {"off"}


LONG_DOC = "# Long\n\n" + "\n\n".join(
    f"## Part {i}\n\n" + " ".join(f"The Widget sentence {i}.{j} is here." for j in range(60))
    for i in range(8)
)

# The root LLM's program for a long document: split at headings, one batched sub-call per part,
# merge in code, FINAL of the JSON (what a capable model writes for `long_document_task`).
RLM_STRUCTURE_PROGRAM = """```repl
import json, re
starts = [m.start() for m in re.finditer(r"^#+ ", context, flags=re.M)]
parts = [context[a:b] for a, b in zip(starts, starts[1:] + [len(context)])]
answers = llm_query_batched(["Summarise this part as JSON:\\n" + p for p in parts])
sections = []
for p in parts:
    title = p.splitlines()[0].lstrip("# ").strip()
    first = p.splitlines()[0]
    if first in context:
        sections.append({"title": title, "starts_with": first})
result = {
    "summary": " ".join(json.loads(a)["summary"] for a in answers[:2]),
    "entities": [{"name": "Acme Widget", "type": "product", "aliases": ["Widget"]}],
    "relationships": [],
    "sections": sections,
}
print(len(parts), "parts")
FINAL(json.dumps(result))
```"""


def rlm_structure_responder(program: str) -> Any:
    """Answers RLM root turns with `program`, sub-calls with a part summary, else smart_responder."""

    def respond(request: dict[str, Any]) -> str:
        system = request["messages"][0]["content"]
        if system.startswith("You answer a query about a large context"):
            return program
        if _user_text(request).startswith("Summarise this part"):
            part = _user_text(request).split("\n", 2)[1]
            return json.dumps({"summary": f"About {part.lstrip('# ')}."})
        return smart_responder(request)

    return respond


def _sessions() -> pl.DataFrame:
    return read_rows(get_settings().lake, "rlm_sessions")


def test_a_long_document_is_read_whole_by_the_rlm_engine(scripted_llm: ScriptedLLMServer) -> None:
    scripted_llm.responder = rlm_structure_responder(RLM_STRUCTURE_PROGRAM)
    _write(get_settings().landing_dir, f"{KB}/long.md", LONG_DOC)
    result = _materialize(_resources(scripted_llm, context_window=1200))
    assert result.success
    structure = _table("document_structure").row(0, named=True)
    assert structure["status"] == "ok" and structure["method"] == "llm-rlm"
    titles = [s["title"] for s in structure["sections"]]
    assert titles == ["Long", *[f"Part {i}" for i in range(8)]]
    starts = [s["start"] for s in structure["sections"]]
    assert all(LONG_DOC[x:].startswith(("# Long", "## Part")) for x in starts)
    assert structure["summary"] == "About Long. About Part 0."  # from the sandbox's sub-calls
    # 1 root turn + 9 sub-calls, none of them a windowed phase-1 call
    assert structure["llm_calls"] == 10
    systems = [r.body["messages"][0]["content"] for r in scripted_llm.chat_requests]
    assert not any(x.startswith("You analyse one document") for x in systems)
    session = _sessions().row(0, named=True)
    assert session["status"] == "completed" and session["context_type"] == "custom"
    assert session["org_id"] == "acme" and session["context_chars"] == len(LONG_DOC)
    assert session["sub_calls"] == 9
    assert set(_table("chunks")["section_title"].to_list()) >= {f"Part {i}" for i in range(8)}


def test_a_long_document_falls_back_to_windows_when_the_rlm_answer_is_invalid(
    scripted_llm: ScriptedLLMServer,
) -> None:
    scripted_llm.responder = rlm_structure_responder("```repl\nFINAL('no structure here')\n```")
    _write(get_settings().landing_dir, f"{KB}/long.md", LONG_DOC)
    result = _materialize(_resources(scripted_llm, context_window=1200))
    assert result.success
    structure = _table("document_structure").row(0, named=True)
    assert structure["status"] == "ok" and structure["method"] == "llm-windowed"
    assert structure["summary"] == "Combined summary of all parts."
    assert _sessions().row(0, named=True)["status"] == "completed"  # recorded, answer rejected
    # the windows' calls come on top of the session's root turn
    assert structure["llm_calls"] > 2 + 1


def test_a_long_document_is_read_in_windows_and_merged(scripted_llm: ScriptedLLMServer) -> None:
    scripted_llm.responder = smart_responder
    _write(get_settings().landing_dir, f"{KB}/long.md", LONG_DOC)
    result = _materialize(_resources(scripted_llm, long_documents="windowed", context_window=1200))
    assert result.success and _sessions().height == 0
    structure = _table("document_structure").row(0, named=True)
    assert structure["method"] == "llm-windowed" and structure["llm_calls"] > 2
    assert structure["summary"] == "Combined summary of all parts."
    names = [e["name"] for e in structure["entities"]]
    assert names.count("Acme Widget") == 1 and len(names) == 2  # de-duplicated across windows
    titles = [s["title"] for s in structure["sections"]]
    assert [f"Part {i}" for i in range(8)] == [t for t in titles if t and t.startswith("Part")]


def test_unusable_structure_answers_fall_back_to_headings_and_are_retried(
    scripted_llm: ScriptedLLMServer,
) -> None:
    scripted_llm.responder = lambda request: "this is not JSON at all"
    landing = get_settings().landing_dir
    _write(landing, f"{KB}/widget.md", DOC_A)
    result = _materialize(_resources(scripted_llm))
    assert result.success
    structure = _table("document_structure").row(0, named=True)
    assert structure["status"] == "failed" and "StructuredOutputError" in structure["error"]
    assert [s["title"] for s in structure["sections"]] == ["Acme Widget", "Warranty", "Support"]
    assert set(_table("enriched_chunks")["enrichment_status"].to_list()) == {"failed"}

    scripted_llm.responder = smart_responder
    again = _materialize(_resources(scripted_llm))
    assert again.success
    assert _table("document_structure").row(0, named=True)["status"] == "ok"
    assert set(_table("enriched_chunks")["enrichment_status"].to_list()) == {"enriched"}


def test_the_phase_1_summary_partitions_the_documents(scripted_llm: ScriptedLLMServer) -> None:
    def responder(request: dict[str, Any]) -> str:
        if "Customers may return" in _user_text(request):  # DOC_B's structure: unusable
            return "this is not JSON at all"
        return smart_responder(request)

    scripted_llm.responder = responder
    landing = get_settings().landing_dir
    _write(landing, f"{KB}/widget.md", DOC_A)
    _write(landing, f"{KB}/returns.md", DOC_B)
    meta = _meta(_materialize(_resources(scripted_llm)), "document_structure")
    assert meta["summary"] == (
        "2 documents: 1 structured by the LLM, 1 by the headings fallback (the LLM's answer "
        "was unusable: see fallback_reasons), 0 unchanged"
    )
    assert (meta["structured_by_llm"], meta["failed"], meta["unchanged"]) == (1, 1, 0)
    assert "StructuredOutputError" in meta["fallback_reasons"]

    again = _meta(_materialize(_resources(scripted_llm, use_cache=False)), "document_structure")
    assert again["summary"].startswith("2 documents: 0 structured by the LLM, 1 by the headings")
    assert again["summary"].endswith(", 1 unchanged")  # the good one kept, the failed retried


@pytest.mark.local_model
def test_phases_one_to_three_with_the_real_local_model(local_llm_server: Any) -> None:
    settings = get_settings()
    kb_src = next((sample_corpus_dir() / "orgs").glob("*/knowledge_bases/*"))
    docs = sorted(p for p in kb_src.rglob("*.md"))[:2]
    for doc in docs:
        _write(
            settings.landing_dir, f"orgs/acme/knowledge_bases/kb/{doc.name}", doc.read_text("utf-8")
        )
    configured = build_resources(settings)
    resources = {
        **configured,
        "llm": LLMResource(
            base_url=local_llm_server.base_url,
            model=local_llm_server.model_name,
            context_window=4096,
            cache_dir=configured["llm"].cache_dir,
        ),
        "enrichment": EnrichmentResource(
            mode="llm", chunk_tokens=256, chunk_overlap_tokens=32, chunks_per_call=2
        ),
    }
    result = _materialize(resources, partition="acme/kb")
    assert result.success
    structure = _table("document_structure")
    assert structure.height == 2
    assert set(structure["status"].to_list()) <= {"ok", "failed"}
    enriched = _table("enriched_chunks")
    assert enriched.height >= 2
    assert set(enriched["enrichment_status"].to_list()) <= {"enriched", "failed"}
    assert (
        enriched.filter(
            (pl.col("enrichment_status") == "failed") & pl.col("enrichment_error").is_null()
        ).height
        == 0
    )
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert all(checks.values()), checks


def test_references_are_annotated_on_whole_words_only() -> None:
    from memcity_pipeline.enrichment.enrich import ReferenceOut, resolve_references

    text = "It ships today. The item is new; the company says it works. It is light."
    resolved, applied = resolve_references(
        text,
        [
            ReferenceOut(phrase="It", refers_to="HiveScale S2"),
            ReferenceOut(phrase="the company", refers_to="Brambleway"),
            ReferenceOut(phrase="company", refers_to="Wrong Co"),
            ReferenceOut(phrase="absent phrase", refers_to="X"),
            ReferenceOut(phrase="HiveScale", refers_to="HiveScale"),
        ],
    )
    assert applied == 3
    assert resolved == (
        "It (HiveScale S2) ships today. The item is new; the company (Brambleway) says it works."
        " It (HiveScale S2) is light."
    )


def test_answers_numbered_otherwise_are_matched_by_position() -> None:
    """A small model may number the chunks from 0: one answer per chunk is still usable, and
    each call asks for exactly as many answers as it sent chunks."""
    from memcity_pipeline.enrichment.enrich import ChunkBatchOut, enrich_chunks
    from memcity_pipeline.llm.usage import Usage

    sizes: list[tuple[int, int]] = []

    def call(
        messages: list[dict[str, str]], schema: type[Any], accept: Any = None
    ) -> tuple[Any, Usage]:
        bounds = schema.model_json_schema()["properties"]["chunks"]
        sizes.append((bounds["minItems"], bounds["maxItems"]))
        sent = re.findall(r"\[chunk (\d+)\]\n([^\n]*)", messages[-1]["content"])
        answers = [
            {"index": n, "summary": f"About {body.split()[0]}.", "key_terms": [body.split()[0]]}
            for n, (_, body) in enumerate(sent)  # numbered from 0
        ]
        return ChunkBatchOut.model_validate({"chunks": answers}), Usage(calls=1)

    chunks = [f"{word} is a word." for word in ("Tide", "Ferry", "Harbour", "Gull", "Pier")]
    results = enrich_chunks("Doc", "", [], chunks, call, batch_size=3)
    assert [r.status for r in results] == ["enriched"] * 5
    assert [r.summary for r in results] == [f"About {c.split()[0]}." for c in chunks]
    assert sizes == [(3, 3), (2, 2)]
