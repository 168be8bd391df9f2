"""Indexes and hybrid search (get_context) over the sample corpus, as an application uses them."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memcity_pipeline.api import SearchError, get_context, search_memories
from memcity_pipeline.cli.ingest import IngestOutcome, PartitionRef, ingest
from memcity_pipeline.cli.runner import copy_sample_corpus
from memcity_pipeline.defs.indexing import chunk_embeddings
from memcity_pipeline.lake.delta import read_rows
from memcity_pipeline.lake.tables import known_scopes, scope_where
from memcity_pipeline.resources.embeddings import EmbeddingsResource
from memcity_pipeline.search.embeddings import windows
from memcity_pipeline.search.indexes import index_texts, vectors_of
from memcity_pipeline.settings import build_resources, get_settings
from tests.partitioned import materialize_partitions, metadata, scope_keys
from tests.scripted_llm_server import ScriptedLLMServer

ORG, KB = "brambleway", "company_docs"


def _failures(outcome: IngestOutcome) -> list[str]:
    """Why an ingestion did not succeed: the layout run's failure and each failed partition's."""
    failed = [f"{p.partition.key}: {p.failure}" for p in outcome.partitions if not p.success]
    return [outcome.layout_failure, *failed] if outcome.layout_failure else failed


@pytest.fixture
def built_lake() -> Path:
    """The sample corpus ingested through every stage (enrichment off, local embeddings)."""
    settings = get_settings()
    copy_sample_corpus(settings.landing_dir)
    outcome = ingest(settings)
    assert outcome.success, _failures(outcome)
    keys = scope_keys(settings.landing_dir)
    assert sorted(p.partition.key for p in outcome.partitions) == sorted(
        keys["knowledge_bases"] + keys["users"]
    )
    return settings.lake_dir


@pytest.mark.slow
def test_get_context_finds_the_warranty_and_stays_in_its_org(built_lake: Path) -> None:
    hits = get_context(
        ORG, KB, "For how many years is the hive scale covered against defects?", k=5
    )
    assert 1 <= len(hits) <= 5
    top = hits[0]
    assert top.chunk_id.startswith("chk_") and top.document_id.startswith("doc_")
    assert top.title and top.text and top.score > 0
    assert set(top.retrievers) <= {"bm25", "vector"} and top.retrievers
    assert any("warranty" in h.title.lower() for h in hits[:3])
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)

    brambleway_chunks = set(
        read_rows(built_lake, "enriched_chunks", scope_where("enriched_chunks", ORG, KB))[
            "chunk_id"
        ].to_list()
    )
    other_kb = known_scopes(built_lake, "saltmarsh", "knowledge_base")[0]
    other = get_context("saltmarsh", other_kb, "HiveScale warranty years refund", k=10)
    assert other and not ({h.chunk_id for h in other} & brambleway_chunks)


@pytest.mark.slow
def test_bad_requests_are_clear_errors(built_lake: Path) -> None:
    with pytest.raises(SearchError, match="unknown org"):
        get_context("nobody", KB, "warranty")
    with pytest.raises(SearchError, match="unknown knowledge base"):
        get_context(ORG, "no_such_kb", "warranty")
    with pytest.raises(SearchError, match="invalid org"):
        get_context("../saltmarsh", KB, "warranty")
    with pytest.raises(SearchError, match="empty"):
        get_context(ORG, KB, "   ")


def test_an_index_not_built_yet_is_an_error_not_an_empty_list() -> None:
    settings = get_settings()
    copy_sample_corpus(settings.landing_dir)
    from memcity_pipeline.defs.ingestion import raw_documents

    lake = build_resources(settings)["lake"]
    results = materialize_partitions([raw_documents], {"lake": lake}, settings.landing_dir)
    assert f"{ORG}/{KB}" in results and all(r.success for r in results.values())
    with pytest.raises(SearchError, match="not built yet"):
        get_context(ORG, KB, "warranty")


@pytest.mark.slow
def test_memories_are_searchable_per_user(built_lake: Path) -> None:
    users = known_scopes(built_lake, ORG, "user")
    hits = search_memories(ORG, users[0], "what does this user like", k=3)
    assert 1 <= len(hits) <= 3
    own = set(
        read_rows(built_lake, "memories", scope_where("memories", ORG, users[0]))[
            "memory_id"
        ].to_list()
    )
    assert {h.memory_id for h in hits} <= own
    with pytest.raises(SearchError, match="unknown user"):
        search_memories(ORG, "nobody", "tea")


@pytest.mark.slow
def test_embeddings_are_incremental_and_a_model_change_re_embeds_all(
    built_lake: Path, scripted_llm: ScriptedLLMServer
) -> None:
    settings = get_settings()
    # Nothing changed in the landing folder: no partition is run again ...
    again = ingest(settings)
    assert again.success and again.partitions == [] and again.plan.runs == []
    assert PartitionRef("knowledge_base", f"{ORG}/{KB}") in again.plan.unchanged
    # ... and when every partition is run all the same, no chunk is embedded again.
    forced = ingest(settings, everything=True)
    assert forced.success, _failures(forced)
    rerun = forced.materializations("chunk_embeddings")
    assert len(rerun) == len(scope_keys(settings.landing_dir)["knowledge_bases"])
    assert all(m["embedded"] == 0 and m["dagster/row_count"] > 0 for m in rerun)

    doc = next(settings.landing_dir.rglob("warranty.md"))
    doc.write_text(
        doc.read_text("utf-8") + "\n\nA new closing paragraph about hive scales.\n", "utf-8"
    )
    edited = ingest(settings)
    assert edited.success, _failures(edited)
    assert edited.plan.runs == [PartitionRef("knowledge_base", f"{ORG}/{KB}")]  # only its KB
    [meta] = edited.materializations("chunk_embeddings")
    total = meta["dagster/row_count"]
    assert 0 < meta["embedded"] < total and meta["model_changed"] is False

    other = EmbeddingsResource(
        setting="openai:scripted-embed", base_url=scripted_llm.base_url, api_key="x"
    )
    results = materialize_partitions(
        [chunk_embeddings],
        {"lake": build_resources(settings)["lake"], "embeddings": other},
        settings.landing_dir,
    )
    assert all(r.success for r in results.values())
    changed = metadata(results, "chunk_embeddings")
    assert sorted(changed) == scope_keys(settings.landing_dir)["knowledge_bases"]
    for meta in changed.values():  # every knowledge base re-embedded whole
        assert meta["model_changed"] is True
        assert meta["embedded"] == meta["dagster/row_count"] > 0
    table = read_rows(built_lake, "chunk_embeddings", scope_where("chunk_embeddings", ORG, KB))
    assert set(table["model"].to_list()) == {"openai:scripted-embed"}
    with pytest.raises(SearchError, match="embedded with"):
        get_context(ORG, KB, "warranty")  # the configured (local) model no longer matches


@pytest.mark.slow
def test_memcity_search_cli(built_lake: Path) -> None:
    memcity = str(Path(sys.executable).parent / "memcity")
    proc = subprocess.run(
        [
            memcity,
            "search",
            "--org",
            ORG,
            "--kb",
            KB,
            "return window in days",
            "--k",
            "3",
            "--per-document",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    hits = json.loads(proc.stdout)
    assert len(hits) == 3 and {
        "chunk_id",
        "title",
        "section",
        "header",
        "text",
        "score",
        "retrievers",
    } <= set(hits[0])
    assert len({h["document_id"] for h in hits}) == 3  # --per-document: one chunk per document
    bad = subprocess.run(
        [memcity, "search", "--org", "nobody", "--kb", KB, "x"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "unknown org" in bad.stderr


@pytest.mark.slow
def test_a_search_imports_neither_dagster_nor_the_llm_client(built_lake: Path) -> None:
    """What a fresh process pays before its first answer: the search path builds only the
    embedder and the index, not the Dagster resources or the RLM engine."""
    code = (
        "import sys; from memcity_pipeline.api import get_context, search_memories;"
        f"hits = get_context({ORG!r}, {KB!r}, 'return window in days', 3);"
        f"mems = search_memories({ORG!r}, 'helene', 'what does she prefer?', 2);"
        "heavy = sorted(m for m in ('dagster', 'openai', 'torch', 'rlm') if m in sys.modules);"
        "print(len(hits), len(mems), heavy)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3", "2", "[]"]


@pytest.mark.slow
def test_chunks_are_indexed_whole_with_their_headers(built_lake: Path) -> None:
    rows = read_rows(built_lake, "enriched_chunks", scope_where("enriched_chunks", ORG, KB))
    titles = dict(
        read_rows(
            built_lake,
            "raw_documents",
            scope_where("raw_documents", ORG, KB),
            columns=["document_id", "title"],
        ).iter_rows()
    )
    for row in rows.iter_rows(named=True):  # every header starts with its document's title
        assert row["header"].startswith(titles[row["document_id"]].strip())
    # Every chunk has as many vectors as windows of its indexed text, and the vectors are read
    # back as one float32 matrix (no Python lists).
    emb = read_rows(built_lake, "chunk_embeddings", scope_where("chunk_embeddings", ORG, KB))
    matrix, parts = vectors_of(emb)
    assert matrix.dtype == np.float32 and matrix.shape == (int(parts.sum()), 384)
    texts = dict(zip(rows["chunk_id"], index_texts(rows), strict=True))
    leads = dict(zip(rows["chunk_id"], rows["header"], strict=True))
    for item, count in zip(emb["item_id"], parts.tolist(), strict=True):
        assert count == len(windows(texts[item], leads[item], 254))

    hits = get_context(ORG, KB, "For how many years is the hive scale covered?", k=8)
    assert hits[0].header.startswith(hits[0].title.strip())
    per_doc = get_context(
        ORG, KB, "For how many years is the hive scale covered?", k=4, per_document=True
    )
    assert len({h.document_id for h in per_doc}) == len(per_doc) == 4
    assert per_doc[0].chunk_id == hits[0].chunk_id  # the best chunk leads either way


@pytest.mark.slow
def test_the_index_cache_is_bounded_by_bytes(built_lake: Path) -> None:
    from memcity_pipeline.search import retrieval

    settings = get_settings()
    get_context(ORG, KB, "warranty", k=1, settings=settings)
    search_memories(ORG, "helene", "tea", k=1, settings=settings)
    both = retrieval.index_cache_bytes()
    assert len(retrieval._CACHE) >= 2 and both > 0
    tiny = settings.model_copy(update={"search_cache_mb": 0})
    try:  # only the index in use stays
        get_context(ORG, KB, "warranty", k=1, settings=tiny)
        assert len(retrieval._CACHE) == 1 and 0 < retrieval.index_cache_bytes() < both
    finally:
        retrieval.set_index_cache_limit(retrieval.DEFAULT_CACHE_BYTES)


@pytest.mark.slow
def test_two_lakes_with_the_same_content_are_not_confused(built_lake: Path, tmp_path: Path) -> None:
    """A copy of a lake has the same table versions and index keys: each is still loaded from
    its own files, and a query is embedded by the embedder of its own call."""
    import shutil

    from memcity_pipeline.search import retrieval
    from memcity_pipeline.settings import build_embedder

    copy = tmp_path / "copy"
    shutil.copytree(built_lake, copy)
    embedder = build_embedder(get_settings())
    question = "For how many years is the hive scale covered?"
    here = retrieval.get_context(built_lake, ORG, KB, question, 3, embedder=embedder)
    there = retrieval.get_context(copy, ORG, KB, question, 3, embedder=embedder)
    assert [h.chunk_id for h in here] == [h.chunk_id for h in there]
    lakes = {key[0] for key in retrieval._CACHE}
    assert {str(built_lake), str(copy)} <= lakes
