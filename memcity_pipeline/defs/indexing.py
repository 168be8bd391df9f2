"""Indexing assets: vectors and BM25 indexes over enriched chunks (one partition per knowledge
base) and over memories (one per user), built from the enriched text, kept in step incrementally
and brought up to date by declarative automation when their upstream changes."""

import hashlib
import os
import shutil
import time
from pathlib import Path

import dagster as dg
import polars as pl

from memcity_pipeline.defs.enrichment import enriched_chunks
from memcity_pipeline.defs.ingestion import memories
from memcity_pipeline.defs.metadata import step_progress
from memcity_pipeline.defs.partitions import (
    backfill_policy,
    knowledge_bases,
    partition_scopes,
    users,
)
from memcity_pipeline.lake.io import delete_table, read_parquet, write_parquet_atomic
from memcity_pipeline.lake.scopes import drop_bm25_dir
from memcity_pipeline.lake.tables import (
    EMBEDDINGS,
    ENRICHED_CHUNKS,
    MEMORIES,
    bm25_dir,
    bm25_root,
    kb_table_path,
)
from memcity_pipeline.resources.embeddings import EmbeddingsResource
from memcity_pipeline.resources.lake import LakeResource
from memcity_pipeline.search.embeddings import Embedder
from memcity_pipeline.search.indexes import (
    EmbedStats,
    build_bm25,
    index_texts,
    sync_embeddings,
    text_hash,
)


def _source_key(ids: list[str], texts: list[str]) -> str:
    digest = hashlib.sha256()
    for item, text in zip(ids, texts, strict=True):
        digest.update(f"{item}\0{text_hash(text)}\n".encode())
    return digest.hexdigest()


def _bm25_up_to_date(directory: Path, key: str) -> bool:
    marker = directory.parent / f"{directory.name}.source"
    return (directory / "meta.json").exists() and marker.exists() and marker.read_text() == key


def _save_bm25(directory: Path, ids: list[str], texts: list[str], key: str) -> None:
    """Build beside the live index, swap it in, then mark it current (a crash leaves either
    index whole, and an unmarked one is rebuilt by the next run)."""
    marker = directory.parent / f"{directory.name}.source"
    marker.unlink(missing_ok=True)
    staging = directory.with_name(f".{directory.name}.building")
    retired = directory.with_name(f".{directory.name}.old")
    for leftover in (staging, retired):
        shutil.rmtree(leftover, ignore_errors=True)
    build_bm25(ids, texts, staging)
    if directory.exists():
        directory.rename(retired)
    staging.rename(directory)
    shutil.rmtree(retired, ignore_errors=True)
    tmp = marker.with_name(f".{marker.name}.tmp")
    tmp.write_text(key)
    os.replace(tmp, marker)


def _refresh_bm25(directory: Path, ids: list[str], texts: list[str]) -> bool:
    """Rebuild the index in `directory` unless it was built from these texts; True if rebuilt."""
    key = _source_key(ids, texts)
    if _bm25_up_to_date(directory, key):
        return False
    _save_bm25(directory, ids, texts, key)
    return True


def _refresh_vectors(
    context: dg.AssetExecutionContext,
    path: Path,
    scope: tuple[str, str],
    ids: list[str],
    texts: list[str],
    embedder: Embedder,
    items: str,
) -> EmbedStats:
    """Bring one scope's embeddings table at `path` in step with `texts`; write it only when
    something changed. A model change re-embeds everything, with a warning."""
    old = read_parquet(path, EMBEDDINGS)
    progress = step_progress(context, *scope, items)
    frame, stats = sync_embeddings(*scope, ids, texts, old, embedder, progress=progress)
    if stats.model_changed_from:
        context.log.warning(
            f"{scope[0]}/{scope[1]}: embeddings model changed from {stats.model_changed_from} "
            f"to {embedder.model_name}: re-embedding all {stats.items} {items}"
        )
    if stats.changed or not path.exists():
        write_parquet_atomic(frame, path, EMBEDDINGS)
    return stats


@dg.asset(
    group_name="indexing",
    kinds={"parquet", "pytorch"},
    deps=[enriched_chunks],
    partitions_def=knowledge_bases,
    backfill_policy=backfill_policy,
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        dg.AssetCheckSpec(
            "every_chunk_embedded",
            asset="chunk_embeddings",
            description="Every enriched chunk has exactly one vector.",
        )
    ],
)
def chunk_embeddings(
    context: dg.AssetExecutionContext, lake: LakeResource, embeddings: EmbeddingsResource
) -> dg.MaterializeResult:
    """One vector per chunk, per knowledge base, of the enriched text (summary, key terms and
    resolved text; the original text where enrichment is off or failed), with the model name and
    dimension. Only new or changed chunks are embedded again; a model change re-embeds everything.
    """
    embedder = embeddings.get_embedder()
    totals = {"chunks": 0, "embedded": 0, "reused": 0}
    changed_models: set[str] = set()

    started = time.perf_counter()
    scopes = partition_scopes(context)
    for org, kb in scopes:
        source = kb_table_path(lake.lake, "enriched_chunks", org, kb)
        path = kb_table_path(lake.lake, "chunk_embeddings", org, kb)
        with lake.writing(context, "chunk_embeddings", (org, kb)):
            if not source.exists():  # the knowledge base left: its vectors go too
                delete_table(path)
                continue
            rows = read_parquet(source, ENRICHED_CHUNKS)
            stats = _refresh_vectors(
                context,
                path,
                (org, kb),
                rows["chunk_id"].to_list(),
                index_texts(rows),
                embedder,
                "chunks",
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
        },
    )


