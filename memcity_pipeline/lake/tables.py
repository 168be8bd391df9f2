"""The table registry: every lake table's name, schema, scope, key, partition columns and
location, and the one rule for "does this org, knowledge base or user exist".

Every table is one Delta table under the lake root (`MEMCITY_LAKE_URI`, default
`$MEMCITY_HOME/lake`; a local folder or object storage), read and written by `lake.delta`:

- knowledge-base tables `<table>/` partitioned by `org_id` and `knowledge_base_id`
  (raw_documents, document_structure, chunks, enriched_chunks) or `org_id` and `scope_id`
  (chunk_embeddings);
- user tables partitioned by `org_id` and `user_id` (memories, conversations) or `org_id` and
  `scope_id` (memory_embeddings);
- `rlm_sessions/` partitioned by `org_id` and `date` (the session's UTC day);
- bookkeeping, partitioned by `org_id` and `scope_id` like the data, each row naming its `kind`:
  `ingestion_errors/` (landing paths outside the layout have a null org and scope) and
  `_state/source_files/`.

Beside the tables, plain files: the BM25 index folders `indexes/chunks_bm25/<org>/<kb>/` and
`indexes/memories_bm25/<org>/<user>/`, and trajectories `rlm_trajectories/<session_id>.jsonl`.

Each knowledge base and each user is one Dagster partition, keyed `<org>/<kb>` or `<org>/<user>`
(`scope_key`, `parse_scope_key`); a partition's step reads and writes only its own partition of
each table.

An org exists when any knowledge-base or user table has a partition for it; a knowledge base (a
user) when any table of that scope has one. Search, RLM context gathering and the CLI all ask
`require_scope`, so they agree, and say which lake they looked in.

The README's "Lake tables" section documents the same columns; keep the two in step.

This module stays whole: it is the registry, every schema of the lake in one place, as the
README's table section documents them.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa

from memcity_pipeline.lake.io import check_id
from memcity_pipeline.lake.location import Lake

UTC_TS = pa.timestamp("us", tz="UTC")

SourceKind = Literal["documents", "memories", "conversations"]
SOURCE_KINDS: tuple[SourceKind, ...] = ("documents", "memories", "conversations")
Scope = Literal["knowledge_base", "user", "date", "lake"]
Where = Mapping[str, str | None]
"""Equalities (None: is null) that select a partition's rows of a table."""

RAW_DOCUMENTS = pa.schema(
    [
        ("org_id", pa.string()),
        ("knowledge_base_id", pa.string()),
        ("document_id", pa.string()),  # stable: from the file path (and record id/position)
        ("source_path", pa.string()),  # relative to the landing folder
        ("format", pa.string()),  # txt | md | html | pdf | json | jsonl
        ("title", pa.string()),
        ("text", pa.large_string()),  # UTF-8, normalised
        ("char_count", pa.int64()),
        ("content_hash", pa.string()),  # sha256 of `text`
        ("metadata", pa.string()),  # JSON object
        ("ingested_at", UTC_TS),
    ]
)

MEMORIES = pa.schema(
    [
        ("org_id", pa.string()),
        ("user_id", pa.string()),
        ("memory_id", pa.string()),
        ("text", pa.large_string()),
        ("created_at", UTC_TS),
        ("metadata", pa.string()),
        ("source_path", pa.string()),
        ("line", pa.int64()),
        ("content_hash", pa.string()),
        ("ingested_at", UTC_TS),
    ]
)

CONVERSATIONS = pa.schema(
    [
        ("org_id", pa.string()),
        ("user_id", pa.string()),
        ("session_id", pa.string()),
        ("turn", pa.int64()),
        ("role", pa.string()),
        ("content", pa.large_string()),
        ("created_at", UTC_TS),
        ("source_path", pa.string()),
        ("line", pa.int64()),
        ("content_hash", pa.string()),
        ("ingested_at", UTC_TS),
    ]
)

