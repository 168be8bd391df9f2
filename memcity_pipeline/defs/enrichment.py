"""Enrichment assets: phase 1 `document_structure`, phase 2 `chunks`, phase 3 `enriched_chunks`.

Partitioned per knowledge base: a step handles its partitions one at a time, reuses every row
whose inputs did not change, and rewrites a knowledge base's table only when something in it
changed. The LLM-calling phases (1 and 3) run in the `llm` concurrency pool; the checks that guard
LLM spend and the lake's correctness (no empty chunk, every chunk within budget, offsets, every
chunk once and of a live document: `defs.checks`) are blocking, so phase 3 does not run on a
broken chunking. Downstream assets follow upstream by declarative automation (`eager`).

This module stays whole: the three phases' assets and the checks beside them share the per-
knowledge-base table plumbing and the LLM metadata helpers.
"""

from collections.abc import Callable
from typing import Any

import dagster as dg
import polars as pl
from pydantic import BaseModel

from memcity_pipeline.defs.checks import same_ids, spec, verdict
from memcity_pipeline.defs.ingestion import raw_documents
from memcity_pipeline.defs.metadata import markdown_table, step_progress
from memcity_pipeline.defs.partitions import backfill_policy, knowledge_bases, partition_scopes
from memcity_pipeline.enrichment.builders import (
    StageStats,
    build_chunks,
    build_document_structure,
    build_enriched_chunks,
)
from memcity_pipeline.enrichment.enrich import enrich_chunks
from memcity_pipeline.enrichment.structure import (
    DocumentStructureOut,
    LongRead,
    LongReader,
    StructuredCall,
    long_document_task,
    structure_document,
)
from memcity_pipeline.enrichment.tokens import count_tokens
from memcity_pipeline.lake.delta import (
    delete_rows,
    empty_frame,
    has_rows,
    read_rows,
    table_version,
    write_rows,
)
from memcity_pipeline.lake.tables import scope_where
from memcity_pipeline.llm.schema import max_answer_chars
from memcity_pipeline.llm.usage import Usage
from memcity_pipeline.resources.enrichment import EnrichmentResource
from memcity_pipeline.resources.lake import LakeResource
from memcity_pipeline.resources.llm import LLMResource
from memcity_pipeline.resources.sandbox import SandboxResource
from memcity_pipeline.resources.sessions import SessionsResource
from memcity_pipeline.rlm.query import rlm_extract

UNBOUNDED_ANSWER_TOKENS = 1000  # the token limit of an answer whose schema has no bound


def _structured_call(client: Any) -> StructuredCall:
    """Phase 1 and 3's LLM call: one structured completion and its usage. The answer's token
    limit is the longest answer its bounded schema allows (`llm.schema`), so a valid answer is
    never cut."""

    def call(
        messages: list[dict[str, str]],
        schema: type[BaseModel],
        accept: Callable[[BaseModel], bool] | None = None,
    ) -> tuple[BaseModel, Usage]:
        limit = max_answer_chars(schema) or UNBOUNDED_ANSWER_TOKENS
        verdict = None if accept is None else (lambda r: accept(r.parsed))
        res = client.complete(messages, schema=schema, max_tokens=limit, accept=verdict)
        return res.parsed, res.usage

    return call


def _workers(enrichment: EnrichmentResource, client: Any) -> int:
    """Documents worked on at once: no more than the client's concurrent calls, so that the
    calls of one document follow each other (a server that keeps the last prompt's prefix, as
    the embedded one does, then reads the shared system prompt and document context once)."""
    return min(enrichment.max_workers, client.max_concurrency) if client else 1


LLM_POOL = "llm"  # the Dagster concurrency pool of every step that calls an LLM
UPSTREAM = {
    "document_structure": "raw_documents",
    "chunks": "raw_documents",
    "enriched_chunks": "chunks",
}


