"""Indexing assets: vectors and BM25 indexes over enriched chunks (one partition per knowledge
base) and over memories (one per user), built from the enriched text, kept in step incrementally
and brought up to date by declarative automation when their upstream changes."""

import hashlib
import time

import dagster as dg

from memcity_pipeline.defs.checks import same_ids, spec, verdict
from memcity_pipeline.defs.enrichment import enriched_chunks
from memcity_pipeline.defs.ingestion import memories
from memcity_pipeline.defs.metadata import step_progress
from memcity_pipeline.defs.partitions import (
    backfill_policy,
    knowledge_bases,
    partition_scopes,
    users,
)
from memcity_pipeline.lake.delta import delete_rows, read_rows, table_version, write_rows
from memcity_pipeline.lake.location import Lake
from memcity_pipeline.lake.tables import bm25_prefix, bm25_root, scope_where
from memcity_pipeline.resources.embeddings import EmbeddingsResource
from memcity_pipeline.resources.lake import LakeResource
from memcity_pipeline.search import bm25_store
from memcity_pipeline.search.bm25 import BM25Index
from memcity_pipeline.search.embeddings import Embedder
from memcity_pipeline.search.indexes import (
    EmbedStats,
    index_texts,
    sync_embeddings,
    text_hash,
)


def _source_key(ids: list[str], texts: list[str]) -> str:
    digest = hashlib.sha256()
    for item, text in zip(ids, texts, strict=True):
        digest.update(f"{item}\0{text_hash(text)}\n".encode())
    return digest.hexdigest()


def _bm25_current(lake: Lake, prefix: str, ids: list[str], texts: list[str]) -> bool:
    """Whether the index published under `prefix` was built from exactly these items."""
    return bm25_store.is_current(lake, prefix, _source_key(ids, texts))


def _refresh_bm25(lake: Lake, prefix: str, ids: list[str], texts: list[str]) -> bool:
    """Rebuild and publish the index under `prefix` unless it was built from these texts; True
    if rebuilt."""
    if _bm25_current(lake, prefix, ids, texts):
        return False
    bm25_store.publish(lake, prefix, BM25Index.build(ids, texts), _source_key(ids, texts))
    return True


def _refresh_vectors(
    context: dg.AssetExecutionContext,
    lake: Lake,
    table: str,
    scope: tuple[str, str],
    ids: list[str],
    texts: list[str],
    embedder: Embedder,
    items: str,
    leads: list[str] | None = None,
) -> EmbedStats:
    """Bring one scope's partition of the embeddings `table` in step with `texts`; commit only
    when something changed. A model change re-embeds everything, with a warning."""
    where = scope_where(table, *scope)
    old = read_rows(lake, table, where)
    progress = step_progress(context, *scope, items)
    frame, stats = sync_embeddings(
        *scope, ids, texts, old, embedder, progress=progress, leads=leads
    )
    if stats.model_changed_from:
        context.log.warning(
            f"{scope[0]}/{scope[1]}: embeddings model changed from {stats.model_changed_from} "
            f"to {embedder.model_name}: re-embedding all {stats.items} {items}"
        )
    if stats.changed:
        write_rows(lake, table, where, frame)
    return stats