INGESTION_ERRORS = pa.schema(
    [
        ("kind", pa.string()),  # documents | memories | conversations | null (outside the layout)
        ("org_id", pa.string()),
        ("scope_id", pa.string()),  # knowledge base or user
        ("path", pa.string()),  # relative to the landing folder
        ("line", pa.int64()),  # 1-based JSONL line, null for whole-file errors
        ("reason", pa.string()),
        ("content_hash", pa.string()),  # sha256 of the file when it could be read
        ("detected_at", UTC_TS),
    ]
)

# Bookkeeping of what was ingested from which file, so unchanged files cost nothing.
SOURCE_FILES = pa.schema(
    [
        ("kind", pa.string()),  # documents | memories | conversations
        ("org_id", pa.string()),
        ("scope_id", pa.string()),
        ("path", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("content_hash", pa.string()),
        ("status", pa.string()),  # ok | error
        ("rows", pa.int64()),
    ]
)

ENTITY = pa.struct(
    [
        ("name", pa.string()),
        ("type", pa.string()),
        ("aliases", pa.list_(pa.string())),
        ("description", pa.string()),
    ]
)
RELATIONSHIP = pa.struct(
    [("source", pa.string()), ("relation", pa.string()), ("target", pa.string())]
)
SECTION = pa.struct([("title", pa.string()), ("start", pa.int64()), ("end", pa.int64())])

DOCUMENT_STRUCTURE = pa.schema(
    [
        ("org_id", pa.string()),
        ("knowledge_base_id", pa.string()),
        ("document_id", pa.string()),
        ("title", pa.string()),
        ("content_hash", pa.string()),  # of the document text this structure was made from
        ("summary", pa.string()),  # at most 2,000 characters; empty when enrichment is off
        ("entities", pa.list_(ENTITY)),
        ("relationships", pa.list_(RELATIONSHIP)),
        ("sections", pa.list_(SECTION)),  # tile the text: [start, end) character offsets
        ("method", pa.string()),  # llm | llm-rlm | llm-windowed | headings
        ("status", pa.string()),  # ok | failed (sections then come from headings)
        ("error", pa.string()),
        ("model", pa.string()),
        ("llm_calls", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        ("structured_at", UTC_TS),
        ("attempts", pa.int64()),  # runs that tried the LLM on this text and model (null: 1)
    ]
)

CHUNKS = pa.schema(
    [
        ("org_id", pa.string()),
        ("knowledge_base_id", pa.string()),
        ("document_id", pa.string()),
        ("chunk_id", pa.string()),  # stable: hash of document id, offsets and text
        ("ordinal", pa.int64()),  # position in the document, from 0
        ("section_title", pa.string()),
        ("start", pa.int64()),  # character offsets into raw_documents.text
        ("end", pa.int64()),
        ("text", pa.large_string()),
        ("token_count", pa.int64()),
        ("source_key", pa.string()),  # hash of what the chunks were made from
        ("header", pa.string()),  # "Title › Section › Subsection": heads the indexed text
    ]
)

ENRICHED_CHUNKS = pa.schema(
    [
        ("org_id", pa.string()),
        ("knowledge_base_id", pa.string()),
        ("document_id", pa.string()),
        ("chunk_id", pa.string()),
        ("ordinal", pa.int64()),
        ("section_title", pa.string()),
        ("start", pa.int64()),
        ("end", pa.int64()),
        ("text", pa.large_string()),  # the original chunk text
        ("resolved_text", pa.large_string()),  # pronouns resolved; null unless enriched
        ("key_terms", pa.list_(pa.string())),
        ("summary", pa.string()),
        ("entities", pa.list_(pa.string())),
        ("enrichment_status", pa.string()),  # enriched | failed | off
        ("enrichment_error", pa.string()),
        ("model", pa.string()),
        ("context_key", pa.string()),  # hash of chunk text + document summary/entities + model
        ("llm_calls", pa.float64()),  # a batched call counts 1/len(batch) per chunk
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        ("enriched_at", UTC_TS),
        ("header", pa.string()),  # the chunk's header (chunks.header)
        ("attempts", pa.int64()),  # runs that tried the LLM on this context_key (null: 1)
    ]
)


EMBEDDINGS = pa.schema(
    [
        ("org_id", pa.string()),
        ("scope_id", pa.string()),  # knowledge base or user
        ("item_id", pa.string()),  # chunk_id or memory_id
        ("text_hash", pa.string()),  # sha256 of the embedded text
        ("model", pa.string()),
        ("dimension", pa.int32()),
        ("vector", pa.list_(pa.float32())),
    ]
)

RLM_SESSIONS = pa.schema(
    [
        ("session_id", pa.string()),
        ("org_id", pa.string()),
        ("user_id", pa.string()),
        ("knowledge_base_id", pa.string()),
        ("query", pa.large_string()),
        ("context_type", pa.string()),  # memories | documents | conversation | custom
        ("context_chars", pa.int64()),
        ("context_items", pa.int64()),
        ("backend", pa.string()),  # sandbox backend: local | daytona
        ("runtime", pa.string()),  # requested: python | bun
        ("runtime_used", pa.string()),  # what ran (python), null when nothing ran
        ("runtime_fallback_reason", pa.string()),
        ("root_model", pa.string()),
        ("sub_model", pa.string()),
        ("iterations", pa.int64()),
        ("depth_reached", pa.int64()),  # deepest RLM level that ran (1: the root alone)
        ("sub_calls", pa.int64()),
        ("search_calls", pa.int64()),  # `search` calls of the sandboxed code
        ("sub_call_cache_hits", pa.int64()),  # sub-calls served by the LLM cache
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cost_usd", pa.float64()),  # null when the provider reports no cost
        ("execution_time_s", pa.float64()),
        ("status", pa.string()),  # completed | partial | failed | timeout
        ("warning", pa.string()),
        ("error_message", pa.string()),
        ("answer_chars", pa.int64()),
        ("trajectory_path", pa.string()),
        ("started_at", UTC_TS),
        ("ended_at", UTC_TS),
        ("date", pa.string()),  # YYYY-MM-DD of started_at (UTC): the partition
    ]
)


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Table:
    """One lake table: its name, schema, scope, key within a partition, the columns it is
    partitioned by (org first, then knowledge base, user, scope or day), its folder under the
    lake root and the order its rows are read in."""

    name: str
    schema: pa.Schema
    scope: Scope
    key: tuple[str, ...]
    partition_by: tuple[str, str]
    order_by: tuple[str, ...] = ()
    folder: str = ""
    bucket_by: str | None = None

    @property
    def storage_partitions(self) -> list[str]:
        """The Delta table's partition columns: `partition_by`, then `bucket` for a table
        spread over `BUCKETS` files per partition by a hash of `bucket_by`."""
        return [*self.partition_by, *([BUCKET] if self.bucket_by else [])]

    @property
    def storage_schema(self) -> pa.Schema:
        """The schema of the Delta table: `schema`, plus `bucket` for a bucketed table."""
        return self.schema.append(pa.field(BUCKET, pa.int32())) if self.bucket_by else self.schema

    def uri(self, lake: "Lake | str | Path") -> str:
        """Where the Delta table lies: `<lake>/<folder>`."""
        return Lake.of(lake).join(self.folder or self.name)

    def scope_where(self, org_id: str, scope_id: str) -> dict[str, str | None]:
        """The partition of one org's knowledge base, user, scope or day."""
        return {self.partition_by[0]: org_id, self.partition_by[1]: scope_id}


BUCKET = "bucket"
BUCKETS = 32
"""A large table's partition is spread over this many files by a stable hash of one column
(`Table.bucket_by`: the document, chunk, memory or session), so that editing one document
rewrites about 1/32 of its knowledge base's files, not all of them (delta-rs rewrites each file
that holds a changed row whole)."""

KB = ("org_id", "knowledge_base_id")
USER = ("org_id", "user_id")
SCOPED = ("org_id", "scope_id")

TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table(
            "raw_documents",
            RAW_DOCUMENTS,
            "knowledge_base",
            ("document_id",),
            KB,
            ("source_path", "document_id"),
            bucket_by="document_id",
        ),
        Table(
            "document_structure",
            DOCUMENT_STRUCTURE,
            "knowledge_base",
            ("document_id",),
            KB,
            ("document_id",),
            bucket_by="document_id",
        ),
        Table(
            "chunks",
            CHUNKS,
            "knowledge_base",
            ("chunk_id",),
            KB,
            ("document_id", "ordinal"),
            bucket_by="document_id",
        ),
        Table(
            "enriched_chunks",
            ENRICHED_CHUNKS,
            "knowledge_base",
            ("chunk_id",),
            KB,
            ("document_id", "ordinal"),
            bucket_by="document_id",
        ),
        Table(
            "chunk_embeddings",
            EMBEDDINGS,
            "knowledge_base",
            ("item_id",),
            SCOPED,
            ("item_id",),
            bucket_by="item_id",
        ),
        Table(
            "memories",
            MEMORIES,
            "user",
            ("memory_id",),
            USER,
            ("source_path", "line"),
            bucket_by="memory_id",
        ),
        Table(
            "conversations",
            CONVERSATIONS,
            "user",
            ("session_id", "turn"),
            USER,
            ("source_path", "line"),
            bucket_by="session_id",
        ),
        Table(
            "memory_embeddings",
            EMBEDDINGS,
            "user",
            ("item_id",),
            SCOPED,
            ("item_id",),
            bucket_by="item_id",
        ),
        Table(
            "rlm_sessions",
            RLM_SESSIONS,
            "date",
            ("session_id",),
            ("org_id", "date"),
            ("started_at", "session_id"),
        ),
        Table(
            "ingestion_errors",
            INGESTION_ERRORS,
            "lake",
            ("kind", "path", "line", "reason"),
            SCOPED,
            ("path", "line"),
        ),
        Table(
            "source_files",
            SOURCE_FILES,
            "lake",
            ("kind", "path"),
            SCOPED,
            ("path",),
            "_state/source_files",
        ),
    )
}

