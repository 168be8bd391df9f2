"""`get_context`: hybrid search (BM25 + vectors, their scores fused; `search.fusion`) over one
knowledge base's enriched chunks, and the same over one user's memories.

Indexes are loaded once per process and reloaded when the lake's tables get a new version or
the BM25 index a new build. The loaded indexes are kept in a cache bounded by bytes
(`set_index_cache_limit`; the least recently used index leaves first). The lake may be a local
folder or object storage (`Lake`). A search only ever opens the index files of the org and
knowledge base (or user) it was asked for.
"""

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from memcity_pipeline.lake.delta import has_rows, read_rows, table_version
from memcity_pipeline.lake.location import Lake
from memcity_pipeline.lake.tables import (
    ScopeKind,
    UnknownScopeError,
    bm25_prefix,
    require_scope,
    scope_where,
)
from memcity_pipeline.search import bm25_store
from memcity_pipeline.search.embeddings import Embedder
from memcity_pipeline.search.fusion import HybridIndex
from memcity_pipeline.search.indexes import vectors_of


class SearchError(ValueError):
    """The request cannot be answered: unknown org, knowledge base or user, or no index yet."""


@dataclass
class ContextHit:
    """One result of `get_context`."""

    chunk_id: str
    document_id: str
    title: str
    section: str | None
    text: str  # the original chunk text
    resolved_text: str | None
    score: float
    retrievers: dict[str, int] = field(default_factory=dict)  # retriever -> rank (1-based)
    header: str = ""  # where the chunk sits: "Title › Section › Subsection"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MemoryHit:
    memory_id: str
    text: str
    created_at: Any
    score: float
    retrievers: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Loaded:
    key: tuple[Any, ...]
    index: HybridIndex
    rows: dict[str, dict[str, Any]]
    nbytes: int = 0


DEFAULT_CACHE_BYTES = 1 << 30
_CACHE: "OrderedDict[tuple[str, ...], _Loaded]" = OrderedDict()  # by lake, scope and model
_CACHE_LIMIT = [DEFAULT_CACHE_BYTES]
_LOCK = threading.Lock()


def set_index_cache_limit(max_bytes: int) -> None:
    """Bound the loaded indexes kept by this process to about `max_bytes` (least recently used
    leave first; the index of the current search always stays)."""
    if max_bytes < 0:
        raise ValueError(f"the index cache limit must be >= 0, got {max_bytes}")
    with _LOCK:
        _CACHE_LIMIT[0] = max_bytes
        _evict(None)


def index_cache_bytes() -> int:
    """About how many bytes the loaded indexes of this process hold."""
    with _LOCK:
        return sum(entry.nbytes for entry in _CACHE.values())


def _evict(keep: tuple[str, ...] | None) -> None:
    """Drop least recently used indexes until the cache fits its limit (caller holds `_LOCK`)."""
    total = sum(entry.nbytes for entry in _CACHE.values())
    for key in list(_CACHE):
        if total <= _CACHE_LIMIT[0]:
            break
        if key != keep:
            total -= _CACHE.pop(key).nbytes


def _rows_nbytes(rows: dict[str, dict[str, Any]]) -> int:
    """About how many bytes the rows kept beside an index hold (their strings, and overhead)."""
    return sum(
        400 + sum(len(v) for v in row.values() if isinstance(v, str)) for row in rows.values()
    )


