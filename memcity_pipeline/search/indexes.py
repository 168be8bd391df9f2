"""Embeddings and BM25 indexes over enriched chunks and memories, kept in step incrementally.

Vectors live in the lake's Delta tables `chunk_embeddings` and `memory_embeddings` (one partition
per knowledge base or user) with the model name, the dimension and a hash of the text that was
embedded, so that only new or changed texts are embedded again, and a model change re-embeds
everything. BM25 indexes are folders (`indexes/<items>_bm25/<org>/<scope>/`) published whole
by `search.bm25_store` and loaded without rebuilding.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from memcity_pipeline.lake.reconcile import plan_rows
from memcity_pipeline.lake.tables import EMBEDDINGS
from memcity_pipeline.progress import NoProgress, ProgressLog
from memcity_pipeline.search.bm25 import BM25Index
from memcity_pipeline.search.embeddings import Embedder, embed_whole, embedding_text

EMBED_BATCHES_PER_REPORT = 4  # embedder batches between two progress counts


@dataclass
class EmbedStats:
    items: int = 0
    embedded: int = 0
    reused: int = 0
    model_changed_from: str | None = None
    changed: bool = False  # something embedded or dropped: the table needs writing


def index_texts(frame: pl.DataFrame) -> list[str]:
    """The text indexed for each enriched chunk: its header, then (when enriched) its summary and
    key terms, then its resolved text (or the original)."""
    out = []
    for row in frame.iter_rows(named=True):
        enriched = row.get("enrichment_status") == "enriched"
        text = (row.get("resolved_text") if enriched else None) or row["text"]
        out.append(
            embedding_text(
                text,
                row.get("key_terms") if enriched else None,
                row.get("summary") if enriched else None,
                header=row.get("header"),
            )
        )
    return out


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sync_embeddings(
    org_id: str,
    scope_id: str,
    ids: list[str],
    texts: list[str],
    existing: pl.DataFrame,
    embedder: Embedder,
    *,
    batch_size: int = 64,
    progress: ProgressLog | None = None,
    leads: list[str] | None = None,
) -> tuple[pl.DataFrame, EmbedStats]:
    """Vectors for `ids`/`texts` (in that order), reusing `existing` rows of the same text and
    model. Each text is embedded whole (`embed_whole`: a text longer than the model's window
    gets one vector per window, headed by its entry in `leads`), and its row's `vector` holds
    its vectors one after another. `EmbedStats.changed` says whether the table needs writing.
    `progress` counts the texts embedded now."""
    stats = EmbedStats(items=len(ids))
    model = embedder.model_name
    if existing.height:
        models = set(existing["model"].unique().to_list())
        if models != {model}:
            stats.model_changed_from = ", ".join(sorted(m for m in models if m))
    wanted = pl.DataFrame(
        {
            "item_id": ids,
            "text_hash": [text_hash(t) for t in texts],
            "text": texts,
            "lead": leads or [""] * len(ids),
        },
        schema={"item_id": pl.String, "text_hash": pl.String, "text": pl.String, "lead": pl.String},
    )
    plan = plan_rows(
        wanted,
        existing,
        key="item_id",
        fingerprint="text_hash",
        reusable=pl.col("model") == model,
    )
    todo = plan.todo
    fresh, parts = _embed(
        embedder, todo["text"].to_list(), todo["lead"].to_list(), batch_size, progress
    )
    if todo.height:
        dim = fresh.shape[1]
    elif plan.reuse.height:
        dim = int(plan.reuse["dimension"][0])
    else:
        dim = getattr(embedder, "dimension", 0)
    offsets = np.concatenate([[0], np.cumsum(parts) * dim]).astype(np.int32)
    computed = pa.table(
        {
            "org_id": [org_id] * todo.height,
            "scope_id": [scope_id] * todo.height,
            "item_id": todo["item_id"].to_list(),
            "text_hash": todo["text_hash"].to_list(),
            "model": [model] * todo.height,
            "dimension": pa.array([dim] * todo.height, pa.int32()),
            "vector": pa.ListArray.from_arrays(pa.array(offsets), pa.array(fresh.reshape(-1))),
        },
        schema=EMBEDDINGS,
    )
    reused = plan.reuse.select(EMBEDDINGS.names).to_arrow().cast(EMBEDDINGS)
    order = wanted.select("item_id").with_row_index("_position")
    frame = (
        pl.from_arrow(pa.concat_tables([reused, computed]))
        .join(order, on="item_id", how="inner")  # type: ignore[union-attr]
        .sort("_position")
        .drop("_position")
    )
    stats.embedded, stats.reused = todo.height, plan.reuse.height
    stats.changed = plan.changed
    return frame, stats  # type: ignore[return-value]


def _embed(
    embedder: Embedder,
    texts: list[str],
    leads: list[str],
    batch_size: int,
    progress: ProgressLog | None,
) -> tuple[np.ndarray, np.ndarray]:
    """`texts` embedded whole (vectors, parts per text), a few batches at a time so that
    progress shows."""
    if not texts:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    progress = progress or NoProgress()
    progress.begin(len(texts))
    vectors, parts = [], []
    step = batch_size * EMBED_BATCHES_PER_REPORT
    for start in range(0, len(texts), step):
        end = start + step
        v, p = embed_whole(embedder, texts[start:end], leads[start:end], batch_size)
        vectors.append(np.asarray(v, np.float32))
        parts.append(p)
        progress.advance(len(p))
    return np.concatenate(vectors), np.concatenate(parts)


def vectors_of(frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The vectors of an embeddings frame: (a float32 matrix of every vector, rows in frame
    order; how many rows each item owns). Read from the Arrow buffers, never via Python lists."""
    if frame.height == 0:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    dim = int(frame["dimension"][0])
    column = frame["vector"].to_arrow()
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if dim <= 0 or np.any(lengths % dim) or np.any(lengths == 0):
        raise ValueError("an embeddings row holds no vector or a part of one")
    return values.reshape(-1, dim), (lengths // dim).astype(np.int64)


def build_bm25(ids: list[str], texts: list[str], directory: Path) -> None:
    """Build and save a BM25 index atomically."""
    BM25Index.build(ids, texts).save(directory)