@dg.asset(
    group_name="indexing",
    kinds={"deltalake", "pytorch"},
    deps=[enriched_chunks],
    partitions_def=knowledge_bases,
    backfill_policy=backfill_policy,
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        spec(
            "every_chunk_embedded",
            "chunk_embeddings",
            "Every enriched chunk has its vectors, once, and nothing else has.",
        )
    ],
)
def chunk_embeddings(
    context: dg.AssetExecutionContext, lake: LakeResource, embeddings: EmbeddingsResource
) -> dg.MaterializeResult:
    """The vectors of each chunk, per knowledge base, of its indexed text (header, then summary,
    key terms and resolved text; the original text where enrichment is off or failed), with the
    model name and dimension. A text longer than the model's window gets one vector per window
    (each headed by the chunk's header), so no part of it goes unembedded. Only new or changed
    chunks are embedded again; a model change re-embeds everything.
    """
    embedder = embeddings.get_embedder()
    totals = {"chunks": 0, "embedded": 0, "reused": 0}
    changed_models: set[str] = set()

    started = time.perf_counter()
    scopes = partition_scopes(context)
    for org, kb in scopes:
        rows = read_rows(lake.lake, "enriched_chunks", scope_where("enriched_chunks", org, kb))
        if rows.height == 0:  # the knowledge base left: its vectors go too
            delete_rows(lake.lake, "chunk_embeddings", scope_where("chunk_embeddings", org, kb))
            continue
        stats = _refresh_vectors(
            context,
            lake.lake,
            "chunk_embeddings",
            (org, kb),
            rows["chunk_id"].to_list(),
            index_texts(rows),
            embedder,
            "chunks",
            leads=rows["header"].fill_null("").to_list(),
        )
        if stats.model_changed_from:
            changed_models.add(stats.model_changed_from)
        totals["chunks"] += stats.items
        totals["embedded"] += stats.embedded
        totals["reused"] += stats.reused
    seconds = time.perf_counter() - started
    return dg.MaterializeResult(
        check_results=[_every_chunk_embedded(lake, scopes)],
        metadata={
            "summary": f"{totals['embedded']} chunks embedded, {totals['reused']} unchanged"
            + (
                f" (model changed from {', '.join(sorted(changed_models))})"
                if changed_models
                else ""
            ),
            "dagster/row_count": totals["chunks"],
            "embedded": totals["embedded"],
            "unchanged": totals["reused"],
            "model": embedder.model_name,
            "model_changed": bool(changed_models),
            "chunks_per_second": round(totals["embedded"] / seconds, 2)
            if totals["embedded"]
            else 0.0,
            "table_version": _version(lake, "chunk_embeddings"),
        },
    )