def _sync_tables(
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    table: str,
    build: Callable[[str, str], tuple[pl.DataFrame, StageStats]],
) -> tuple[StageStats, list[str]]:
    """Bring this step's partitions of `table` in step with their upstream table, one at a time:
    build each, commit the difference when it changed; a partition whose upstream is gone loses
    its rows. No lock: a concurrent run on the same partition computes the same rows, and its
    commit is reconciled by `lake.delta.write_rows` (a conflict is retried from the read).
    """
    total = StageStats()
    written: list[str] = []
    for org, kb in partition_scopes(context):
        where = scope_where(table, org, kb)
        if not has_rows(lake.lake, UPSTREAM[table], scope_where(UPSTREAM[table], org, kb)):
            if delete_rows(lake.lake, table, where) is not None:
                written.append(f"{org}/{kb} (removed)")
            continue
        new, stats = build(org, kb)
        total.merge(stats)
        if stats.changed and write_rows(lake.lake, table, where, new) is not None:
            written.append(f"{org}/{kb}")
            context.log.info(
                f"{table}: {org}/{kb}: {stats.processed} processed, {stats.reused} reused"
            )
    return total, written


def _version(lake: LakeResource, table: str) -> dg.MetadataValue:
    """The Delta version of `table` after this step (null when it was never written)."""
    version = table_version(lake.lake, table)
    return dg.MetadataValue.int(version) if version is not None else dg.MetadataValue.null()


LLMReading = tuple[Usage, dict[str, Any]]  # a client's spend and counters at one moment
_NO_LLM = {"cache_hits": 0, "failures": 0}


def _reading(client: Any) -> LLMReading:
    """What a client has spent so far (`LLMStats.usage`) and its counters."""
    if client is None:
        return Usage(), dict(_NO_LLM)
    return client.stats.usage(), client.stats.snapshot()


def _llm_metadata(before: LLMReading, after: LLMReading) -> dict[str, Any]:
    spent = after[0] - before[0]
    return {
        "llm_calls": int(spent.calls),
        "cache_hits": after[1]["cache_hits"] - before[1]["cache_hits"],
        "prompt_tokens": spent.prompt_tokens,
        "completion_tokens": spent.completion_tokens,
        "cost_usd": dg.MetadataValue.float(spent.cost_usd)
        if spent.cost_usd is not None
        else dg.MetadataValue.null(),
        "llm_failures": after[1]["failures"] - before[1]["failures"],
    }


def _llm_stage_metadata(
    enrichment: EnrichmentResource,
    written: list[str],
    before: LLMReading,
    after: LLMReading,
    stats: StageStats,
    columns: list[str],
) -> dict[str, Any]:
    """What phases 1 and 3 report alike: mode, tables written, LLM spend, a per-document table."""
    usage_columns = ["llm_calls", "prompt_tokens", "completion_tokens", "cost_usd"]
    return {
        "mode": enrichment.mode.value,
        "tables_written": written,
        **_llm_metadata(before, after),
        "per_document": dg.MetadataValue.md(
            markdown_table(stats.per_document, ["title", *columns, *usage_columns])
        ),
    }


def _structure_counts(stats: StageStats, *, llm: bool) -> dict[str, Any]:
    """Phase 1's figures, which partition the documents: each one was structured now (by the
    LLM, or by the headings fallback when the LLM's answer was unusable, with the reasons), or
    kept unchanged. Without an LLM (enrichment off) every document is structured by headings.
    """
    fallback = stats.failures
    by_llm = stats.processed - fallback if llm else 0
    by_headings = stats.processed - by_llm - fallback
    parts = []
    if llm:
        parts.append(f"{by_llm} structured by the LLM")
        why = " (the LLM's answer was unusable: see fallback_reasons)" if fallback else ""
        parts.append(f"{fallback} by the headings fallback{why}")
    else:
        parts.append(f"{by_headings} structured by headings (enrichment off)")
    parts.append(f"{stats.reused} unchanged")
    return {
        "summary": f"{stats.documents} document{'' if stats.documents == 1 else 's'}: "
        + ", ".join(parts),
        "documents": stats.documents,
        "processed": stats.processed,
        "structured_by_llm": by_llm,
        "structured_by_headings": by_headings,
        "failed": fallback,  # structured by the headings fallback (status `failed`, retried)
        "fallback_reasons": dg.MetadataValue.md(
            "\n".join(f"- {reason}" for reason in stats.failure_reasons) or "none"
        ),
        "unchanged": stats.reused,
    }


