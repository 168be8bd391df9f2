"""The tools that sandboxed code calls on the host besides `llm_query`: `search(query, k=10)`.

`SandboxTools` is the sandbox session's tool handler (`sandbox.base.ToolHandler`) for one RLM
query, shared by the query's child RLMs. Contracts:

- **Scope is the host's.** What `search` reads is fixed when the query starts (`SearchScope`:
  the query's own org and knowledge base for a `documents` context, the query's own org and
  user for `memories`) and never taken from the call: the sandbox sends a query text and `k`,
  nothing else is read. Other context types have no `search` (a call gets an error).
- **Arguments are untrusted.** `query` must be a non-empty string of at most
  `MAX_QUERY_CHARS` characters and `k` an integer from 1 to `MAX_SEARCH_K`; anything else
  (and a search the lake cannot answer, such as an index not built yet) is a `ToolError` whose
  message the sandboxed code receives as an error (`search failed: k must be from 1 to 50, not
  0`). Nothing a call sends can fail the host.
- **Results are plain JSON data:** documents give `{chunk_id, document_id, title, section, text,
  score}` per hit (`text` is the chunk as the context holds it: the pronoun-resolved text when
  enriched), memories `{memory_id, text, created_at, score}` (`created_at` ISO 8601 or null),
  best first. The search is `get_context` / `search_memories` (BM25 and vectors, fused),
  without the LLM reranker: a search costs no LLM call.
- **No secret travels:** the embedder (and any key it holds) lives on the host; it is built on
  the first search, so a query that never searches never loads it.
- `search_calls` counts the searches run (calls that passed the checks), for the session row.
- **Traced** as an `rlm.search` span per call (`rlm.tracing`): the scope's kind, `k`, the
  query's length and the number of hits (or the error's kind); never the query text, the
  scope ids or the hits.
"""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import StatusCode

from memcity_pipeline.lake.location import Lake
from memcity_pipeline.rlm.tracing import set_attributes, tracer
from memcity_pipeline.sandbox.base import ToolError
from memcity_pipeline.search.embeddings import Embedder
from memcity_pipeline.search.retrieval import SearchError, get_context, search_memories

log = logging.getLogger(__name__)

MAX_SEARCH_K = 50
MAX_QUERY_CHARS = 2_000
DEFAULT_SEARCH_K = 10

EmbedderSource = Callable[[], Embedder]
"""Builds (or returns) the embedder the lake's indexes were built with."""


@dataclass(frozen=True)
class SearchScope:
    """What `search` reads for one query: one org's knowledge base, or one org's user."""

    lake: Lake
    org_id: str
    kind: str  # documents | memories
    scope_id: str  # the knowledge base or the user

    @classmethod
    def of_query(
        cls,
        lake: Lake,
        org_id: str,
        context_type: str,
        *,
        knowledge_base_id: str | None,
        user_id: str | None,
    ) -> "SearchScope | None":
        """The scope of a query's `search`, or None when its context type has none."""
        if context_type == "documents" and knowledge_base_id:
            return cls(lake, org_id, "documents", knowledge_base_id)
        if context_type == "memories" and user_id:
            return cls(lake, org_id, "memories", user_id)
        return None


