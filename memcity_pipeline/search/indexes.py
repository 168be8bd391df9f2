"""Embeddings and BM25 indexes over enriched chunks and memories, kept in step incrementally.

Vectors live in Parquet (`chunk_embeddings/<org>/<kb>.parquet`, `memory_embeddings/<org>/<user>.parquet`)
with the model name, the dimension and a hash of the text that was embedded, so that only new or
changed texts are embedded again, and a model change re-embeds everything. BM25 indexes are
folders (`indexes/<table>/<org>/<scope>/`) written atomically and loaded without rebuilding.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from memcity_pipeline.lake.tables import EMBEDDINGS
from memcity_pipeline.search.bm25 import BM25Index
from memcity_pipeline.search.embeddings import Embedder, embedding_text


@dataclass
class EmbedStats:
    items: int = 0
    embedded: int = 0
    reused: int = 0
    model_changed_from: str | None = None


def index_texts(frame: pl.DataFrame) -> list[str]:
    """The text indexed for each enriched chunk: resolved text (or the original) + terms + summary."""
    out = []
    for row in frame.iter_rows(named=True):
        enriched = row.get("enrichment_status") == "enriched"
        text = (row.get("resolved_text") if enriched else None) or row["text"]
        out.append(
            embedding_text(
                text,
                row.get("key_terms") if enriched else None,
                row.get("summary") if enriched else None,
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
) -> tuple[pl.DataFrame, EmbedStats]:
    """Vectors for `ids`/`texts`, reusing `existing` rows of the same text and model."""
    stats = EmbedStats(items=len(ids))
    model = embedder.model_name
    old: dict[str, tuple[str, list[float]]] = {}
    if existing.height:
        models = set(existing["model"].unique().to_list())
        if models != {model}:
            stats.model_changed_from = ", ".join(sorted(m for m in models if m))
        else:
            for row in existing.select("item_id", "text_hash", "vector").iter_rows():
                old[row[0]] = (row[1], row[2])
    hashes = [text_hash(t) for t in texts]
    todo = [
        i
        for i, (item, h) in enumerate(zip(ids, hashes, strict=True))
        if old.get(item, ("",))[0] != h
    ]
    fresh = embedder.embed([texts[i] for i in todo], batch_size=batch_size) if todo else None
    new_vectors = {i: fresh[n] for n, i in enumerate(todo)} if fresh is not None else {}
    vectors: list[list[float]] = []
    for i, item in enumerate(ids):
        if i in new_vectors:
            vectors.append(np.asarray(new_vectors[i], dtype=np.float32).tolist())
        else:
            vectors.append(old[item][1])
    stats.embedded, stats.reused = len(todo), len(ids) - len(todo)
    dim = len(vectors[0]) if vectors else getattr(embedder, "dimension", 0)
    table = pa.table(
        {
            "org_id": [org_id] * len(ids),
            "scope_id": [scope_id] * len(ids),
            "item_id": ids,
            "text_hash": hashes,
            "model": [model] * len(ids),
            "dimension": pa.array([dim] * len(ids), pa.int32()),
            "vector": pa.array(vectors, pa.list_(pa.float32())),
        },
        schema=EMBEDDINGS,
    )
    return pl.from_arrow(table), stats  # type: ignore[return-value]


def vectors_of(frame: pl.DataFrame) -> np.ndarray:
    """The vectors of an embeddings frame as a float32 matrix (rows in frame order)."""
    if frame.height == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.asarray(frame["vector"].to_list(), dtype=np.float32)


def build_bm25(ids: list[str], texts: list[str], directory: Path) -> None:
    """Build and save a BM25 index atomically."""
    BM25Index.build(ids, texts).save(directory)