def _rlm_reader(
    context: dg.AssetExecutionContext,
    org: str,
    client: Any,
    sandbox: SandboxResource,
    lake: LakeResource,
    sessions: SessionsResource,
    enrichment: EnrichmentResource,
) -> LongReader:
    """Phase 1 of a long document by the RLM engine: the document is the sandbox's `context`."""

    def read(title: str, text: str) -> LongRead:
        parsed, result = rlm_extract(
            org,
            text,
            long_document_task(title, len(text)),
            DocumentStructureOut,
            rlm_config={
                "model": client.model,
                "sub_model": client.sub_model,
                "max_iterations": enrichment.rlm_max_iterations,
                "max_timeout": enrichment.rlm_max_timeout_s,
            },
            llm=client,
            sandbox=sandbox.get_backend(),
            lake_dir=lake.lake,
            session_store=sessions.get_store(),
        )
        outcome = (
            f"{result.status}, {result.iterations} iterations, {result.total_sub_calls} sub-calls"
        )
        if parsed is None:
            why = result.error or result.warning or "no structured answer"
            note = f"RLM session {result.session_id} ({outcome}) failed: {why}; read in windows"
            context.log.warning(f"document_structure: {title}: {note}")
        else:
            note = f"read whole by RLM session {result.session_id} ({outcome})"
            context.log.info(f"document_structure: {title}: {note}")
        return LongRead(
            parsed=parsed if isinstance(parsed, DocumentStructureOut) else None,
            note=note,
            usage=Usage(
                result.prompt_tokens,
                result.completion_tokens,
                result.cost,
                result.iterations + result.total_sub_calls,
            ),
        )

    return read


