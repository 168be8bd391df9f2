"""The public Python API: search (`get_context`, `search_memories`) and `rlm_query`.

Each call reads the settings (the environment and `.env`) unless it is given a `Settings`, and
builds what it needs from them the same way the Dagster definitions do (`build_resources`). A
search builds only the embedder (`build_embedder`): it imports neither Dagster nor the RLM
engine, so that a search from a fresh process answers quickly.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from memcity_pipeline.rlm.config import RLMConfig, RLMRequestError, RLMResult, parse_config
from memcity_pipeline.search.retrieval import (
    ContextHit,
    MemoryHit,
    SearchError,
    llm_reranker,
    set_index_cache_limit,
)
from memcity_pipeline.search.retrieval import get_context as _get_context
from memcity_pipeline.search.retrieval import search_memories as _search_memories
from memcity_pipeline.settings import Settings, build_embedder, build_resources, load_settings

if TYPE_CHECKING:
    from memcity_pipeline.llm.client import LLMClient
    from memcity_pipeline.rlm.engine import ProgressFn
    from memcity_pipeline.rlm.query import AnswerFn
    from memcity_pipeline.rlm.sessions import SessionStore
    from memcity_pipeline.sandbox.base import SandboxBackend
    from memcity_pipeline.search.embeddings import Embedder

__all__ = [
    "ContextHit",
    "MemoryHit",
    "RLMConfig",
    "RLMRequestError",
    "RLMResult",
    "SearchError",
    "get_context",
    "rlm_query",
    "search_memories",
]


def get_context(
    org_id: str,
    knowledge_base_id: str,
    query: str,
    k: int = 10,
    *,
    per_document: bool = False,
    settings: Settings | None = None,
) -> list[ContextHit]:
    """The `k` chunks of a knowledge base that best answer `query` (BM25 + vectors, fused;
    reranked by the LLM when `MEMCITY_RERANK=llm`); with `per_document`, the best chunk of each
    of the `k` best documents. Raises `SearchError` for an unknown org or knowledge base, or an
    index that is not built yet."""
    s = settings or load_settings()
    llm = build_resources(s)["llm"] if s.rerank == "llm" else None
    try:
        return _get_context(
            s.lake,
            org_id,
            knowledge_base_id,
            query,
            k,
            embedder=_search_embedder(s),
            reranker=llm_reranker(llm.get_client()) if llm is not None else None,
            per_document=per_document,
        )
    finally:
        if llm is not None:
            llm.close()


def search_memories(
    org_id: str, user_id: str, query: str, k: int = 10, *, settings: Settings | None = None
) -> list[MemoryHit]:
    """The `k` memories of a user that best match `query`."""
    s = settings or load_settings()
    return _search_memories(
        s.lake,
        org_id,
        user_id,
        query,
        k,
        embedder=_search_embedder(s),
    )


def rlm_query(
    org_id: str,
    query: str,
    context_type: str,
    *,
    user_id: str | None = None,
    knowledge_base_id: str | None = None,
    custom_context: str | list[Any] | None = None,
    rlm_config: RLMConfig | dict[str, Any] | None = None,
    settings: Settings | None = None,
    llm: LLMClient | None = None,
    sandbox: SandboxBackend | None = None,
    session_store: SessionStore | None = None,
    progress: ProgressFn | None = None,
    on_answer: AnswerFn | None = None,
) -> RLMResult:
    """Answer `query` over ALL of an org's context with a Recursive Language Model.

    `context_type` is `memories` (needs `user_id`), `documents` (`knowledge_base_id`),
    `conversation` (`user_id`) or `custom` (`custom_context`: a string or a list of at most
    `MEMCITY_MAX_CUSTOM_CONTEXT_CHARS` characters). The LLM, the
    sandbox (with the config's sandbox options applied), the lake and the session store
    (Postgres with `MEMCITY_POSTGRES_URL`) come from the settings unless `llm`, `sandbox` or
    `session_store` is given (a given sandbox is used as it is). The sandboxed code's `search`
    uses the embeddings of the settings (`MEMCITY_EMBEDDINGS`), loaded by its first call.
    Raises RLMRequestError for a wrong request; otherwise always returns a result.

    The session is recorded after the answer is known: `on_answer` gets the result first, then
    the row goes to the lake and Postgres, within deadlines (at most some 15 s more when
    Postgres does not answer; the row then waits in the lake, marked pending).
    """
    from memcity_pipeline.rlm.query import prepare_query, run_query

    cfg = parse_config(rlm_config)
    s = settings or load_settings()
    prepared = prepare_query(
        org_id,
        query,
        context_type,
        user_id=user_id,
        knowledge_base_id=knowledge_base_id,
        custom_context=custom_context,
        rlm_config=cfg,
        lake_dir=s.lake,
        max_custom_chars=s.max_custom_context_chars,
    )
    resources = build_resources(s)
    llm_resource = resources["llm"] if llm is None else None
    sandbox_resource = resources["sandbox"].with_options(**cfg.sandbox_overrides())
    try:
        return run_query(
            prepared,
            llm=llm or llm_resource.get_client(),  # type: ignore[union-attr]
            sandbox=sandbox or sandbox_resource.get_backend(),
            session_store=session_store or resources["sessions"].get_store(),
            progress=progress,
            embedder=functools.partial(_search_embedder, s),  # built by the first search
            on_answer=on_answer,
        )
    finally:
        if sandbox is None:
            sandbox_resource.close()
        if llm_resource is not None:
            llm_resource.close()


def _search_embedder(s: Settings) -> Embedder:
    """The embedder of the settings, for a search (`get_context`, `search_memories`, `search` in
    the sandbox), with this process's index cache bounded by `MEMCITY_SEARCH_CACHE_MB`."""
    set_index_cache_limit(s.search_cache_mb << 20)
    return build_embedder(s)
