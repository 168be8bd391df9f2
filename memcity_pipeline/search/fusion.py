"""Hybrid search: BM25 and vector candidates fused by their normalised scores (or by weighted
reciprocal rank fusion, RRF).

`HybridIndex` keeps, for one collection of texts known by string ids, a BM25 index and a matrix
of unit-length vectors (one or more per text: a text scores by its best vector), saves both into
one folder and answers queries with fused hits. It knows nothing of organisations or documents:
callers keep such metadata beside it, keyed by id, and restrict a search to some rows with a
boolean `mask`.

The fusion (`FUSION`, `WEIGHTS`: min-max normalised scores, the vector's weighing twice BM25's)
was chosen on the Python documentation's development sets against weighted RRF (k from 5 to 60)
and other weights: of the settings that beat both retrievers on MRR and recall@10 of the
paraphrased questions and on MRR of queries that name the API, the best by the sum of the three
(`bench/retrieval.py --corpus python-docs --tune` prints the grid; the README's "Indexes and
search" section gives the figures).
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memcity_pipeline.search.bm25 import BM25Index, top_k_positions, write_dir_atomic
from memcity_pipeline.search.embeddings import Embedder, l2_normalise

BM25 = "bm25"
VECTOR = "vector"
FUSION = "scores"  # or "rrf": how `HybridIndex.search` fuses (see the module docstring)
RRF_K = 40  # for FUSION = "rrf"
WEIGHTS: dict[str, float] = {BM25: 1.0, VECTOR: 2.0}
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FusedHit:
    """One fused result: its id, fused score, and the rank (1-based) in each list that found it."""

    id: str
    score: float
    retrievers: dict[str, int]
    retriever_scores: dict[str, float] = field(default_factory=dict)


def _checked(weights: Mapping[str, float] | None) -> Mapping[str, float]:
    """The fusion weights by list name (none: every list weighs 1); ValueError if one is < 0."""
    weights = weights or {}
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"weights must be >= 0, got {dict(weights)}")
    return weights


def _best_first(hits: list[FusedHit]) -> list[FusedHit]:
    """Hits by score, best first; equal scores by their best rank, then by id."""
    return sorted(hits, key=lambda h: (-h.score, min(h.retrievers.values()), h.id))


def rrf_fuse(
    ranked_lists: Mapping[str, Sequence[str]],
    k: int = RRF_K,
    weights: Mapping[str, float] | None = None,
) -> list[FusedHit]:
    """Fuse ranked id lists: score(id) = sum over the lists holding it of w / (k + rank), where
    w is the list's weight in `weights` (1 for a list it does not name).

    Ranks start at 1; an id repeated within one list counts at its first place. Hits come best
    first; equal scores are ordered by their best rank, then by id.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    weights = _checked(weights)
    ranks: dict[str, dict[str, int]] = {}
    for name, ids in ranked_lists.items():
        for rank, hit_id in enumerate(ids, start=1):
            found = ranks.setdefault(hit_id, {})
            found.setdefault(name, rank)
    hits = [
        FusedHit(hit_id, sum(weights.get(n, 1.0) / (k + r) for n, r in found.items()), found)
        for hit_id, found in ranks.items()
    ]
    return _best_first(hits)


def score_fuse(
    scored_lists: Mapping[str, Sequence[tuple[str, float]]],
    weights: Mapping[str, float] | None = None,
) -> list[FusedHit]:
    """Fuse scored candidate lists by their normalised scores: score(id) = sum over the lists of
    w * (s - min) / (max - min), the min and max taken over that list's candidates (an id a list
    lacks adds 0; a list whose scores are all equal gives each of its ids w).

    Ranks (1-based, by list order) are kept in `retrievers` as with `rrf_fuse`. Hits come best
    first; equal scores are ordered by their best rank, then by id.
    """
    weights = _checked(weights)
    ranks: dict[str, dict[str, int]] = {}
    totals: dict[str, float] = {}
    for name, scored in scored_lists.items():
        if not scored:
            continue
        values = [v for _, v in scored]
        low, span = min(values), max(values) - min(values)
        w = weights.get(name, 1.0)
        for rank, (hit_id, value) in enumerate(scored, start=1):
            found = ranks.setdefault(hit_id, {})
            if name in found:
                continue
            found[name] = rank
            totals[hit_id] = totals.get(hit_id, 0.0) + w * ((value - low) / span if span else 1.0)
    hits = [FusedHit(hit_id, totals[hit_id], found) for hit_id, found in ranks.items()]
    return _best_first(hits)