@dg.asset(
    group_name="enrichment",
    kinds={"deltalake", "openai"},
    deps=[raw_documents],
    partitions_def=knowledge_bases,
    backfill_policy=backfill_policy,
    pool=LLM_POOL,
    automation_condition=dg.AutomationCondition.eager(),
)
def document_structure(
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    llm: LLMResource,
    enrichment: EnrichmentResource,
    sandbox: SandboxResource,
    sessions: SessionsResource,
) -> dg.MaterializeResult:
    """Phase 1: each whole document read by an LLM for a summary (<= 2,000 chars), entities
    (name, type, aliases, description), relationships and section boundaries (character offsets).

    A document longer than the model's window is read whole by the RLM engine in a sandbox
    session (`MEMCITY_LONG_DOCUMENTS=rlm`, method `llm-rlm`), else (or when that session ends
    without a valid answer) in windows whose results are merged (`llm-windowed`).
    With `MEMCITY_ENRICHMENT=off` sections come from headings and no LLM is called. A document
    whose LLM answer is unusable gets `status=failed`, heading sections, and is retried next run.
    """
    client = llm.get_client() if enrichment.enabled else None
    before = _reading(client)
    window = max(512, client.context_window // 2 - 512) if client else 0

    def structurer_for(org: str) -> Callable[[str, str], Any]:
        assert client is not None
        reader = (
            _rlm_reader(context, org, client, sandbox, lake, sessions, enrichment)
            if enrichment.rlm_for_long_documents
            else None
        )

        def structurer(title: str, text: str) -> Any:
            return structure_document(
                title,
                text,
                _structured_call(client),
                window_tokens=window,
                count_tokens=count_tokens,
                long_reader=reader,
            )

        return structurer

    def build(org: str, kb: str) -> tuple[pl.DataFrame, StageStats]:
        docs = _read(lake, "raw_documents", org, kb)
        old = _read(lake, "document_structure", org, kb)
        return build_document_structure(
            docs,
            old,
            enrichment=enrichment.mode.value,
            model=client.model if client else None,
            structurer=structurer_for(org) if client else None,
            max_workers=_workers(enrichment, client),
            progress=step_progress(context, org, kb, "documents"),
            max_attempts=enrichment.max_attempts,
        )

    stats, written = _sync_tables(context, lake, "document_structure", build)
    for reason in stats.failure_reasons:
        context.log.warning(f"document_structure: {reason}")
    after = _reading(client)
    return dg.MaterializeResult(
        metadata={
            **_structure_counts(stats, llm=client is not None),
            "dagster/row_count": stats.rows,
            "table_version": _version(lake, "document_structure"),
            **_llm_stage_metadata(
                enrichment,
                written,
                before,
                after,
                stats,
                ["method", "status", "sections", "entities"],
            ),
        }
    )


@dg.asset(
    group_name="enrichment",
    kinds={"deltalake", "polars"},
    deps=[raw_documents, document_structure],
    partitions_def=knowledge_bases,
    backfill_policy=backfill_policy,
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        spec("chunks_not_empty", "chunks", "No chunk is empty or only white space."),
        spec("chunks_within_token_budget", "chunks", "Every chunk fits the token budget."),
        spec(
            "chunk_offsets_valid",
            "chunks",
            "Each chunk is the slice of its document's text at its offsets, in order.",
        ),
        spec(
            "chunks_match_documents",
            "chunks",
            "Every document has chunks and every chunk a document; no chunk id or position twice.",
        ),
    ],
)
def chunks(
    context: dg.AssetExecutionContext, lake: LakeResource, enrichment: EnrichmentResource
) -> dg.MaterializeResult:
    """Phase 2 (no LLM): documents split at phase 1's section boundaries, then by headings,
    paragraphs and sentences, so that every chunk fits the token budget (`MEMCITY_CHUNK_TOKENS`,
    overlap included). Each chunk keeps its document id, section, offsets, ordinal and a stable id.
    """

    def build(org: str, kb: str) -> tuple[pl.DataFrame, StageStats]:
        docs = _read(lake, "raw_documents", org, kb)
        struct = _read(lake, "document_structure", org, kb)
        old = _read(lake, "chunks", org, kb)
        return build_chunks(
            docs,
            struct,
            old,
            max_tokens=enrichment.chunk_tokens,
            overlap_tokens=enrichment.chunk_overlap_tokens,
        )

    stats, written = _sync_tables(context, lake, "chunks", build)
    scopes = partition_scopes(context)
    sample = _first_table(lake, "chunks", scopes)
    return dg.MaterializeResult(
        check_results=_chunk_checks(lake, scopes, enrichment.chunk_tokens),
        metadata={
            "summary": f"{stats.rows} chunks from {stats.documents} documents "
            f"({stats.processed} re-chunked, {stats.reused} unchanged)",
            "dagster/row_count": stats.rows,
            "table_version": _version(lake, "chunks"),
            "documents": stats.documents,
            "documents_rechunked": stats.processed,
            "documents_unchanged": stats.reused,
            "token_budget": enrichment.chunk_tokens,
            "tables_written": written,
            "preview": dg.MetadataValue.md(
                markdown_table(
                    sample.head(5).to_dicts(),
                    [
                        "document_id",
                        "ordinal",
                        "section_title",
                        "start",
                        "end",
                        "token_count",
                        "text",
                    ],
                )
            ),
        },
    )


