"""The Python API for applications: search (`get_context`, `search_memories`)."""

from memcity_pipeline.lib.retrieval import (
    ContextHit,
    MemoryHit,
    SearchError,
    llm_reranker,
)
from memcity_pipeline.lib.retrieval import get_context as _get_context
from memcity_pipeline.lib.retrieval import search_memories as _search_memories
from memcity_pipeline.resources.embeddings import EmbeddingsResource
from memcity_pipeline.settings import Settings, get_settings

__all__ = ["ContextHit", "MemoryHit", "SearchError", "get_context", "search_memories"]


def get_context(
    org_id: str,
    knowledge_base_id: str,
    query: str,
    k: int = 10,
    *,
    settings: Settings | None = None,
) -> list[ContextHit]:
    """The `k` chunks of a knowledge base that best answer `query` (BM25 + vectors, fused;
    reranked by the LLM when `MEMCITY_RERANK=llm`). Raises `SearchError` for an unknown org or
    knowledge base, or an index that is not built yet."""
    s = settings or get_settings()
    reranker = None
    if s.rerank == "llm":
        from memcity_pipeline.resources.llm import LLMResource

        reranker = llm_reranker(LLMResource().get_client())
    return _get_context(
        s.lake_dir,
        org_id,
        knowledge_base_id,
        query,
        k,
        embedder=EmbeddingsResource.from_settings(s).get_embedder(),
        reranker=reranker,
    )


def search_memories(
    org_id: str, user_id: str, query: str, k: int = 10, *, settings: Settings | None = None
) -> list[MemoryHit]:
    """The `k` memories of a user that best match `query`."""
    s = settings or get_settings()
    return _search_memories(
        s.lake_dir,
        org_id,
        user_id,
        query,
        k,
        embedder=EmbeddingsResource.from_settings(s).get_embedder(),
    )