def _load(
    lake: Lake,
    kind: str,
    org_id: str,
    scope_id: str,
    embedder: Embedder,
    rows_of: Callable[[Lake, str, str], dict[str, dict[str, Any]]],
) -> _Loaded:
    table = "chunk_embeddings" if kind == "chunks" else "memory_embeddings"
    where = scope_where(table, org_id, scope_id)
    prefix = bm25_prefix(kind, org_id, scope_id)  # type: ignore[arg-type]
    built = bm25_store.current_key(lake, prefix)
    if built is None or not has_rows(lake, table, where):
        raise SearchError(
            f"the {kind} index of {org_id}/{scope_id} is not built yet: run `memcity ingest`"
        )
    key = (lake.uri, kind, org_id, scope_id, embedder.model_name)
    source = "enriched_chunks" if kind == "chunks" else "memories"
    stamp = (built, table_version(lake, table), table_version(lake, source))
    with _LOCK:
        cached = _CACHE.get(key)
        if cached and cached.key == stamp:
            _CACHE.move_to_end(key)
            return cached
    bm25 = bm25_store.load(lake, prefix)
    if bm25 is None:
        raise SearchError(
            f"the {kind} index of {org_id}/{scope_id} is not built yet: run `memcity ingest`"
        )
    emb = read_rows(lake, table, where, columns=["item_id", "model", "dimension", "vector"])
    models = set(emb["model"].unique().to_list()) if emb.height else {embedder.model_name}
    if models != {embedder.model_name}:
        raise SearchError(
            f"the {kind} index of {org_id}/{scope_id} was embedded with {', '.join(models)}, "
            f"but the configured embeddings are {embedder.model_name}: run `memcity ingest`"
        )
    position = {item: i for i, item in enumerate(emb["item_id"].to_list())}
    missing = [i for i in bm25.ids if i not in position]
    if missing:
        raise SearchError(
            f"the {kind} index of {org_id}/{scope_id} is out of step with its embeddings "
            f"({len(missing)} items missing): run `memcity ingest`"
        )
    matrix, parts = vectors_of(emb)
    if len(bm25.ids):
        order = np.array([position[i] for i in bm25.ids], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(parts)[:-1]])
        counts = parts[order]
        # the rows of each item, items in BM25 order: start of the item + 0..count-1
        rows = np.repeat(starts[order] - np.cumsum(counts) + counts, counts) + np.arange(
            int(counts.sum())
        )
        vectors = matrix if np.array_equal(order, np.arange(len(order))) else matrix[rows]
    else:
        counts = np.zeros(0, dtype=np.int64)
        vectors = np.zeros((0, getattr(embedder, "dimension", 1)), dtype=np.float32)
    index = HybridIndex(bm25.ids, bm25, vectors, embedder.model_name, parts=counts)
    found = rows_of(lake, org_id, scope_id)
    loaded = _Loaded(stamp, index, found, index.nbytes + _rows_nbytes(found))
    with _LOCK:
        _CACHE[key] = loaded
        _CACHE.move_to_end(key)
        _evict(key)
    return loaded


def _chunk_rows(lake: Lake, org_id: str, kb_id: str) -> dict[str, dict[str, Any]]:
    chunks = read_rows(
        lake,
        "enriched_chunks",
        scope_where("enriched_chunks", org_id, kb_id),
        columns=[
            "org_id",
            "chunk_id",
            "document_id",
            "section_title",
            "header",
            "text",
            "resolved_text",
        ],
    )
    docs = read_rows(
        lake,
        "raw_documents",
        scope_where("raw_documents", org_id, kb_id),
        columns=["document_id", "title"],
    )
    joined = chunks.join(docs, on="document_id", how="left")
    return {r["chunk_id"]: r for r in joined.iter_rows(named=True)}


def _memory_rows(lake: Lake, org_id: str, user_id: str) -> dict[str, dict[str, Any]]:
    mem = read_rows(
        lake,
        "memories",
        scope_where("memories", org_id, user_id),
        columns=["org_id", "memory_id", "text", "created_at"],
    )
    return {r["memory_id"]: r for r in mem.iter_rows(named=True)}


def _check_scope(lake: Lake, org_id: str, scope: ScopeKind, scope_id: str) -> None:
    """SearchError unless the lake knows the org and its knowledge base (or user); the message
    is `rlm_query`'s for the same ids (`lake.tables.require_scope` words both)."""
    words = ("org_id", "knowledge_base_id" if scope == "knowledge_base" else "user_id")
    try:
        require_scope(lake, org_id, scope, scope_id, id_names=words)
    except UnknownScopeError as exc:
        raise SearchError(str(exc)) from None


class RerankOut(BaseModel):
    ranking: list[int]