def vector_top_k(
    matrix: np.ndarray,
    query: np.ndarray,
    k: int,
    *,
    mask: np.ndarray | None = None,
    parts: np.ndarray | None = None,
) -> list[tuple[int, float]]:
    """The `k` items closest to `query`: (item, cosine), best first. `matrix` holds unit-length
    rows; item i owns `parts[i]` consecutive rows (one each without `parts`) and scores by its
    best one. The query is normalised here; `mask` (boolean, one per item) keeps only the items
    where it is True.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if matrix.shape[0] == 0:
        return []
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    if q.shape[0] != matrix.shape[1]:
        raise ValueError(f"query has dimension {q.shape[0]}, the index {matrix.shape[1]}")
    norm = float(np.linalg.norm(q))
    if norm > 0:
        q = q / norm
    scores = matrix @ q
    if parts is not None and len(parts) != matrix.shape[0]:
        starts = np.concatenate([[0], np.cumsum(parts)[:-1]])
        scores = np.maximum.reduceat(scores, starts)
    if mask is not None:
        if len(mask) != scores.shape[0]:
            raise ValueError(f"mask has {len(mask)} entries for {scores.shape[0]} items")
        scores = np.where(mask, scores, -np.inf)
        k = min(k, int(np.count_nonzero(mask)))
    return [(p, float(scores[p])) for p in top_k_positions(scores, k)]


class HybridIndex:
    """BM25 plus vectors over one collection of texts, searched with fused scores (or RRF).

    `parts` (one count per id, summing to the rows of `vectors`) says how many consecutive
    vectors each text owns; without it, one each.
    """

    def __init__(
        self,
        ids: Sequence[str],
        bm25: BM25Index,
        vectors: np.ndarray,
        model_name: str,
        embedder: Embedder | None = None,
        parts: np.ndarray | None = None,
    ) -> None:
        if parts is not None:
            parts = np.asarray(parts, dtype=np.int64)
            if len(parts) != len(ids) or int(parts.sum()) != vectors.shape[0] or (parts < 1).any():
                raise ValueError(
                    f"{len(ids)} ids own {int(parts.sum())} vectors by `parts`, "
                    f"the matrix has {vectors.shape[0]}"
                )
            if len(parts) == vectors.shape[0]:
                parts = None  # one vector each
        if len(bm25) != len(ids) or (parts is None and vectors.shape[0] != len(ids)):
            raise ValueError(
                f"{len(ids)} ids, {len(bm25)} BM25 rows and {vectors.shape[0]} vectors differ"
            )
        self.ids = list(ids)
        self.bm25 = bm25
        self.vectors = vectors
        self.parts = parts
        self.model_name = model_name
        self.embedder = embedder
        self._positions = {hit_id: i for i, hit_id in enumerate(self.ids)}

    @property
    def nbytes(self) -> int:
        """About how much memory the index holds (vectors and BM25 arrays), in bytes."""
        return int(self.vectors.nbytes) + self.bm25.nbytes + 100 * len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dimension(self) -> int:
        """The vector dimension."""
        return int(self.vectors.shape[1])

    def nearest(
        self, query_vector: np.ndarray, k: int, *, mask: np.ndarray | None = None
    ) -> list[tuple[int, float]]:
        """The `k` texts whose best vector is closest to `query_vector`: (position, cosine)."""
        return vector_top_k(self.vectors, query_vector, k, mask=mask, parts=self.parts)

    def position(self, hit_id: str) -> int:
        """The row of `hit_id` (for building masks); KeyError when it is not indexed."""
        return self._positions[hit_id]

    @classmethod
    def build(
        cls,
        ids: Sequence[str],
        texts: Sequence[str],
        vectors: np.ndarray | None,
        embedder: Embedder | None,
        *,
        model_name: str | None = None,
    ) -> "HybridIndex":
        """Index `texts` by `ids`, with given `vectors` (one row per text) or `embedder`'s."""
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
        if vectors is None:
            if embedder is None:
                raise ValueError("give the vectors or an embedder to compute them")
            vectors = embedder.embed(list(texts))
        name = embedder.model_name if embedder is not None else model_name
        if not name:
            raise ValueError("the model name of the vectors is needed (embedder or model_name)")
        if vectors.ndim != 2 or vectors.shape[0] != len(ids):
            raise ValueError(f"vectors of shape {vectors.shape} for {len(ids)} texts")
        return cls(ids, BM25Index.build(ids, texts), l2_normalise(vectors), name, embedder)

    def save(self, directory: Path) -> None:
        """Write the index into `directory` (replaced atomically)."""

        def write(folder: Path) -> None:
            (folder / "bm25").mkdir()
            self.bm25.write_into(folder / "bm25")
            np.save(folder / "vectors.npy", np.ascontiguousarray(self.vectors, dtype=np.float32))
            if self.parts is not None:
                np.save(folder / "parts.npy", self.parts)
            (folder / "ids.json").write_text(json.dumps(self.ids, ensure_ascii=False), "utf-8")
            meta = {
                "format": FORMAT_VERSION,
                "kind": "hybrid",
                "count": len(self.ids),
                "model_name": self.model_name,
                "dimension": self.dimension,
            }
            (folder / "meta.json").write_text(json.dumps(meta), "utf-8")

        write_dir_atomic(Path(directory), write)

    @classmethod
    def load(
        cls, directory: Path, embedder: Embedder | None = None, *, mmap: bool = False
    ) -> "HybridIndex":
        """Open an index saved by `save`; `embedder` (same model) embeds queries."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no hybrid index at {directory}")
        meta = json.loads(meta_path.read_text("utf-8"))
        if meta.get("format") != FORMAT_VERSION or meta.get("kind") != "hybrid":
            raise ValueError(f"{directory} holds an index of another format: {meta}")
        if embedder is not None and embedder.model_name != meta["model_name"]:
            raise ValueError(
                f"the index at {directory} was built with {meta['model_name']}, "
                f"the query embedder is {embedder.model_name}"
            )
        ids = json.loads((directory / "ids.json").read_text("utf-8"))
        vectors = np.load(directory / "vectors.npy", mmap_mode="r" if mmap else None)
        parts = np.load(directory / "parts.npy") if (directory / "parts.npy").is_file() else None
        bm25 = BM25Index.load(directory / "bm25", mmap=mmap)
        return cls(ids, bm25, vectors, meta["model_name"], embedder, parts)

    def search(
        self,
        query: str,
        k: int = 10,
        candidates: int = 50,
        query_vector: np.ndarray | None = None,
        *,
        mask: np.ndarray | None = None,
        rrf_k: int = RRF_K,
        weights: Mapping[str, float] | None = None,
        fusion: str = FUSION,
    ) -> list[FusedHit]:
        """The best `k` hits for `query`: the top `candidates` of BM25 and of vectors, fused
        with `weights` (default `WEIGHTS`) by `fusion`: `rrf` (with `rrf_k`) or `scores`.

        `query_vector` saves embedding the query (needed when the index has no embedder);
        `mask` (boolean, one per text) keeps only the texts where it is True.
        """
        if not query.strip():
            raise ValueError("the query is empty")
        if k < 1 or candidates < 1:
            raise ValueError(f"k and candidates must be >= 1, got {k} and {candidates}")
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
        keyword = self.bm25.query(query, candidates, mask=mask)
        if query_vector is None:
            if self.embedder is None:
                raise ValueError("this index has no embedder: pass query_vector")
            query_vector = self.embedder.embed([query])[0]
        nearest = self.nearest(query_vector, candidates, mask=mask)
        scored = {BM25: keyword, VECTOR: [(self.ids[p], v) for p, v in nearest]}
        weights = WEIGHTS if weights is None else weights
        if fusion == "scores":
            fused = score_fuse(scored, weights)
        elif fusion == "rrf":
            ranked = {name: [i for i, _ in pairs] for name, pairs in scored.items()}
            fused = rrf_fuse(ranked, k=rrf_k, weights=weights)
        else:
            raise ValueError(f"fusion must be rrf or scores, not {fusion!r}")
        raw: dict[str, dict[str, float]] = {}
        for hit_id, score in keyword:
            raw.setdefault(hit_id, {})[BM25] = score
        for p, score in nearest:
            raw.setdefault(self.ids[p], {})[VECTOR] = score
        return [FusedHit(h.id, h.score, h.retrievers, raw.get(h.id, {})) for h in fused[:k]]