SOURCE_TABLES: dict[SourceKind, str] = {
    "documents": "raw_documents",
    "memories": "memories",
    "conversations": "conversations",
}
SOURCE_SCHEMAS: dict[SourceKind, pa.Schema] = {
    kind: TABLES[name].schema for kind, name in SOURCE_TABLES.items()
}
KB_TABLE_SCHEMAS: dict[str, pa.Schema] = {
    name: t.schema for name, t in TABLES.items() if t.scope == "knowledge_base"
}
TRAJECTORIES_DIR = "rlm_trajectories"


def table(name: str) -> Table:
    """The registered table `name` (KeyError names the known ones)."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"no lake table {name!r}; known: {', '.join(TABLES)}") from None


def scope_where(name: str, org_id: str, scope_id: str) -> dict[str, str | None]:
    """The partition of table `name` that holds one knowledge base's (or user's) rows."""
    return table(name).scope_where(org_id, scope_id)


def bookkeeping_where(kind: SourceKind, org_id: str, scope_id: str) -> dict[str, str | None]:
    """The rows of `source_files` and `ingestion_errors` of one scope's sources of `kind`."""
    return {"org_id": org_id, "scope_id": scope_id, "kind": kind}


LAYOUT_ERRORS: dict[str, str | None] = {"scope_id": None}
"""The `ingestion_errors` rows of landing paths that belong to no knowledge base or user."""


