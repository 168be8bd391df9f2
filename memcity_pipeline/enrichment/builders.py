"""Incremental table builders of the enrichment phases, one knowledge base at a time.

Each builder takes the upstream rows and the table as it stands, reuses every row whose inputs
did not change (same document content, same sections, same model, same context: a fingerprint
compared by `lake.reconcile.plan_rows`), recomputes the rest, and returns the new table and what
it did. Documents that left the upstream table drop out. `StageStats.changed` says whether the
table needs writing at all.

A row whose LLM answer failed is retried by the next runs, a bounded number of times
(`enrichment.retries`).
"""

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl
import pyarrow as pa

from memcity_pipeline.enrichment.chunking import (
    CHUNKING_VERSION,
    Section,
    chunk_document,
    heading_sections,
)
from memcity_pipeline.enrichment.enrich import ChunkEnrichment
from memcity_pipeline.enrichment.retries import given_up, prior_attempts
from memcity_pipeline.enrichment.structure import DocumentStructure, EntityOut, headings_structure
from memcity_pipeline.lake.reconcile import plan_rows
from memcity_pipeline.lake.tables import CHUNKS, DOCUMENT_STRUCTURE, ENRICHED_CHUNKS
from memcity_pipeline.llm.usage import Usage
from memcity_pipeline.progress import NoProgress, ProgressLog

Structurer = Callable[[str, str], DocumentStructure]  # (title, text) -> structure
Enricher = Callable[[str, str, list[EntityOut], list[str]], list[ChunkEnrichment]]


@dataclass
class StageStats:
    """What a builder did, summed over knowledge bases by the asset."""

    documents: int = 0
    processed: int = 0
    reused: int = 0
    dropped: int = 0  # rows of the old table that are gone or replaced
    rows: int = 0
    failures: int = 0
    usage: Usage = field(default_factory=Usage)
    per_document: list[dict[str, Any]] = field(default_factory=list)
    failure_reasons: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether the table's content changed (something computed or dropped)."""
        return self.processed > 0 or self.dropped > 0

    def merge(self, other: "StageStats") -> None:
        for name in ("documents", "processed", "reused", "dropped", "rows", "failures"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.usage = self.usage + other.usage
        self.per_document += other.per_document
        self.failure_reasons += other.failure_reasons


def _sha(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def _frame(rows: list[dict[str, Any]], schema: pa.Schema) -> pl.DataFrame:
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=schema))  # type: ignore[return-value]


def _ordered(
    parts: list[pl.DataFrame], order: pl.DataFrame, key: str, schema: pa.Schema, *by: str
) -> pl.DataFrame:
    """`parts` as one frame of `schema`, in the order of `order[key]` (then `by`)."""
    frames = [p.select(schema.names) for p in parts if p.height]
    if not frames:
        return _frame([], schema)
    combined = pl.concat(
        [pl.from_arrow(f.to_arrow().cast(schema)) for f in frames],  # type: ignore[misc]
        how="vertical",
    )
    position = order.select(key).unique(maintain_order=True).with_row_index("_position")
    return combined.join(position, on=key, how="left").sort(["_position", *by]).drop("_position")  # type: ignore[return-value]


def _usage_of(row: dict[str, Any]) -> Usage:
    return Usage.of_columns(row)


# ---------------------------------------------------------------- phase 1: document_structure