def _json_kind(value: Any) -> str:
    """What a value is, in the words of the JSON it came as."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def search_arguments(args: Any) -> tuple[str, int]:
    """The `(query, k)` of a `search` call; ToolError saying what is wrong otherwise."""
    if not isinstance(args, dict):
        raise ToolError("it takes a query and k")
    query = args.get("query")
    k = args.get("k", DEFAULT_SEARCH_K)
    if not isinstance(query, str):
        raise ToolError(f"query must be a string, not {_json_kind(query)}")
    if not query.strip():
        raise ToolError("query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise ToolError(
            f"query has {len(query):,} characters; at most {MAX_QUERY_CHARS:,} "
            "(search with a few keywords or a question)"
        )
    if isinstance(k, float) and k.is_integer():
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int):
        raise ToolError(f"k must be an integer, not {_json_kind(k)}")
    if not 1 <= k <= MAX_SEARCH_K:
        raise ToolError(f"k must be from 1 to {MAX_SEARCH_K}, not {k}")
    return query, k


class SandboxTools:
    """The tool handler of one RLM query's sandbox sessions (thread-safe)."""

    def __init__(self, scope: SearchScope | None, embedder: EmbedderSource | None) -> None:
        self.scope = scope
        self._embedder_source = embedder
        self._embedder: Embedder | None = None
        self._lock = threading.Lock()
        self.search_calls = 0

    @property
    def has_search(self) -> bool:
        """True when `search` can answer for this query."""
        return self.scope is not None and self._embedder_source is not None

    def __call__(self, tool: str, args: Any) -> Any:
        if tool == "search":
            return self.search(args)
        raise ToolError(f"there is no tool {tool!r} on this host")

    def search(self, args: Any) -> list[dict[str, Any]]:
        """One `search` call from the sandbox: hits of the query's own scope, as JSON data."""
        with tracer().start_as_current_span(
            "rlm.search", record_exception=False, set_status_on_exception=False
        ) as span:
            set_attributes(span, {"rlm.search.scope": self.scope.kind if self.scope else None})
            if isinstance(args, dict):
                k, query = args.get("k", DEFAULT_SEARCH_K), args.get("query")
                set_attributes(
                    span,
                    {
                        "rlm.search.k": k if isinstance(k, int) else None,
                        "rlm.query_chars": len(query) if isinstance(query, str) else None,
                    },
                )
            try:
                hits = self._search(args)
            except Exception as exc:  # the kind of failure only: its message may name the scope
                set_attributes(span, {"rlm.error": type(exc).__name__})
                span.set_status(StatusCode.ERROR)
                raise
            set_attributes(span, {"rlm.search.hits": len(hits)})
            return hits

    def _search(self, args: Any) -> list[dict[str, Any]]:
        scope = self.scope
        if scope is None or self._embedder_source is None:
            raise ToolError(
                "there is nothing to search for this query: search reads a knowledge base "
                "(context_type 'documents') or a user's memories ('memories')"
            )
        query, k = search_arguments(args)
        with self._lock:
            self.search_calls += 1
        embedder = self._get_embedder()
        try:
            if scope.kind == "documents":
                hits = get_context(
                    scope.lake, scope.org_id, scope.scope_id, query, k, embedder=embedder
                )
                return [
                    {
                        "chunk_id": h.chunk_id,
                        "document_id": h.document_id,
                        "title": h.title,
                        "section": h.section,
                        "text": h.resolved_text or h.text,
                        "score": round(float(h.score), 6),
                    }
                    for h in hits
                ]
            memories = search_memories(
                scope.lake, scope.org_id, scope.scope_id, query, k, embedder=embedder
            )
        except SearchError as exc:
            raise ToolError(_own_words(exc, scope)) from None
        return [
            {
                "memory_id": m.memory_id,
                "text": m.text,
                "created_at": m.created_at.isoformat() if m.created_at is not None else None,
                "score": round(float(m.score), 6),
            }
            for m in memories
        ]

    def _get_embedder(self) -> Embedder:
        """The embedder, built by the first search."""
        with self._lock:
            if self._embedder is None:
                assert self._embedder_source is not None
                try:
                    self._embedder = self._embedder_source()
                except Exception as exc:
                    log.warning("search: the embedder could not be built: %s", exc)
                    raise ToolError(
                        "the host could not load its embeddings "
                        f"({type(exc).__name__}); search is unavailable"
                    ) from None
            return self._embedder


def _own_words(exc: SearchError, scope: SearchScope) -> str:
    """A search failure as the sandbox may read it: an unknown-scope message (which lists the
    lake's other orgs, knowledge bases or users) becomes a plain statement about the query's
    own scope."""
    text = str(exc)
    if text.startswith("unknown "):
        what = "knowledge base" if scope.kind == "documents" else "user"
        return f"the {what} {scope.scope_id!r} has no data in the lake any more"
    return text
