"""BM25 keyword search with `bm25s`: build over texts with ids, save, load, query.

Texts are analysed the same way at indexing and at query time: lowercased, split into words of
two or more letters or digits, English stopwords dropped (the short Lucene list that ships with
`bm25s`), and stemmed with the Snowball English stemmer (`PyStemmer`), so that "indexes" finds
"indexing". A saved index is a folder that loads without rebuilding.
"""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
_WORD = re.compile(r"(?u)\b\w\w+\b")
_META = "meta.json"
_IDS = "ids.json"
_BM25_DIR = "bm25s"


@lru_cache(maxsize=1)
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


@lru_cache(maxsize=1)
def _stemmer() -> Any:
    try:
        import Stemmer
    except ImportError as error:
        raise RuntimeError("BM25 needs the PyStemmer package: pip install PyStemmer") from error
    return Stemmer.Stemmer("english")


def analyse(text: str) -> list[str]:
    """The index terms of `text`: lowercased words, English stopwords out, stemmed."""
    stop = _stopwords()
    words = [w for w in _WORD.findall(text.lower()) if w not in stop]
    return _stemmer().stemWords(words) if words else []


def write_dir_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh folder with `write(folder)` and move it into place as `target`.

    A reader sees either the old folder or the new one, never a half-written one (an existing
    target is moved aside for the instant of the swap, then deleted).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write(tmp)
        old: Path | None = None
        if target.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)
            )
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class BM25Index:
    """A BM25 index over texts, each known by a string id."""

    def __init__(self, ids: Sequence[str], retriever: Any | None) -> None:
        self.ids = list(ids)
        self._retriever = retriever

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """The bytes of the index's score arrays (its ids not counted)."""
        if self._retriever is None:
            return 0
        arrays = self._retriever.scores.values()
        return sum(int(a.nbytes) for a in arrays if isinstance(a, np.ndarray))

    @classmethod
    def build(
        cls, ids: Sequence[str], texts: Sequence[str], *, k1: float = 1.5, b: float = 0.75
    ) -> "BM25Index":
        """Index `texts` (one per id; ids must be unique)."""
        import bm25s

        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be unique")
        corpus = [analyse(t) for t in texts]
        if not any(corpus):  # no text has a term: nothing can match
            return cls(ids, None)
        retriever = bm25s.BM25(k1=k1, b=b)
        retriever.index(corpus, show_progress=False)
        return cls(ids, retriever)

    def save(self, directory: Path) -> None:
        """Write the index into `directory` (replaced atomically)."""
        write_dir_atomic(Path(directory), self.write_into)

    def write_into(self, folder: Path) -> None:
        """Write the index files into the existing, empty `folder` (not atomic; see `save`)."""
        if self._retriever is not None:
            self._retriever.save(str(folder / _BM25_DIR), show_progress=False)
        (folder / _IDS).write_text(json.dumps(self.ids, ensure_ascii=False), "utf-8")
        meta = {
            "format": FORMAT_VERSION,
            "kind": "bm25",
            "count": len(self.ids),
            "analyser": "lower+stopwords_en+snowball_english",
        }
        (folder / _META).write_text(json.dumps(meta), "utf-8")

    @classmethod
    def load(cls, directory: Path, *, mmap: bool = False) -> "BM25Index":
        """Open an index saved by `save`, without rebuilding it."""
        import bm25s

        directory = Path(directory)
        meta_path = directory / _META
        if not meta_path.is_file():
            raise FileNotFoundError(f"no BM25 index at {directory}")
        meta = json.loads(meta_path.read_text("utf-8"))
        if meta.get("format") != FORMAT_VERSION or meta.get("kind") != "bm25":
            raise ValueError(f"{directory} holds an index of another format: {meta}")
        ids = json.loads((directory / _IDS).read_text("utf-8"))
        if not (directory / _BM25_DIR).is_dir():  # saved without terms
            return cls(ids, None)
        retriever = bm25s.BM25.load(str(directory / _BM25_DIR), mmap=mmap, show_progress=False)
        if retriever.scores["num_docs"] != len(ids):
            raise ValueError(f"{directory}: {len(ids)} ids for {retriever.scores['num_docs']} docs")
        return cls(ids, retriever)

    def scores(self, query: str, mask: np.ndarray | None = None) -> np.ndarray:
        """The BM25 score of every indexed text for `query` (0 where no term matches)."""
        scores = np.zeros(len(self.ids), dtype=np.float32)
        if self._retriever is None:
            return scores
        token_ids = self._retriever.get_tokens_ids(analyse(query))
        if token_ids:
            scores = np.asarray(self._retriever.get_scores_from_ids(token_ids), dtype=np.float32)
        if mask is not None:
            scores = np.where(mask, scores, 0.0).astype(np.float32)
        return scores

    def query(
        self, query: str, k: int = 10, *, mask: np.ndarray | None = None
    ) -> list[tuple[str, float]]:
        """The best `k` (id, score) pairs for `query`, best first; only texts matching a term.

        `mask` (a boolean array over the indexed texts) keeps only the texts where it is True.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if mask is not None and len(mask) != len(self.ids):
            raise ValueError(f"mask has {len(mask)} entries for {len(self.ids)} texts")
        scores = self.scores(query, mask)
        return [
            (self.ids[i], float(scores[i])) for i in top_k_positions(scores, k) if scores[i] > 0
        ]


def top_k_positions(scores: np.ndarray, k: int) -> list[int]:
    """Positions of the `k` highest scores, best first (equal scores by position)."""
    n = len(scores)
    if n == 0 or k < 1:
        return []
    part = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
    order = np.lexsort((part, -scores[part]))
    return [int(p) for p in part[order]]