def build_document_structure(
    docs: pl.DataFrame,
    existing: pl.DataFrame,
    *,
    enrichment: str,
    model: str | None,
    structurer: Structurer | None,
    max_workers: int = 4,
    progress: ProgressLog | None = None,
    max_attempts: int = 3,
) -> tuple[pl.DataFrame, StageStats]:
    """One row per document: summary, entities, relationships, sections. `progress` counts the
    documents structured now."""
    stats = StageStats(documents=docs.height)
    want_method = "headings" if enrichment == "off" else "llm"
    same_model = pl.col("model").eq_missing(model)
    failed = (pl.col("status") == "failed") & same_model
    reusable = (pl.col("status") == "ok") & pl.col("method").str.starts_with(want_method)
    if enrichment != "off":
        reusable = (reusable & same_model) | given_up(failed, max_attempts)
    plan = plan_rows(
        docs, existing, key="document_id", fingerprint="content_hash", reusable=reusable
    )
    tried = prior_attempts(existing, failed, plan.todo, "document_id", "content_hash")
    # A kept row takes the document's current title.
    reused = plan.reuse.drop("title").join(
        docs.select("document_id", "title"), on="document_id", how="left"
    )
    stats.reused, stats.dropped = reused.height, plan.dropped

    def work(doc: dict[str, Any]) -> dict[str, Any]:
        now = datetime.now(UTC)
        error = None
        if enrichment == "off" or structurer is None:
            result, status = headings_structure(doc["text"]), "ok"
        else:
            try:
                result, status = structurer(doc["title"], doc["text"]), "ok"
            except Exception as exc:
                result, status = headings_structure(doc["text"]), "failed"
                error = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
        return {
            "org_id": doc["org_id"],
            "knowledge_base_id": doc["knowledge_base_id"],
            "document_id": doc["document_id"],
            "title": doc["title"],
            "content_hash": doc["content_hash"],
            "summary": result.summary,
            "entities": [e.model_dump() for e in result.entities],
            "relationships": [r.model_dump() for r in result.relationships],
            "sections": [
                {"title": s.title, "start": s.start, "end": s.end} for s in result.sections
            ],
            "method": result.method,
            "status": status,
            "error": error,
            "model": None if enrichment == "off" else model,
            **result.usage.as_columns(),
            "structured_at": now,
            "attempts": tried.get(doc["document_id"], 0) + 1,
        }

    progress = progress or NoProgress()
    progress.begin(plan.todo.height)
    computed: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        for row in pool.map(work, plan.todo.to_dicts()):
            progress.advance()
            computed.append(row)
            stats.processed += 1
            stats.usage = stats.usage + _usage_of(row)
            if row["status"] == "failed":
                stats.failures += 1
                stats.failure_reasons.append(f"{row['title']}: {row['error']}")
            stats.per_document.append(
                {
                    "title": row["title"],
                    "method": row["method"],
                    "status": row["status"],
                    "sections": len(row["sections"]),
                    "entities": len(row["entities"]),
                    **_usage_of(row).as_columns(),
                }
            )
    frame = _ordered(
        [reused, _frame(computed, DOCUMENT_STRUCTURE)], docs, "document_id", DOCUMENT_STRUCTURE
    )
    stats.rows = frame.height
    return frame, stats


def sections_of(row: dict[str, Any]) -> list[Section]:
    return [Section(s["title"], s["start"], s["end"]) for s in row["sections"] or []]


def entities_of(row: dict[str, Any]) -> list[EntityOut]:
    return [EntityOut(**e) for e in row["entities"] or []]


# ---------------------------------------------------------------- phase 2: chunks


def build_chunks(
    docs: pl.DataFrame,
    structure: pl.DataFrame,
    existing: pl.DataFrame,
    *,
    max_tokens: int,
    overlap_tokens: int,
    count: Callable[[str], int] | None = None,
) -> tuple[pl.DataFrame, StageStats]:
    """Chunks of every document, cut at phase 1's sections (or headings) within a token budget."""
    stats = StageStats(documents=docs.height)
    sections_by_doc = {
        r["document_id"]: sections_of(r)
        for r in structure.select("document_id", "sections").iter_rows(named=True)
    }
    budget = f"{max_tokens}/{overlap_tokens}/{CHUNKING_VERSION}"
    # What a document's chunks are made from: its text, its sections and the budget.
    wanted = docs.with_columns(
        pl.Series(
            "source_key",
            [
                _sha(
                    h,
                    json.dumps([(s.title, s.start, s.end) for s in sections_by_doc.get(d, [])]),
                    budget,
                )
                for d, h in zip(docs["document_id"], docs["content_hash"], strict=True)
            ],
            dtype=pl.String,
        )
    )
    plan = plan_rows(
        wanted, existing, key="document_id", fingerprint="source_key", row_key="chunk_id"
    )
    stats.reused = plan.reuse["document_id"].n_unique() if plan.reuse.height else 0
    stats.dropped = plan.dropped
    kw: dict[str, Any] = {"max_tokens": max_tokens, "overlap_tokens": overlap_tokens}
    if count is not None:
        kw["count"] = count
    out: list[dict[str, Any]] = []
    for doc in plan.todo.iter_rows(named=True):
        stats.processed += 1
        sections = sections_by_doc.get(doc["document_id"]) or heading_sections(
            doc["text"], doc["title"]
        )
        for c in chunk_document(doc["text"], sections, title=doc["title"], **kw):
            out.append(
                {
                    "org_id": doc["org_id"],
                    "knowledge_base_id": doc["knowledge_base_id"],
                    "document_id": doc["document_id"],
                    "chunk_id": "chk_"
                    + _sha(doc["document_id"], str(c.start), str(c.end), c.text)[:24],
                    "ordinal": c.ordinal,
                    "section_title": c.section_title,
                    "start": c.start,
                    "end": c.end,
                    "text": c.text,
                    "token_count": c.token_count,
                    "header": c.header,
                    "source_key": doc["source_key"],
                }
            )
    frame = _ordered([plan.reuse, _frame(out, CHUNKS)], docs, "document_id", CHUNKS, "ordinal")
    stats.rows = frame.height
    return frame, stats


