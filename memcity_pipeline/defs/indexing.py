"""Indexing assets: vectors and BM25 indexes over enriched chunks (per knowledge base) and over
memories (per user), built from the enriched text, kept in step incrementally."""

import hashlib
import os
import shutil
import time
from pathlib import Path

import dagster as dg
import polars as pl

from memcity_pipeline.defs.enrichment import enriched_chunks
from memcity_pipeline.defs.ingestion import memories
from memcity_pipeline.lake.io import delete_table, read_parquet, write_parquet_atomic
from memcity_pipeline.lake.reconcile import reconcile_scopes
from memcity_pipeline.lake.tables import (
    EMBEDDINGS,
    ENRICHED_CHUNKS,
    MEMORIES,
    bm25_dir,
    bm25_root,
    kb_partitions,
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
    frame, stats = sync_embeddings(*scope, ids, texts, old, embedder)
    if stats.model_changed_from:
        context.log.warning(
            f"{scope[0]}/{scope[1]}: embeddings model changed from {stats.model_changed_from} "
            f"to {embedder.model_name}: re-embedding all {stats.items} {items}"
        )
    if stats.changed or not path.exists():
        write_parquet_atomic(frame, path, EMBEDDINGS)
    return stats


def _bm25_scopes(root: Path) -> list[tuple[str, str]]:
    """The (org, scope) folders of BM25 indexes under `root`."""
    if not root.is_dir():
        return []
    return sorted(
        (org.name, scope.name)
        for org in root.iterdir()
        if org.is_dir()
        for scope in org.iterdir()
        if scope.is_dir()
    )


def _drop_bm25(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    (directory.parent / f"{directory.name}.source").unlink(missing_ok=True)


@dg.asset(group_name="indexing", kinds={"parquet", "pytorch"}, deps=[enriched_chunks])
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

    def update(scope: tuple[str, str]) -> None:
        org, kb = scope
        rows = read_parquet(kb_table_path(lake.lake, "enriched_chunks", org, kb), ENRICHED_CHUNKS)
        stats = _refresh_vectors(
            context,
            kb_table_path(lake.lake, "chunk_embeddings", org, kb),
            scope,
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

    started = time.perf_counter()
    with lake.writing(context, "chunk_embeddings"):
        reconcile_scopes(
            kb_partitions(lake.lake, "enriched_chunks"),
            kb_partitions(lake.lake, "chunk_embeddings"),
            update=update,
            drop=lambda scope: delete_table(kb_table_path(lake.lake, "chunk_embeddings", *scope)),
        )
    seconds = time.perf_counter() - started
    return dg.MaterializeResult(
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
        }
    )


@dg.asset(group_name="indexing", kinds={"bm25s"}, deps=[enriched_chunks])
def bm25_index(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    """A BM25 index (bm25s, English stopwords, Snowball stemming) per knowledge base over the
    same enriched text as the embeddings, saved in the lake under `indexes/chunks_bm25/<org>/<kb>/`
    and loaded by searches without rebuilding. Rebuilt only when a chunk's text changed."""
    root = bm25_root(lake.lake, "chunks")
    built: list[str] = []
    counts = {"unchanged": 0, "chunks": 0}

    def update(scope: tuple[str, str]) -> None:
        org, kb = scope
        rows = read_parquet(kb_table_path(lake.lake, "enriched_chunks", org, kb), ENRICHED_CHUNKS)
        ids, texts = rows["chunk_id"].to_list(), index_texts(rows)
        counts["chunks"] += len(ids)
        if _refresh_bm25(bm25_dir(lake.lake, "chunks", org, kb), ids, texts):
            built.append(f"{org}/{kb}")
            context.log.info(f"bm25_index: {org}/{kb}: {len(ids)} chunks indexed")
        else:
            counts["unchanged"] += 1

    started = time.perf_counter()
    with lake.writing(context, "bm25_index"):
        reconcile_scopes(
            kb_partitions(lake.lake, "enriched_chunks"),
            _bm25_scopes(root),
            update=update,
            drop=lambda scope: _drop_bm25(bm25_dir(lake.lake, "chunks", *scope)),
        )
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


@dg.asset(group_name="indexing", kinds={"parquet", "bm25s"}, deps=[memories])
def memory_index(
    context: dg.AssetExecutionContext, lake: LakeResource, embeddings: EmbeddingsResource
) -> dg.MaterializeResult:
    """Vectors and a BM25 index of each user's memories, for searching memories the way
    `get_context` searches documents. Incremental like `chunk_embeddings`."""
    embedder = embeddings.get_embedder()
    totals = {"memories": 0, "embedded": 0, "reused": 0, "bm25_rebuilt": 0}

    def update(scope: tuple[str, str]) -> None:
        org, user = scope
        rows = read_parquet(kb_table_path(lake.lake, "memories", org, user), MEMORIES)
        ids, texts = rows["memory_id"].to_list(), rows["text"].to_list()
        stats = _refresh_vectors(
            context,
            kb_table_path(lake.lake, "memory_embeddings", org, user),
            scope,
            ids,
            texts,
            embedder,
            "memories",
        )
        if _refresh_bm25(bm25_dir(lake.lake, "memories", org, user), ids, texts):
            totals["bm25_rebuilt"] += 1
        totals["memories"] += stats.items
        totals["embedded"] += stats.embedded
        totals["reused"] += stats.reused

    def drop(scope: tuple[str, str]) -> None:
        delete_table(kb_table_path(lake.lake, "memory_embeddings", *scope))
        _drop_bm25(bm25_dir(lake.lake, "memories", *scope))

    wanted = kb_partitions(lake.lake, "memories")
    with lake.writing(context, "memory_embeddings"):
        reconcile_scopes(
            wanted,
            set(kb_partitions(lake.lake, "memory_embeddings"))
            | set(_bm25_scopes(bm25_root(lake.lake, "memories"))),
            update=update,
            drop=drop,
        )
    return dg.MaterializeResult(
        metadata={
            "summary": f"{totals['embedded']} memories embedded, {totals['reused']} unchanged, "
            f"{totals['bm25_rebuilt']} user indexes rebuilt",
            "dagster/row_count": totals["memories"],
            "users": len(wanted),
            **{k: v for k, v in totals.items() if k != "memories"},
            "model": embedder.model_name,
        }
    )


@dg.asset_check(asset=chunk_embeddings, description="Every enriched chunk has exactly one vector.")
def every_chunk_embedded(lake: LakeResource) -> dg.AssetCheckResult:
    missing = extra = 0
    for org, kb in kb_partitions(lake.lake, "enriched_chunks"):
        chunk_ids = set(
            pl.read_parquet(
                kb_table_path(lake.lake, "enriched_chunks", org, kb), columns=["chunk_id"]
            )["chunk_id"].to_list()
        )
        emb = read_parquet(kb_table_path(lake.lake, "chunk_embeddings", org, kb), EMBEDDINGS)
        ids = emb["item_id"].to_list()
        missing += len(chunk_ids - set(ids))
        extra += len(ids) - len(set(ids) & chunk_ids)
    return dg.AssetCheckResult(
        passed=missing == 0 and extra == 0, metadata={"missing": missing, "extra": extra}
    )
