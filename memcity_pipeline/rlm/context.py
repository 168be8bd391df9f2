"""Gather the context of an RLM query from the lake, scoped to one org.

Context types (the spec's `contextType`):

- ``memories``: a user's memories (the most recent 1,000, oldest first), one string each;
- ``documents``: the chunks of a knowledge base (up to 5,000, in document order), the enriched
  (pronoun-resolved) text when present, else the chunk text; falls back to whole raw documents
  when the knowledge base has not been chunked yet;
- ``conversation``: a user's conversation sessions (the most recent 50), one string per session;
- ``custom``: the string or list the caller gives, at most `max_custom_chars` characters
  (`MAX_CUSTOM_CHARS` unless the caller says otherwise: the API and the job pass
  `MEMCITY_MAX_CUSTOM_CONTEXT_CHARS`), counted as `context_chars` counts them.

A cap keeps the total count: `GatheredContext.cap_note` says what was kept ("the most recent
1,000 of 1,200 memories"), for the root LLM and for the query's warning.

Every check (missing parameter, unknown org, user or knowledge base, empty context) raises
:class:`ContextError` before anything else happens, so a bad request costs no LLM call.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl

from memcity_pipeline.lake.delta import read_rows
from memcity_pipeline.lake.io import check_id
from memcity_pipeline.lake.location import Lake
from memcity_pipeline.lake.tables import (
    ScopeKind,
    UnknownScopeError,
    require_scope,
    scope_where,
)

ContextType = Literal["memories", "documents", "conversation", "custom"]
CONTEXT_TYPES: tuple[str, ...] = ("memories", "documents", "conversation", "custom")

MAX_MEMORIES = 1_000
MAX_CHUNKS = 5_000
MAX_SESSIONS = 50
MAX_CUSTOM_CHARS = 20_000_000
"""The default bound of a custom context: twice the largest context the lake gives a query
(5,000 chunks of 512 tokens, about 10 million characters), and some 20 MB held in memory and
sent to the sandbox."""


class ContextError(ValueError):
    """The request cannot be served: a missing parameter or an unknown org, user or KB."""


@dataclass
class GatheredContext:
    """The context payload for the sandbox and what is known about it."""

    context_type: str
    payload: str | list[Any]
    source: str  # which lake table (or `custom`) it came from
    truncated: bool = False  # True when a cap (1,000 / 5,000 / 50) cut the context
    total_available: int = 0  # items there were before the cap
    extra: dict[str, Any] = field(default_factory=dict)
    kept: str = "first"  # which items a cap keeps: `first` or `most recent`
    unit: str = "items"  # what an item is, in the plural: memories, chunks, ...

    @property
    def cap_note(self) -> str | None:
        """What a cap kept, e.g. "the most recent 1,000 of 1,200 memories" (None when the
        context is whole)."""
        if not self.truncated:
            return None
        return f"the {self.kept} {self.item_count:,} of {self.total_available:,} {self.unit}"

    @property
    def item_count(self) -> int:
        """Items in a list context; 1 for a string."""
        return len(self.payload) if isinstance(self.payload, list) else 1

    @property
    def char_count(self) -> int:
        """Characters of the context (strings as they are, other items as compact JSON)."""
        return context_chars(self.payload)


def context_chars(value: Any) -> int:
    """Characters of a context value (strings as is, anything else as compact JSON)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(context_chars(item) for item in value)
    return len(json.dumps(value, ensure_ascii=False, default=str))


def _valid(kind: str, value: str | None) -> str:
    if not value:
        raise ContextError(f"{kind} is required")
    try:
        return check_id(kind, value)
    except ValueError as exc:
        raise ContextError(str(exc)) from exc


def _require(
    lake: Lake | str | Path,
    org_id: str,
    scope: ScopeKind | None = None,
    scope_id: str | None = None,
) -> None:
    """ContextError unless the lake knows the org (and its knowledge base or user)."""
    _valid("org_id", org_id)
    if scope is not None:
        _valid("knowledge_base_id" if scope == "knowledge_base" else "user_id", scope_id)
    try:
        require_scope(lake, org_id, scope, scope_id)
    except UnknownScopeError as exc:
        raise ContextError(str(exc)) from None


def _require_user(
    lake: Lake | str | Path, org_id: str, user_id: str | None, context_type: str
) -> str:
    if not user_id:
        raise ContextError(f"context_type {context_type!r} needs user_id")
    _require(lake, org_id, "user", user_id)
    return user_id


def gather_context(
    lake: Lake | str | Path,
    org_id: str,
    context_type: str,
    *,
    user_id: str | None = None,
    knowledge_base_id: str | None = None,
    custom_context: str | list[Any] | None = None,
    max_custom_chars: int = MAX_CUSTOM_CHARS,
) -> GatheredContext:
    """The context of a query; ContextError for a wrong request (nothing else is touched)."""
    if context_type not in CONTEXT_TYPES:
        raise ContextError(
            f"context_type must be one of {', '.join(CONTEXT_TYPES)}, not {context_type!r}"
        )
    if context_type == "custom":
        _valid("org_id", org_id)
        return custom(custom_context, max_custom_chars)
    _require(lake, org_id)
    if context_type == "memories":
        return memories(lake, org_id, _require_user(lake, org_id, user_id, context_type))
    if context_type == "conversation":
        return conversations(lake, org_id, _require_user(lake, org_id, user_id, context_type))
    if not knowledge_base_id:
        raise ContextError("context_type 'documents' needs knowledge_base_id")
    _require(lake, org_id, "knowledge_base", knowledge_base_id)
    return documents(lake, org_id, knowledge_base_id)