# ---------------------------------------------------------------- phase 3: enriched_chunks


def build_enriched_chunks(
    chunks: pl.DataFrame,
    structure: pl.DataFrame,
    existing: pl.DataFrame,
    *,
    enrichment: str,
    model: str | None,
    enricher: Enricher | None,
    max_workers: int = 4,
    progress: ProgressLog | None = None,
    max_attempts: int = 3,
) -> tuple[pl.DataFrame, StageStats]:
    """Every chunk with resolved text, key terms, summary and entities (or a failure reason).
    `progress` counts the chunks enriched now (a document's at a time)."""
    stats = StageStats(documents=chunks["document_id"].n_unique() if chunks.height else 0)
    struct = {r["document_id"]: r for r in structure.iter_rows(named=True)}
    # A chunk's enrichment depends on its text and on its document's summary and entities.
    doc_context = {
        doc_id: _sha(
            (srow := struct.get(doc_id) or {}).get("summary") or "",
            json.dumps(srow.get("entities") or [], sort_keys=True, default=str),
            enrichment,
            model or "",
        )
        for doc_id in (chunks["document_id"].unique().to_list() if chunks.height else [])
    }
    wanted = chunks.with_columns(
        pl.Series(
            "context_key",
            [
                _sha(text, doc_context[doc])
                for text, doc in zip(chunks["text"], chunks["document_id"], strict=True)
            ],
            dtype=pl.String,
        )
    )
    failed = pl.col("enrichment_status") == "failed"
    plan = plan_rows(
        wanted,
        existing,
        key="chunk_id",
        fingerprint="context_key",
        reusable=pl.col("enrichment_status").is_in(["enriched", "off"])
        | given_up(failed, max_attempts),
    )
    tried = prior_attempts(existing, failed, plan.todo, "chunk_id", "context_key")
    # A kept row takes the chunk's current position and header (not inputs of the LLM).
    reused = plan.reuse.drop("ordinal", "header").join(
        chunks.select("chunk_id", "ordinal", "header"), on="chunk_id", how="left"
    )
    stats.reused, stats.dropped = reused.height, plan.dropped
    jobs = [
        (struct.get(doc_id[0]) or {}, group.to_dicts())
        for doc_id, group in plan.todo.group_by("document_id", maintain_order=True)
    ]

    def work(job: tuple[dict[str, Any], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        srow, todo = job
        now = datetime.now(UTC)
        if enrichment == "off" or enricher is None:
            outcomes = [ChunkEnrichment("off") for _ in todo]
        else:
            try:
                outcomes = enricher(
                    srow.get("title") or "",
                    srow.get("summary") or "",
                    entities_of(srow) if srow else [],
                    [r["text"] for r in todo],
                )
            except Exception as exc:  # the enricher itself broke: every chunk keeps its text
                reason = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
                outcomes = [ChunkEnrichment("failed", error=reason) for _ in todo]
        return [
            {
                **{k: r[k] for k in ("org_id", "knowledge_base_id", "document_id", "chunk_id")},
                **{k: r[k] for k in ("ordinal", "section_title", "header", "start", "end")},
                "text": r["text"],
                "resolved_text": o.resolved_text,
                "key_terms": o.key_terms,
                "summary": o.summary,
                "entities": o.entities,
                "enrichment_status": o.status,
                "enrichment_error": o.error,
                "model": None if enrichment == "off" else model,
                "context_key": r["context_key"],
                **o.usage.as_columns(),
                "enriched_at": now,
                "attempts": tried.get(r["chunk_id"], 0) + 1,
            }
            for r, o in zip(todo, outcomes, strict=True)
        ]

    progress = progress or NoProgress()
    progress.begin(plan.todo.height)
    computed: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        for (srow, _), rows in zip(jobs, pool.map(work, jobs), strict=True):
            progress.advance(len(rows))
            doc = StageStats(processed=len(rows))
            for row in rows:
                doc.usage = doc.usage + _usage_of(row)
                if row["enrichment_status"] == "failed":
                    doc.failures += 1
                    doc.failure_reasons.append(row["enrichment_error"])
            doc.per_document.append(
                {
                    "title": srow.get("title") or rows[0]["document_id"],
                    "chunks": len(rows),
                    "failed": doc.failures,
                    **doc.usage.as_columns(),
                    "llm_calls": round(doc.usage.calls, 2),
                }
            )
            computed.extend(rows)
            stats.merge(doc)
    frame = _ordered(
        [reused, _frame(computed, ENRICHED_CHUNKS)],
        chunks,
        "chunk_id",
        ENRICHED_CHUNKS,
    )
    stats.rows = frame.height
    return frame, stats
