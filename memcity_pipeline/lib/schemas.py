"""Arrow schemas of the lake's tables, and where each table lives under the lake root.

The README's "Lake tables" section documents the same columns; keep the two in step.
"""

from pathlib import Path

import pyarrow as pa

from memcity_pipeline.lib.landing import SourceKind

UTC_TS = pa.timestamp("us", tz="UTC")

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

SOURCE_SCHEMAS: dict[SourceKind, pa.Schema] = {
    "documents": RAW_DOCUMENTS,
    "memories": MEMORIES,
    "conversations": CONVERSATIONS,
}

SOURCE_TABLES: dict[SourceKind, str] = {
    "documents": "raw_documents",
    "memories": "memories",
    "conversations": "conversations",
}


def source_table_path(lake: Path, kind: SourceKind, org_id: str, scope_id: str) -> Path:
    """`raw_documents/<org>/<kb>.parquet`, `memories/<org>/<user>.parquet`, ..."""
    return lake / SOURCE_TABLES[kind] / org_id / f"{scope_id}.parquet"


def source_files_path(lake: Path, kind: SourceKind) -> Path:
    return lake / "_state" / f"source_files_{kind}.parquet"


def ingestion_errors_path(lake: Path, kind: SourceKind | None) -> Path:
    return lake / "ingestion_errors" / f"{kind or 'layout'}.parquet"


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


def kb_table_path(lake: Path, table: str, org_id: str, kb_id: str) -> Path:
    """`<table>/<org>/<kb>.parquet`: every knowledge-base-scoped table of the lake."""
    return lake / table / org_id / f"{kb_id}.parquet"


def kb_partitions(lake: Path, table: str) -> list[tuple[str, str]]:
    """The (org, kb) pairs for which `table` has a file."""
    return sorted((p.parent.name, p.stem) for p in (lake / table).glob("*/*.parquet"))


KB_TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "raw_documents": RAW_DOCUMENTS,
    "document_structure": DOCUMENT_STRUCTURE,
    "chunks": CHUNKS,
    "enriched_chunks": ENRICHED_CHUNKS,
}