@dg.asset(
    group_name="enrichment",
    kinds={"deltalake", "openai"},
    deps=[chunks, document_structure],
    partitions_def=knowledge_bases,
    backfill_policy=backfill_policy,
    pool=LLM_POOL,
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        spec(
            "chunks_enriched_or_explained",
            "enriched_chunks",
            "Every chunk is enriched, or failed with a reason.",
        ),
        spec(
            "enriched_chunks_match_chunks",
            "enriched_chunks",
            "Exactly the chunks of `chunks`, each once.",
        ),
    ],
)
def enriched_chunks(
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    llm: LLMResource,
    enrichment: EnrichmentResource,
) -> dg.MaterializeResult:
    """Phase 3: each chunk rewritten with the document's summary and entities as context:
    pronouns and vague references resolved, key terms, a one-sentence summary, the entities it
    mentions. Several chunks go in one LLM call. A chunk whose enrichment fails keeps its original
    text with `enrichment_status=failed` and the reason, and is retried on the next run; with
    `MEMCITY_ENRICHMENT=off` chunks pass through with `enrichment_status=off`.
    """
    client = llm.get_client() if enrichment.enabled else None
    before = _reading(client)
    call = _structured_call(client) if client else None

    def enricher(title: str, summary: str, entities: list[Any], texts: list[str]) -> list[Any]:
        assert call is not None
        return enrich_chunks(
            title,
            summary,
            entities,
            texts,
            call,
            batch_size=enrichment.chunks_per_call,
            on_error=context.log.debug,
        )

    def build(org: str, kb: str) -> tuple[pl.DataFrame, StageStats]:
        ch = _read(lake, "chunks", org, kb)
        struct = _read(lake, "document_structure", org, kb)
        old = _read(lake, "enriched_chunks", org, kb)
        return build_enriched_chunks(
            ch,
            struct,
            old,
            enrichment=enrichment.mode.value,
            model=client.model if client else None,
            enricher=enricher if client else None,
            max_workers=_workers(enrichment, client),
            progress=step_progress(context, org, kb, "chunks"),
            max_attempts=enrichment.max_attempts,
        )

    stats, written = _sync_tables(context, lake, "enriched_chunks", build)
    for reason in sorted(set(stats.failure_reasons))[:20]:
        context.log.warning(f"enriched_chunks: chunk failed: {reason}")
    after = _reading(client)
    scopes = partition_scopes(context)
    sample = _first_table(lake, "enriched_chunks", scopes)
    if sample.height:
        sample = (
            sample.filter(pl.col("enrichment_status") == "enriched").head(3)
            if enrichment.enabled
            else sample.head(3)
        )
    return dg.MaterializeResult(
        check_results=[
            _chunks_enriched_or_explained(lake, scopes),
            same_ids(
                "enriched_chunks_match_chunks",
                _rows(lake, "chunks", scopes, ["chunk_id"])["chunk_id"],
                _rows(lake, "enriched_chunks", scopes, ["chunk_id"])["chunk_id"],
                "chunks",
            ),
        ],
        metadata={
            "summary": (
                f"{stats.processed} chunks enriched now ({stats.failures} failed), "
                if enrichment.enabled
                else f"{stats.processed} chunks passed through (enrichment off), "
            )
            + f"{stats.reused} unchanged",
            "dagster/row_count": _count_rows(lake, "enriched_chunks", scopes),
            "table_version": _version(lake, "enriched_chunks"),
            "documents": stats.documents,
            "chunks_processed": stats.processed,
            "chunks_unchanged": stats.reused,
            "chunks_failed": stats.failures,
            **_llm_stage_metadata(enrichment, written, before, after, stats, ["chunks", "failed"]),
            "preview": dg.MetadataValue.md(
                markdown_table(
                    sample.to_dicts(),
                    ["text", "resolved_text", "key_terms", "summary"],
                    max_chars=160,
                )
            ),
        },
    )


def _read(lake: LakeResource, table: str, org: str, kb: str) -> pl.DataFrame:
    """One knowledge base's rows of a lake table (empty, with its schema, when absent)."""
    return read_rows(lake.lake, table, scope_where(table, org, kb))


Scopes = list[tuple[str, str]]