def custom(
    custom_context: str | list[Any] | None, max_chars: int = MAX_CUSTOM_CHARS
) -> GatheredContext:
    """The caller's own context: a non-empty string or list (JSON-serialisable) of at most
    `max_chars` characters."""
    if custom_context is None:
        raise ContextError("context_type 'custom' needs custom_context (a string or a list)")
    if not isinstance(custom_context, str | list):
        raise ContextError(
            f"custom_context must be a string or a list, not {type(custom_context).__name__}"
        )
    if len(custom_context) == 0:
        raise ContextError("custom_context is empty")
    chars = context_chars(custom_context)
    if chars > max_chars:
        raise ContextError(
            f"custom_context is {chars:,} characters, over the limit of {max_chars:,} "
            "(MEMCITY_MAX_CUSTOM_CONTEXT_CHARS)"
        )
    try:
        json.dumps(custom_context)
    except (TypeError, ValueError) as exc:
        raise ContextError(f"custom_context is not JSON-serialisable: {exc}") from exc
    items = len(custom_context) if isinstance(custom_context, list) else 1
    return GatheredContext("custom", custom_context, "custom", total_available=items)


def _ts(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "undated"


def memories(lake: Lake | str | Path, org_id: str, user_id: str) -> GatheredContext:
    """A user's most recent memories (at most 1,000), oldest first, one string each."""
    frame = read_rows(lake, "memories", scope_where("memories", org_id, user_id))
    if frame.is_empty():
        raise ContextError(f"user {user_id!r} of org {org_id!r} has no memories")
    total = frame.height
    frame = frame.sort("created_at", descending=True, nulls_last=True).head(MAX_MEMORIES)
    frame = frame.sort("created_at", nulls_last=True)
    items = [
        f"[{row['memory_id']} | {_ts(row['created_at'])}] {row['text']}"
        for row in frame.iter_rows(named=True)
    ]
    return GatheredContext(
        "memories",
        items,
        f"memories/{org_id}/{user_id}",
        total > MAX_MEMORIES,
        total,
        kept="most recent",
        unit="memories",
    )


def conversations(lake: Lake | str | Path, org_id: str, user_id: str) -> GatheredContext:
    """A user's most recent sessions (at most 50), oldest first, one transcript string each."""
    frame = read_rows(lake, "conversations", scope_where("conversations", org_id, user_id))
    if frame.is_empty():
        raise ContextError(f"user {user_id!r} of org {org_id!r} has no conversations")
    starts = (
        frame.group_by("session_id")
        .agg(pl.col("created_at").min().alias("started"))
        .sort(["started", "session_id"], descending=True, nulls_last=True)
    )
    total = starts.height
    chosen = starts.head(MAX_SESSIONS).sort(["started", "session_id"], nulls_last=True)
    items = []
    for session_id, started in chosen.iter_rows():
        turns = frame.filter(pl.col("session_id") == session_id).sort("turn")
        lines = [f"Session {session_id} ({_ts(started)})"]
        lines += [f"{r['role']}: {r['content']}" for r in turns.iter_rows(named=True)]
        items.append("\n".join(lines))
    return GatheredContext(
        "conversation",
        items,
        f"conversations/{org_id}/{user_id}",
        total > MAX_SESSIONS,
        total,
        kept="most recent",
        unit="conversation sessions",
    )


def documents(lake: Lake | str | Path, org_id: str, kb_id: str) -> GatheredContext:
    """A knowledge base's chunks (at most 5,000), enriched text when present, in order."""
    table, frame = "raw_documents", pl.DataFrame()
    for table in ("enriched_chunks", "chunks", "raw_documents"):
        frame = read_rows(lake, table, scope_where(table, org_id, kb_id))
        if frame.height:
            break
    if frame.is_empty():
        raise ContextError(f"knowledge base {kb_id!r} of org {org_id!r} has no documents")
    total = frame.height
    if table == "raw_documents":
        frame = frame.sort("document_id").head(MAX_CHUNKS)
        items = [
            f"[{row['document_id']} | {row['title'] or ''}]\n{row['text']}"
            for row in frame.iter_rows(named=True)
        ]
    else:
        frame = frame.sort(["document_id", "ordinal"]).head(MAX_CHUNKS)
        items = [_chunk_text(row) for row in frame.iter_rows(named=True)]
    return GatheredContext(
        "documents",
        items,
        f"{table}/{org_id}/{kb_id}",
        total > MAX_CHUNKS,
        total,
        unit="documents (by id)" if table == "raw_documents" else "chunks (in document order)",
    )


def _chunk_text(row: dict[str, Any]) -> str:
    """One chunk as `[document#ordinal | where] text` (the resolved text when enriched), where
    `where` is its header (title and section path), else its section title."""
    text = row.get("resolved_text") or row["text"]
    section = row.get("header") or row.get("section_title") or ""
    header = f"[{row['document_id']}#{row['ordinal']}" + (f" | {section}]" if section else "]")
    terms = row.get("key_terms")
    if terms:
        return f"{header}\n{text}\nKey terms: {', '.join(terms)}"
    return f"{header}\n{text}"