def bm25_prefix(items: Literal["chunks", "memories"], org_id: str, scope_id: str) -> str:
    """The lake-relative folder of one knowledge base's (`items="chunks"`) or user's
    (`"memories"`) BM25 index."""
    return f"{bm25_root(items)}/{org_id}/{scope_id}"


BM25_POINTER = "CURRENT"
"""The object in a BM25 index folder that names its current build (`search.bm25_store`)."""


def bm25_root(items: Literal["chunks", "memories"]) -> str:
    """`indexes/chunks_bm25` or `indexes/memories_bm25`."""
    return f"indexes/{items}_bm25"


def trajectory_key(session_id: str) -> str:
    """A session's trajectory (the rlms logger's JSONL), relative to the lake root."""
    return f"{TRAJECTORIES_DIR}/{session_id}.jsonl"


# ---------------------------------------------------------------- what exists


PARTITIONS: dict[str, str] = {"knowledge_base": "knowledge_bases", "user": "users"}
"""The Dagster partitions definition of each scope kind."""


def scope_key(org_id: str, scope_id: str) -> str:
    """The partition key of a knowledge base or user: `<org>/<kb or user>`."""
    return f"{org_id}/{scope_id}"


def parse_scope_key(key: str) -> tuple[str, str]:
    """`(org, kb or user)` of a partition key; ValueError when it is not `<org>/<id>`."""
    org, sep, scope_id = key.partition("/")
    if not sep:
        raise ValueError(f"invalid partition key {key!r}: expected <org>/<knowledge base or user>")
    return check_id("org id", org), check_id("id", scope_id)