@dg.asset(
    group_name="indexing",
    kinds={"bm25s"},
    deps=[enriched_chunks],
    partitions_def=knowledge_bases,
    backfill_policy=backfill_policy,
    automation_condition=dg.AutomationCondition.eager(),
)
def bm25_index(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    """A BM25 index (bm25s, English stopwords, Snowball stemming) per knowledge base over the
    same enriched text as the embeddings, saved in the lake under `indexes/chunks_bm25/<org>/<kb>/`
    and loaded by searches without rebuilding. Rebuilt only when a chunk's text changed."""
    root = bm25_root(lake.lake, "chunks")
    built: list[str] = []
    counts = {"unchanged": 0, "chunks": 0}

    started = time.perf_counter()
    for org, kb in partition_scopes(context):
        source = kb_table_path(lake.lake, "enriched_chunks", org, kb)
        directory = bm25_dir(lake.lake, "chunks", org, kb)
        with lake.writing(context, "bm25_index", (org, kb)):
            if not source.exists():  # the knowledge base left: its index goes too
                drop_bm25_dir(directory)
                continue
            rows = read_parquet(source, ENRICHED_CHUNKS)
            ids, texts = rows["chunk_id"].to_list(), index_texts(rows)
            counts["chunks"] += len(ids)
            rebuilt = _refresh_bm25(directory, ids, texts)
        if rebuilt:
            built.append(f"{org}/{kb}")
            context.log.info(f"bm25_index: {org}/{kb}: {len(ids)} chunks indexed")
        else:
            counts["unchanged"] += 1
    return dg.MaterializeResult(
        metadata={
            "summary": f"{len(built)} knowledge bases indexed, {counts['unchanged']} unchanged",
            "dagster/row_count": counts["chunks"],
            "rebuilt": built,
            "unchanged": counts["unchanged"],
            "build_seconds": round(time.perf_counter() - started, 3),
            "index_path": dg.MetadataValue.path(str(root)),
        }
    )


@dg.asset(
    group_name="indexing",
    kinds={"parquet", "bm25s"},
    deps=[memories],
    partitions_def=users,
    backfill_policy=backfill_policy,
    automation_condition=dg.AutomationCondition.eager(),
)
def memory_index(
    context: dg.AssetExecutionContext, lake: LakeResource, embeddings: EmbeddingsResource
) -> dg.MaterializeResult:
    """Vectors and a BM25 index of each user's memories, for searching memories the way
    `get_context` searches documents. Incremental like `chunk_embeddings`."""
    embedder = embeddings.get_embedder()
    totals = {"memories": 0, "embedded": 0, "reused": 0, "bm25_rebuilt": 0}

    scopes = partition_scopes(context)
    for org, user in scopes:
        source = kb_table_path(lake.lake, "memories", org, user)
        path = kb_table_path(lake.lake, "memory_embeddings", org, user)
        directory = bm25_dir(lake.lake, "memories", org, user)
        with lake.writing(context, "memory_embeddings", (org, user)):
            if not source.exists():  # the user left (or has no memories): the index goes
                delete_table(path)
                drop_bm25_dir(directory)
                continue
            rows = read_parquet(source, MEMORIES)
            ids, texts = rows["memory_id"].to_list(), rows["text"].to_list()
            stats = _refresh_vectors(context, path, (org, user), ids, texts, embedder, "memories")
            if _refresh_bm25(directory, ids, texts):
                totals["bm25_rebuilt"] += 1
        totals["memories"] += stats.items
        totals["embedded"] += stats.embedded
        totals["reused"] += stats.reused
    return dg.MaterializeResult(
        metadata={
            "summary": f"{totals['embedded']} memories embedded, {totals['reused']} unchanged, "
            f"{totals['bm25_rebuilt']} user indexes rebuilt",
            "dagster/row_count": totals["memories"],
            "users": len(scopes),
            **{k: v for k, v in totals.items() if k != "memories"},
            "model": embedder.model_name,
        }
    )


def _every_chunk_embedded(lake: LakeResource, scopes: list[tuple[str, str]]) -> dg.AssetCheckResult:
    missing = extra = 0
    for org, kb in scopes:
        chunks = kb_table_path(lake.lake, "enriched_chunks", org, kb)
        vectors = kb_table_path(lake.lake, "chunk_embeddings", org, kb)
        chunk_ids = (
            set(pl.read_parquet(chunks, columns=["chunk_id"])["chunk_id"])
            if chunks.exists()
            else set()
        )
        ids = (
            pl.read_parquet(vectors, columns=["item_id"])["item_id"].to_list()
            if vectors.exists()
            else []
        )
        missing += len(chunk_ids - set(ids))
        extra += len(ids) - len(set(ids) & chunk_ids)
    return dg.AssetCheckResult(
        check_name="every_chunk_embedded",
        passed=missing == 0 and extra == 0,
        metadata={"missing": missing, "extra": extra},
    )
