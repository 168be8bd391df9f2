"""The table registry: every lake table's name, schema, scope, key and location, and the one
rule for "does this org, knowledge base or user exist".

Layout under the lake root (`MEMCITY_LAKE_URI`, default `$MEMCITY_HOME/lake`):

- knowledge-base tables: `<table>/<org>/<kb>.parquet` (raw_documents, document_structure,
  chunks, enriched_chunks, chunk_embeddings) and the BM25 folder `indexes/chunks_bm25/<org>/<kb>/`;
- user tables: `<table>/<org>/<user>.parquet` (memories, conversations, memory_embeddings) and
  `indexes/memories_bm25/<org>/<user>/`;
- sessions: `rlm_sessions/date=<YYYY-MM-DD>/<session_id>.parquet`, trajectories in
  `rlm_trajectories/<session_id>.jsonl`;
- bookkeeping, per knowledge base or user like the data: `ingestion_errors/<kind>/<org>/<scope>.parquet`,
  `_state/source_files/<kind>/<org>/<scope>.parquet`; and `ingestion_errors/layout.parquet` for
  landing paths that belong to no knowledge base or user.

Each knowledge base and each user is one Dagster partition, keyed `<org>/<kb>` or `<org>/<user>`
(`scope_key`, `parse_scope_key`); a partition's step reads and writes only its own files.

An org exists when any org-scoped table has a folder for it; a knowledge base (a user) when any
table of that scope has a file for it. Search, RLM context gathering and the CLI all ask
`require_scope`, so they agree, and say which lake they looked in.

The README's "Lake tables" section documents the same columns; keep the two in step.

This module stays whole: it is the registry, every schema of the lake in one place, as the
README's table section documents them.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa

from memcity_pipeline.lake.io import check_id

UTC_TS = pa.timestamp("us", tz="UTC")

SourceKind = Literal["documents", "memories", "conversations"]
SOURCE_KINDS: tuple[SourceKind, ...] = ("documents", "memories", "conversations")
Scope = Literal["knowledge_base", "user", "date", "lake"]

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
        (
            "source_key",
            pa.string(),
        ),  # hash of what the chunks were made from (text, sections, budget)
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
        ("sub_calls", pa.int64()),
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
    ]
)


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Table:
    """One lake table: its name (also its folder), schema, scope and key within a scope."""

    name: str
    schema: pa.Schema
    scope: Scope
    key: tuple[str, ...]

    def path(self, lake: Path, org_id: str, scope_id: str) -> Path:
        """The file of one knowledge base's or user's rows: `<name>/<org>/<scope>.parquet`."""
        if self.scope not in ("knowledge_base", "user"):
            raise ValueError(f"table {self.name!r} is not kept per knowledge base or user")
        return lake / self.name / org_id / f"{scope_id}.parquet"

    def scopes(self, lake: Path) -> list[tuple[str, str]]:
        """The (org, knowledge base or user) pairs that have a file of this table."""
        return sorted((p.parent.name, p.stem) for p in (lake / self.name).glob("*/*.parquet"))


def _table(name: str, schema: pa.Schema, scope: Scope, *key: str) -> Table:
    return Table(name, schema, scope, key)


TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        _table("raw_documents", RAW_DOCUMENTS, "knowledge_base", "document_id"),
        _table("document_structure", DOCUMENT_STRUCTURE, "knowledge_base", "document_id"),
        _table("chunks", CHUNKS, "knowledge_base", "chunk_id"),
        _table("enriched_chunks", ENRICHED_CHUNKS, "knowledge_base", "chunk_id"),
        _table("chunk_embeddings", EMBEDDINGS, "knowledge_base", "item_id"),
        _table("memories", MEMORIES, "user", "memory_id"),
        _table("conversations", CONVERSATIONS, "user", "session_id", "turn"),
        _table("memory_embeddings", EMBEDDINGS, "user", "item_id"),
        _table("rlm_sessions", RLM_SESSIONS, "date", "session_id"),
        _table("ingestion_errors", INGESTION_ERRORS, "lake", "kind", "path", "line", "reason"),
        _table("source_files", SOURCE_FILES, "lake", "path"),
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


def kb_table_path(lake: Path, name: str, org_id: str, scope_id: str) -> Path:
    """`<table>/<org>/<kb or user>.parquet` of a registered table."""
    return table(name).path(lake, org_id, scope_id)


def kb_partitions(lake: Path, name: str) -> list[tuple[str, str]]:
    """The (org, kb or user) pairs for which table `name` has a file."""
    return table(name).scopes(lake)


def source_table_path(lake: Path, kind: SourceKind, org_id: str, scope_id: str) -> Path:
    """`raw_documents/<org>/<kb>.parquet`, `memories/<org>/<user>.parquet`, ..."""
    return kb_table_path(lake, SOURCE_TABLES[kind], org_id, scope_id)


def source_files_path(lake: Path, kind: SourceKind, org_id: str, scope_id: str) -> Path:
    """Bookkeeping of the landing files one scope's source of `kind` was read from."""
    return lake / "_state" / "source_files" / kind / org_id / f"{scope_id}.parquet"


def ingestion_errors_path(lake: Path, kind: SourceKind, org_id: str, scope_id: str) -> Path:
    """The errors found in one knowledge base's (or user's) files of `kind`."""
    return lake / "ingestion_errors" / kind / org_id / f"{scope_id}.parquet"


def layout_errors_path(lake: Path) -> Path:
    """Landing paths that belong to no knowledge base or user (outside the layout)."""
    return lake / "ingestion_errors" / "layout.parquet"


def ingestion_error_files(lake: Path) -> list[Path]:
    """Every file of the `ingestion_errors` table (per scope, and the layout's)."""
    root = lake / "ingestion_errors"
    return sorted(root.glob("*/*/*.parquet")) + sorted(root.glob("layout.parquet"))


def bm25_dir(lake: Path, items: Literal["chunks", "memories"], org_id: str, scope_id: str) -> Path:
    """The BM25 index folder of one knowledge base (`items="chunks"`) or user (`"memories"`)."""
    return bm25_root(lake, items) / org_id / scope_id


def bm25_root(lake: Path, items: Literal["chunks", "memories"]) -> Path:
    """`indexes/chunks_bm25` or `indexes/memories_bm25`."""
    return lake / "indexes" / f"{items}_bm25"


def sessions_dir(lake: Path) -> Path:
    """Where `rlm_sessions` rows lie, one file per session under `date=<day>/`."""
    return lake / "rlm_sessions"


def trajectory_path(lake: Path, session_id: str) -> Path:
    """A session's trajectory (the rlms logger's JSONL)."""
    return lake / TRAJECTORIES_DIR / f"{session_id}.jsonl"


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


def known_orgs(lake: Path) -> list[str]:
    """Orgs that have data in any knowledge-base or user table."""
    found: set[str] = set()
    for t in _tables_of(None):
        folder = lake / t.name
        if folder.is_dir():
            found.update(p.name for p in folder.iterdir() if p.is_dir())
    return sorted(found)


def known_scopes(lake: Path, org_id: str, scope: ScopeKind) -> list[str]:
    """The knowledge bases (or users) of an org that have a file in any table of that scope."""
    return sorted(
        {p.stem for t in _tables_of(scope) for p in (lake / t.name / org_id).glob("*.parquet")}
    )


def require_scope(
    lake: Path,
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