Reranker = Callable[[str, list[str]], list[int]]  # (query, passages) -> order of passage indices


def get_context(
    lake: Lake | str | Path,
    org_id: str,
    knowledge_base_id: str,
    query: str,
    k: int = 10,
    *,
    embedder: Embedder,
    candidates: int = 50,
    reranker: Reranker | None = None,
    per_document: bool = False,
) -> list[ContextHit]:
    """The `k` chunks of one knowledge base that best answer `query`; with `per_document`, the
    best chunk of each of the `k` best documents (fewer when the candidates hold fewer)."""
    if not query.strip():
        raise SearchError("the query is empty")
    if k < 1:
        raise SearchError(f"k must be at least 1, got {k}")
    lake = Lake.of(lake)
    _check_scope(lake, org_id, "knowledge_base", knowledge_base_id)
    loaded = _load(lake, "chunks", org_id, knowledge_base_id, embedder, _chunk_rows)
    if len(loaded.index) == 0:
        return []
    if per_document:  # documents have several chunks each: look deeper to find k of them
        candidates = max(candidates, 5 * k)
    depth = candidates if reranker or per_document else k
    fused = loaded.index.search(
        query, k=max(k, depth), candidates=candidates, query_vector=embedder.embed([query])[0]
    )
    hits = [
        ContextHit(
            chunk_id=h.id,
            document_id=row["document_id"],
            title=row.get("title") or "",
            section=row.get("section_title"),
            text=row["text"],
            resolved_text=row.get("resolved_text"),
            score=float(h.score),
            retrievers=dict(h.retrievers),
            header=row.get("header") or "",
        )
        for h in fused
        if (row := loaded.rows.get(h.id)) is not None and row["org_id"] == org_id
    ]
    if reranker and hits:
        order = reranker(query, [h.resolved_text or h.text for h in hits[:candidates]])
        seen = [i for i in dict.fromkeys(order) if 0 <= i < len(hits)]
        rest = [i for i in range(len(hits)) if i not in seen]
        hits = [hits[i] for i in seen + rest]
        for rank, h in enumerate(hits, start=1):
            h.retrievers["llm_rerank"] = rank
    if per_document:
        best: dict[str, ContextHit] = {}
        for h in hits:
            best.setdefault(h.document_id, h)
        hits = list(best.values())
    return hits[:k]


def search_memories(
    lake: Lake | str | Path,
    org_id: str,
    user_id: str,
    query: str,
    k: int = 10,
    *,
    embedder: Embedder,
    candidates: int = 50,
) -> list[MemoryHit]:
    """The `k` memories of one user that best match `query`."""
    if not query.strip():
        raise SearchError("the query is empty")
    lake = Lake.of(lake)
    _check_scope(lake, org_id, "user", user_id)
    loaded = _load(lake, "memories", org_id, user_id, embedder, _memory_rows)
    if len(loaded.index) == 0:
        return []
    return [
        MemoryHit(
            row["memory_id"], row["text"], row["created_at"], float(h.score), dict(h.retrievers)
        )
        for h in loaded.index.search(
            query, k=k, candidates=candidates, query_vector=embedder.embed([query])[0]
        )
        if (row := loaded.rows.get(h.id)) is not None and row["org_id"] == org_id
    ]


def llm_reranker(client: Any) -> Reranker:
    """A reranker asking an LLM to order passages by relevance (configured by MEMCITY_RERANK=llm)."""

    def rerank(query: str, passages: list[str]) -> list[int]:
        listing = "\n\n".join(f"[{i}] {p[:600]}" for i, p in enumerate(passages))
        res = client.complete(
            [
                {
                    "role": "system",
                    "content": "Order the passages by how well they answer the question. Reply "
                    'with JSON only: {"ranking": [passage numbers, best first]}.',
                },
                {"role": "user", "content": f"Question: {query}\n\nPassages:\n{listing}"},
            ],
            schema=RerankOut,
            max_tokens=400,
        )
        return list(res.parsed.ranking)

    return rerank