class UnknownScopeError(ValueError):
    """An org, knowledge base or user that the lake has no data for (or an invalid id)."""


ScopeKind = Literal["knowledge_base", "user"]
KINDS_OF_SCOPE: dict[ScopeKind, tuple[SourceKind, ...]] = {
    "knowledge_base": ("documents",),
    "user": ("memories", "conversations"),
}
SCOPE_OF_KIND: dict[SourceKind, ScopeKind] = {
    kind: scope for scope, kinds in KINDS_OF_SCOPE.items() for kind in kinds
}
_SCOPE_WORDS = {"knowledge_base": "knowledge base", "user": "user"}


def _tables_of(scope: ScopeKind | None) -> list[Table]:
    return [
        t
        for t in TABLES.values()
        if (t.scope == scope if scope else t.scope in ("knowledge_base", "user"))
    ]


def _partitions(lake: "Lake | str | Path", tables: list[Table]) -> set[tuple[str, str]]:
    from memcity_pipeline.lake.delta import partitions

    found: set[tuple[str, str]] = set()
    for t in tables:
        for p in partitions(lake, t.name):
            org, scope_id = p[t.partition_by[0]], p[t.partition_by[1]]
            if org and scope_id:
                found.add((org, scope_id))
    return found


def known_orgs(lake: "Lake | str | Path") -> list[str]:
    """Orgs that have data in any knowledge-base or user table."""
    return sorted({org for org, _ in _partitions(lake, _tables_of(None))})


def known_scopes(lake: "Lake | str | Path", org_id: str, scope: ScopeKind) -> list[str]:
    """The knowledge bases (or users) of an org that have rows in any table of that scope."""
    return sorted({s for org, s in _partitions(lake, _tables_of(scope)) if org == org_id})


def table_scopes(lake: "Lake | str | Path", name: str) -> list[tuple[str, str]]:
    """The (org, knowledge base or user) pairs for which table `name` holds rows."""
    return sorted(_partitions(lake, [table(name)]))


def require_scope(
    lake: "Lake | str | Path",
    org_id: str,
    scope: ScopeKind | None = None,
    scope_id: str | None = None,
    *,
    id_names: tuple[str, str] = ("org id", "id"),
) -> None:
    """UnknownScopeError unless `org_id` (and, with `scope`, `scope_id`) has data in the lake.

    The message names what is unknown, what is known, and the lake it looked in. `id_names`
    are the words for the ids in an invalid-id message (e.g. `("org_id", "user_id")`).
    """
    try:
        check_id(id_names[0], org_id)
        if scope is not None:
            check_id(id_names[1], scope_id or "")
    except ValueError as exc:
        raise UnknownScopeError(str(exc)) from None
    if org_id not in known_orgs(lake):
        orgs = known_orgs(lake)
        hint = f"known orgs: {', '.join(orgs)}" if orgs else "the lake has no data yet"
        raise UnknownScopeError(
            f"unknown org {org_id!r} in the lake at {lake} ({hint}); ingest its data first"
        )
    if scope is None:
        return
    names = known_scopes(lake, org_id, scope)
    if scope_id not in names:
        word = _SCOPE_WORDS[scope]
        plural = "knowledge bases" if scope == "knowledge_base" else "users"
        hint = f"known {plural}: {', '.join(names)}" if names else f"the org has no {plural}"
        raise UnknownScopeError(f"unknown {word} {scope_id!r} in org {org_id!r} ({hint})")
