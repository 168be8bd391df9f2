"""Incremental table builders of the enrichment phases, one knowledge base at a time.

Each builder takes the upstream rows and the table as it stands, reuses every row whose inputs
did not change (same document content, same sections, same model, same context), recomputes
the rest, and returns the new table and what it did. Documents that left the upstream table
drop out. A failed row is always recomputed on the next run.
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

from memcity_pipeline.enrichment.chunking import Section, chunk_document, heading_sections
from memcity_pipeline.enrichment.enrich import ChunkEnrichment
from memcity_pipeline.enrichment.structure import DocumentStructure, EntityOut, headings_structure
from memcity_pipeline.lake.tables import CHUNKS, DOCUMENT_STRUCTURE, ENRICHED_CHUNKS

Structurer = Callable[[str, str], DocumentStructure]  # (title, text) -> structure
Enricher = Callable[[str, str, list[EntityOut], list[str]], list[ChunkEnrichment]]


@dataclass
class StageStats:
    """What a builder did, summed over knowledge bases by the asset."""

    documents: int = 0
    processed: int = 0
    reused: int = 0
    rows: int = 0
    failures: int = 0
    llm_calls: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    per_document: list[dict[str, Any]] = field(default_factory=list)
    failure_reasons: list[str] = field(default_factory=list)

    def add_cost(self, cost: float | None) -> None:
        if cost is not None:
            self.cost_usd = (self.cost_usd or 0.0) + cost

    def merge(self, other: "StageStats") -> None:
        for name in ("documents", "processed", "reused", "rows", "failures", "llm_calls"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.add_cost(other.cost_usd)
        self.per_document += other.per_document
        self.failure_reasons += other.failure_reasons


def _sha(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def _frame(rows: list[dict[str, Any]], schema: pa.Schema) -> pl.DataFrame:
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=schema))  # type: ignore[return-value]


def _by_key(frame: pl.DataFrame, key: str) -> dict[str, dict[str, Any]]:
    return {r[key]: r for r in frame.iter_rows(named=True)} if frame.height else {}


# ---------------------------------------------------------------- phase 1: document_structure


def build_document_structure(
    docs: pl.DataFrame,
    existing: pl.DataFrame,
    *,
    enrichment: str,
    model: str | None,
    structurer: Structurer | None,
    max_workers: int = 4,
) -> tuple[pl.DataFrame, StageStats]:
    """One row per document: summary, entities, relationships, sections."""
    stats = StageStats(documents=docs.height)
    old = _by_key(existing, "document_id")
    want_method = "headings" if enrichment == "off" else "llm"
    rows: dict[str, dict[str, Any]] = {}
    todo: list[dict[str, Any]] = []
    for doc in docs.iter_rows(named=True):
        prev = old.get(doc["document_id"])
        if (
            prev
            and prev["content_hash"] == doc["content_hash"]
            and prev["status"] == "ok"
            and prev["method"].startswith(want_method)
            and (enrichment == "off" or prev["model"] == model)
        ):
            rows[doc["document_id"]] = {**prev, "title": doc["title"]}
            stats.reused += 1
        else:
            todo.append(doc)

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
            "llm_calls": result.llm_calls,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "cost_usd": result.cost_usd,
            "structured_at": now,
        }

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        for row in pool.map(work, todo):
            rows[row["document_id"]] = row
            stats.processed += 1
            stats.llm_calls += row["llm_calls"]
            stats.prompt_tokens += row["prompt_tokens"]
            stats.completion_tokens += row["completion_tokens"]
            stats.add_cost(row["cost_usd"])
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
                    "llm_calls": row["llm_calls"],
                    "prompt_tokens": row["prompt_tokens"],
                    "completion_tokens": row["completion_tokens"],
                    "cost_usd": row["cost_usd"],
                }
            )
    ordered = [rows[d] for d in docs["document_id"].to_list()] if docs.height else []
    stats.rows = len(ordered)
    return _frame(ordered, DOCUMENT_STRUCTURE), stats


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
    struct = _by_key(structure, "document_id")
    old: dict[str, list[dict[str, Any]]] = {}
    for row in existing.iter_rows(named=True) if existing.height else []:
        old.setdefault(row["document_id"], []).append(row)
    out: list[dict[str, Any]] = []
    kw: dict[str, Any] = {"max_tokens": max_tokens, "overlap_tokens": overlap_tokens}
    if count is not None:
        kw["count"] = count
    for doc in docs.iter_rows(named=True):
        srow = struct.get(doc["document_id"])
        sections = sections_of(srow) if srow else []
        key = _sha(
            doc["content_hash"],
            json.dumps([(s.title, s.start, s.end) for s in sections]),
            f"{max_tokens}/{overlap_tokens}",
        )
        prev = old.get(doc["document_id"])
        if prev and prev[0]["source_key"] == key:
            out.extend(prev)
            stats.reused += 1
            continue
        stats.processed += 1
        pieces = chunk_document(
            doc["text"],
            sections or heading_sections(doc["text"], doc["title"]),
            title=doc["title"],
            **kw,
        )
        for c in pieces:
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
                    "source_key": key,
                }
            )
    stats.rows = len(out)
    return _frame(out, CHUNKS), stats


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
) -> tuple[pl.DataFrame, StageStats]:
    """Every chunk with resolved text, key terms, summary and entities (or a failure reason)."""
    stats = StageStats()
    struct = _by_key(structure, "document_id")
    old = _by_key(existing, "chunk_id")
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for row in chunks.iter_rows(named=True) if chunks.height else []:
        by_doc.setdefault(row["document_id"], []).append(row)
    stats.documents = len(by_doc)
    result: dict[str, dict[str, Any]] = {}
    jobs: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for doc_id, rows in by_doc.items():
        srow = struct.get(doc_id) or {}
        ctx = _sha(
            srow.get("summary") or "",
            json.dumps(srow.get("entities") or [], sort_keys=True, default=str),
            enrichment,
            model or "",
        )
        todo = []
        for row in rows:
            key = _sha(row["text"], ctx)
            prev = old.get(row["chunk_id"])
            if (
                prev
                and prev["context_key"] == key
                and prev["enrichment_status"] in ("enriched", "off")
            ):
                result[row["chunk_id"]] = {**prev, "ordinal": row["ordinal"]}
                stats.reused += 1
            else:
                todo.append({**row, "context_key": key})
        if todo:
            jobs.append((srow, todo))

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
                **{k: r[k] for k in ("ordinal", "section_title", "start", "end", "text")},
                "resolved_text": o.resolved_text,
                "key_terms": o.key_terms,
                "summary": o.summary,
                "entities": o.entities,
                "enrichment_status": o.status,
                "enrichment_error": o.error,
                "model": None if enrichment == "off" else model,
                "context_key": r["context_key"],
                "llm_calls": o.llm_calls,
                "prompt_tokens": o.prompt_tokens,
                "completion_tokens": o.completion_tokens,
                "cost_usd": o.cost_usd,
                "enriched_at": now,
            }
            for r, o in zip(todo, outcomes, strict=True)
        ]

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        for (srow, _), rows in zip(jobs, pool.map(work, jobs), strict=True):
            doc_stats = StageStats()
            for row in rows:
                result[row["chunk_id"]] = row
                doc_stats.processed += 1
                doc_stats.llm_calls += row["llm_calls"]
                doc_stats.prompt_tokens += row["prompt_tokens"]
                doc_stats.completion_tokens += row["completion_tokens"]
                doc_stats.add_cost(row["cost_usd"])
                if row["enrichment_status"] == "failed":
                    doc_stats.failures += 1
                    doc_stats.failure_reasons.append(row["enrichment_error"])
            doc_stats.per_document.append(
                {
                    "title": srow.get("title") or rows[0]["document_id"],
                    "chunks": len(rows),
                    "failed": doc_stats.failures,
                    "llm_calls": round(doc_stats.llm_calls, 2),
                    "prompt_tokens": doc_stats.prompt_tokens,
                    "completion_tokens": doc_stats.completion_tokens,
                    "cost_usd": doc_stats.cost_usd,
                }
            )
            stats.merge(doc_stats)
    ordered = [result[r] for r in chunks["chunk_id"].to_list()] if chunks.height else []
    stats.rows = len(ordered)
    return _frame(ordered, ENRICHED_CHUNKS), stats


def unchanged(new: pl.DataFrame, old: pl.DataFrame, stats: StageStats, key: str) -> bool:
    """True when a rebuild recomputed nothing and dropped nothing: no need to rewrite."""
    if stats.processed or new.height != old.height:
        return False
    return new.height == 0 or set(new[key].to_list()) == set(old[key].to_list())