@dg.asset(
    group_name="indexing",
    kinds={"bm25s"},
    deps=[enriched_chunks],
    partitions_def=knowledge_bases,
    backfill_policy=backfill_policy,
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        spec(
            "bm25_index_matches_chunks",
            "bm25_index",
            "The published index was built from exactly the enriched chunks and their texts.",
        )
    ],
)
def bm25_index(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    """A BM25 index (bm25s, English stopwords, Snowball stemming) per knowledge base over the
    same enriched text as the embeddings, saved in the lake under `indexes/chunks_bm25/<org>/<kb>/`
    and loaded by searches without rebuilding. Rebuilt only when a chunk's text changed."""
    root = lake.lake.join(bm25_root("chunks"))
    built: list[str] = []
    counts = {"unchanged": 0, "chunks": 0}
    stale: list[str] = []  # partitions whose published index is not built from their chunks

    started = time.perf_counter()
    for org, kb in partition_scopes(context):
        prefix = bm25_prefix("chunks", org, kb)
        rows = read_rows(lake.lake, "enriched_chunks", scope_where("enriched_chunks", org, kb))
        if rows.height == 0:  # the knowledge base left: its index goes too
            bm25_store.drop(lake.lake, prefix)
            continue
        ids, texts = rows["chunk_id"].to_list(), index_texts(rows)
        counts["chunks"] += len(ids)
        rebuilt = _refresh_bm25(lake.lake, prefix, ids, texts)
        if rebuilt:
            built.append(f"{org}/{kb}")
            context.log.info(f"bm25_index: {org}/{kb}: {len(ids)} chunks indexed")
        else:
            counts["unchanged"] += 1
        if not _bm25_current(lake.lake, prefix, ids, texts):
            stale.append(f"{org}/{kb}")
    return dg.MaterializeResult(
        check_results=[
            verdict("bm25_index_matches_chunks", {"stale_indexes": len(stale)}, stale=stale)
        ],
        metadata={
            "summary": f"{len(built)} knowledge bases indexed, {counts['unchanged']} unchanged",
            "dagster/row_count": counts["chunks"],
            "rebuilt": built,
            "unchanged": counts["unchanged"],
            "build_seconds": round(time.perf_counter() - started, 3),
            "index_path": dg.MetadataValue.path(root),
        },
    )


@dg.asset(
    group_name="indexing",
    kinds={"deltalake", "bm25s"},
    deps=[memories],
    partitions_def=users,
    backfill_policy=backfill_policy,
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        spec(
            "memory_index_matches_memories",
            "memory_index",
            "Every memory has its vectors, once, and nothing else has.",
        ),
        spec(
            "memory_bm25_matches_memories",
            "memory_index",
            "The published BM25 index was built from exactly the memories and their texts.",
        ),
    ],
)
def memory_index(
    context: dg.AssetExecutionContext, lake: LakeResource, embeddings: EmbeddingsResource
) -> dg.MaterializeResult:
    """Vectors and a BM25 index of each user's memories, for searching memories the way
    `get_context` searches documents. Incremental like `chunk_embeddings`."""
    embedder = embeddings.get_embedder()
    totals = {"memories": 0, "embedded": 0, "reused": 0, "bm25_rebuilt": 0}
    memory_ids: list[str] = []
    stale: list[str] = []  # users whose published BM25 index is not built from their memories

    scopes = partition_scopes(context)
    for org, user in scopes:
        prefix = bm25_prefix("memories", org, user)
        rows = read_rows(lake.lake, "memories", scope_where("memories", org, user))
        if rows.height == 0:  # the user left (or has no memories): the index goes
            delete_rows(lake.lake, "memory_embeddings", scope_where("memory_embeddings", org, user))
            bm25_store.drop(lake.lake, prefix)
            continue
        ids, texts = rows["memory_id"].to_list(), rows["text"].to_list()
        stats = _refresh_vectors(
            context, lake.lake, "memory_embeddings", (org, user), ids, texts, embedder, "memories"
        )
        if _refresh_bm25(lake.lake, prefix, ids, texts):
            totals["bm25_rebuilt"] += 1
        if not _bm25_current(lake.lake, prefix, ids, texts):
            stale.append(f"{org}/{user}")
        memory_ids += [f"{org}/{user}/{i}" for i in ids]
        totals["memories"] += stats.items
        totals["embedded"] += stats.embedded
        totals["reused"] += stats.reused
    return dg.MaterializeResult(
        check_results=[
            same_ids(
                "memory_index_matches_memories",
                memory_ids,
                _ids(lake, "memory_embeddings", "item_id", scopes),
                "memories",
            ),
            verdict("memory_bm25_matches_memories", {"stale_indexes": len(stale)}, stale=stale),
        ],
        metadata={
            "summary": f"{totals['embedded']} memories embedded, {totals['reused']} unchanged, "
            f"{totals['bm25_rebuilt']} user indexes rebuilt",
            "dagster/row_count": totals["memories"],
            "users": len(scopes),
            **{k: v for k, v in totals.items() if k != "memories"},
            "model": embedder.model_name,
            "table_version": _version(lake, "memory_embeddings"),
        },
    )


def _version(lake: LakeResource, table: str) -> dg.MetadataValue:
    """The Delta version of `table` after this step (null when it was never written)."""
    version = table_version(lake.lake, table)
    return dg.MetadataValue.int(version) if version is not None else dg.MetadataValue.null()


def _ids(lake: LakeResource, table: str, column: str, scopes: list[tuple[str, str]]) -> list[str]:
    """The `column` ids of these partitions' rows of `table`, each as `<org>/<scope>/<id>` (a
    memory id is its user's own: two users may both have `m1`)."""
    return [
        f"{org}/{scope}/{i}"
        for org, scope in scopes
        for i in read_rows(lake.lake, table, scope_where(table, org, scope), [column])[column]
    ]


def _every_chunk_embedded(lake: LakeResource, scopes: list[tuple[str, str]]) -> dg.AssetCheckResult:
    return same_ids(
        "every_chunk_embedded",
        _ids(lake, "enriched_chunks", "chunk_id", scopes),
        _ids(lake, "chunk_embeddings", "item_id", scopes),
        "chunks",
    )
