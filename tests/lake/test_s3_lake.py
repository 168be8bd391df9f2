"""The whole pipeline on a lake in S3 (moto's S3-protocol server on 127.0.0.1): ingestion,
enrichment by the scripted LLM, indexes, `get_context` and `rlm_query`, with nothing of the lake
on local disk; a rerun of every partition commits nothing."""

import json
from pathlib import Path
from typing import Any

import pytest

from memcity_pipeline.api import get_context, rlm_query
from memcity_pipeline.cli.ingest import ingest
from memcity_pipeline.cli.runner import copy_sample_corpus
from memcity_pipeline.lake.delta import read_rows, table_versions
from memcity_pipeline.lake.files import get_bytes, list_keys
from memcity_pipeline.lake.tables import TABLES
from memcity_pipeline.llm.client import LLMClient
from memcity_pipeline.sandbox.local import LocalSandboxBackend
from memcity_pipeline.settings import load_settings
from tests.enrichment.test_enrichment import smart_responder
from tests.fixtures_sandbox import isolation_for_tests
from tests.scripted_llm_server import ScriptedLLMServer

ORG, KB = "brambleway", "company_docs"


def _responder(request: dict[str, Any]) -> str:
    """`smart_responder`, with chunk summaries that never repeat a short chunk whole (so no
    chunk fails and a rerun has nothing to retry)."""
    answer = smart_responder(request)
    try:
        data = json.loads(answer)
    except ValueError:
        return answer
    for items in data.values() if isinstance(data, dict) else []:
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and "index" in item and item.get("summary"):
                item["summary"] = ("In short: " + item["summary"])[:120]
    return json.dumps(data)


def _failures(outcome: Any) -> list[str]:
    return [f"{p.partition.key}: {p.failure}" for p in outcome.partitions if not p.success]


@pytest.mark.slow
def test_the_sample_corpus_through_every_stage_on_an_s3_lake(
    s3_lake: str,
    scripted_llm: ScriptedLLMServer,
    memcity_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scripted_llm.responder = _responder
    for name, value in {
        "MEMCITY_LLM_BASE_URL": scripted_llm.base_url,
        "MEMCITY_LLM_MODEL": "scripted-model",
        "MEMCITY_LLM_API_KEY": "test-key",
        "MEMCITY_ENRICHMENT": "llm",
        "MEMCITY_LONG_DOCUMENTS": "windowed",
        "MEMCITY_EMBEDDINGS": "openai:scripted-embedding",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.lake.uri == s3_lake and not settings.lake.is_local
    copy_sample_corpus(settings.landing_dir)

    first = ingest(settings)
    assert first.success, _failures(first)
    assert not (memcity_home / "lake").exists(), "the lake was written to local disk"
    enriched = read_rows(settings.lake, "enriched_chunks")
    assert enriched.height > 0 and set(enriched["enrichment_status"].to_list()) == {"enriched"}
    for name in ("raw_documents", "memories", "conversations", "chunks", "chunk_embeddings"):
        assert read_rows(settings.lake, name).height > 0, name
    assert get_bytes(settings.lake, f"indexes/chunks_bm25/{ORG}/{KB}/CURRENT")
    assert list_keys(settings.lake, "_state/source_files/_delta_log")  # commits in the bucket

    hits = get_context(
        ORG, KB, "For how many years is the hive scale covered?", 100, settings=settings
    )
    # The scripted embeddings carry no meaning: BM25's best hit is the one to check.
    [keyword_best] = [h for h in hits if h.retrievers.get("bm25") == 1]
    assert "warranty" in keyword_best.title.lower()

    scripted_llm.responder = lambda request: "```repl\nFINAL(str(len(context)) + ' chunks')\n```"
    llm = LLMClient(
        base_url=scripted_llm.base_url, api_key="k", model="scripted-model", cache_dir=None
    )
    sandbox = LocalSandboxBackend(memcity_home / "sandboxes", isolation=isolation_for_tests())
    try:
        result = rlm_query(
            ORG,
            "How many chunks?",
            "documents",
            knowledge_base_id=KB,
            settings=settings,
            llm=llm,
            sandbox=sandbox,
        )
    finally:
        sandbox.close()
        llm.close()
    assert result.status == "completed", result
    chunks = enriched.filter(enriched["knowledge_base_id"] == KB).height
    assert result.answer == f"{chunks} chunks"
    sessions = read_rows(settings.lake, "rlm_sessions")
    assert sessions["session_id"].to_list() == [result.session_id]
    assert result.trajectory_path == f"{s3_lake}/rlm_trajectories/{result.session_id}.jsonl"
    assert get_bytes(settings.lake, f"rlm_trajectories/{result.session_id}.jsonl")

    scripted_llm.responder = _responder
    versions = table_versions(settings.lake, TABLES)
    calls = scripted_llm.call_count
    again = ingest(settings, everything=True)  # every partition runs again, on the same input
    assert again.success, _failures(again)
    assert table_versions(settings.lake, TABLES) == versions, "a rerun committed"
    assert scripted_llm.call_count == calls  # and asked the LLM nothing