def _first_table(lake: LakeResource, table: str, scopes: Scopes) -> pl.DataFrame:
    for o, k in scopes:
        frame = _read(lake, table, o, k)
        if frame.height:
            return frame
    return pl.DataFrame()


def _count_rows(lake: LakeResource, table: str, scopes: Scopes) -> int:
    return _rows(lake, table, scopes, ["chunk_id"]).height


def _rows(lake: LakeResource, table: str, scopes: Scopes, columns: list[str]) -> pl.DataFrame:
    """This step's partitions' rows of `table`, only `columns` read."""
    empty = empty_frame(table).select(columns)
    parts = [read_rows(lake.lake, table, scope_where(table, o, k), columns) for o, k in scopes]
    return pl.concat([empty, *parts])


# ---------------------------------------------------------------- checks (run with their asset)


def _chunk_checks(lake: LakeResource, scopes: Scopes, budget: int) -> list[dg.AssetCheckResult]:
    """The checks of `chunks`, from one read of each partition's chunks and documents."""
    columns = ["chunk_id", "document_id", "ordinal", "start", "end", "text", "token_count"]
    empty = over = bad_offsets = unknown_docs = unchunked = dup_ids = dup_positions = total = 0
    largest = 0
    for org, kb in scopes:
        ch = read_rows(lake.lake, "chunks", scope_where("chunks", org, kb), columns)
        docs = _read(lake, "raw_documents", org, kb).select("document_id", "text")
        total += ch.height
        empty += ch.filter(pl.col("text").str.strip_chars() == "").height
        over += ch.filter(pl.col("token_count") > budget).height
        largest = max(largest, int(ch["token_count"].max() or 0))  # type: ignore[arg-type]
        dup_ids += ch.filter(pl.col("chunk_id").is_duplicated()).height
        dup_positions += ch.filter(pl.struct("document_id", "ordinal").is_duplicated()).height
        unknown_docs += ch.join(docs, on="document_id", how="anti").height
        unchunked += docs.join(ch, on="document_id", how="anti").height
        texts = dict(zip(docs["document_id"], docs["text"], strict=True))
        for (doc,), group in ch.sort("ordinal").group_by("document_id", maintain_order=True):
            text, prev_start = texts.get(doc), -1
            for start, end, chunk in group.select("start", "end", "text").iter_rows():
                ok = text is not None and 0 <= start < end <= len(text) and start > prev_start
                bad_offsets += 0 if ok and text[start:end] == chunk else 1  # type: ignore[index]
                prev_start = start
    return [
        verdict("chunks_not_empty", {"empty_chunks": empty}, chunks=total),
        verdict(
            "chunks_within_token_budget",
            {"chunks_over_budget": over},
            largest_chunk_tokens=largest,
            budget=budget,
        ),
        verdict("chunk_offsets_valid", {"chunks_with_wrong_offsets": bad_offsets}, chunks=total),
        verdict(
            "chunks_match_documents",
            {
                "chunks_of_unknown_documents": unknown_docs,
                "documents_without_chunks": unchunked,
                "duplicated_chunk_ids": dup_ids,
                "duplicated_chunk_positions": dup_positions,
            },
        ),
    ]


def _chunks_enriched_or_explained(lake: LakeResource, scopes: Scopes) -> dg.AssetCheckResult:
    frame = _rows(
        lake,
        "enriched_chunks",
        scopes,
        ["enrichment_status", "enrichment_error", "resolved_text"],
    )
    bad = frame.filter(
        ((pl.col("enrichment_status") == "enriched") & pl.col("resolved_text").is_null())
        | ((pl.col("enrichment_status") == "failed") & pl.col("enrichment_error").is_null())
        | ~pl.col("enrichment_status").is_in(["enriched", "failed", "off"])
    ).height
    counts = {
        r["enrichment_status"]: r["len"]
        for r in frame.group_by("enrichment_status").len().to_dicts()
    }
    return verdict(
        "chunks_enriched_or_explained", {"unexplained_chunks": bad}, chunks=frame.height, **counts
    )
