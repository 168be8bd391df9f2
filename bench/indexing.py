"""Indexing and search figures: embedding throughput, BM25 build time, hybrid search latency.

    python bench/indexing.py --chunks 5000

Prints, measured in one run (these machines are shared and noisy, so the embedding figure is a
ratio to a baseline measured alongside it):

- chunks/s of the pipeline's embedding stage (`sync_embeddings` with the local model on ONNX
  Runtime) against a bare sentence-transformers (torch) `encode` of the same ~230-token texts,
  interleaved group by group (goal: ratio >= 1.5), and the lowest cosine between a text's two
  vectors (goal >= 0.999 on every text);
- chunking speed of `chunk_document` on the same synthetic text;
- BM25 build time, scaled to 10k chunks;
- hybrid search latency p50/p95 over `--chunks` chunks, excluding and including the query
  embedding (target p50 < 30 ms excluding it). The index vectors are random unit vectors, since
  embedding thousands of chunks on CPU would take minutes and latency does not depend on them;
  the query embeddings are real;
- peak resident memory of the process.
"""

import argparse
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memcity_pipeline.enrichment.chunking import chunk_document
from memcity_pipeline.enrichment.tokens import count_tokens
from memcity_pipeline.search.bm25 import BM25Index
from memcity_pipeline.search.embeddings import LocalMiniLMEmbedder, l2_normalise
from memcity_pipeline.search.fusion import HybridIndex

VOCAB = [
    "account",
    "audit",
    "balance",
    "budget",
    "capital",
    "cargo",
    "carrier",
    "clause",
    "client",
    "contract",
    "cost",
    "customer",
    "delivery",
    "demand",
    "deposit",
    "engine",
    "estimate",
    "freight",
    "harbour",
    "insurance",
    "interest",
    "inventory",
    "invoice",
    "ledger",
    "lender",
    "liability",
    "margin",
    "market",
    "merger",
    "order",
    "payment",
    "pension",
    "policy",
    "port",
    "premium",
    "price",
    "profit",
    "pump",
    "quarter",
    "rate",
    "region",
    "report",
    "revenue",
    "risk",
    "sales",
    "schedule",
    "sensor",
    "service",
    "shipment",
    "storage",
    "supplier",
    "tariff",
    "tax",
    "term",
    "trade",
    "valve",
    "vendor",
    "volume",
    "warranty",
    "warehouse",
    "yield",
    "the",
    "a",
    "of",
    "to",
    "in",
    "and",
    "for",
    "with",
    "on",
    "by",
    "from",
    "at",
    "as",
    "is",
    "was",
    "will",
    "has",
    "have",
    "after",
    "before",
    "under",
    "over",
    "between",
    "during",
    "each",
    "every",
    "their",
    "this",
    "that",
    "these",
    "those",
    "which",
    "while",
]


def synthetic_chunk(rng: random.Random, target_tokens: int = 230) -> str:
    """A text of about `target_tokens` word pieces made of sentences of random words."""
    sentences: list[str] = []
    tokens = 0
    while tokens < target_tokens:
        s = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(8, 20))).capitalize() + "."
        sentences.append(s)
        tokens += count_tokens(s)
    return " ".join(sentences)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def bench_embedding(texts: list[str], batch: int) -> None:
    """The pipeline's embedding stage (`sync_embeddings`, as `chunk_embeddings` runs it) on ONNX
    Runtime, fp32 and int8, against a bare sentence-transformers `encode` of the same texts,
    interleaved group by group; and the lowest cosine of a text's vectors to torch's."""
    import polars as pl

    from memcity_pipeline.lake.delta import empty_frame
    from memcity_pipeline.search.indexes import sync_embeddings, vectors_of

    stages = {
        "onnx": LocalMiniLMEmbedder(backend="onnx"),
        "onnx-int8": LocalMiniLMEmbedder(backend="onnx-int8"),
    }
    model = LocalMiniLMEmbedder(backend="torch").model
    none: pl.DataFrame = empty_frame("chunk_embeddings")
    for embedder in stages.values():  # warm-up (loads the models)
        embedder.embed(texts[:batch], batch_size=batch)
    model.encode(texts[:batch], batch_size=batch, show_progress_bar=False)
    seconds = dict.fromkeys([*stages, "bare"], 0.0)
    cosines: dict[str, list[np.ndarray]] = {name: [] for name in stages}
    group = 128
    for n, i in enumerate(range(0, len(texts), group)):
        part = texts[i : i + group]
        ids = [f"c{i + j}" for j in range(len(part))]
        order = ["bare", *stages]
        order = order[n % len(order) :] + order[: n % len(order)]  # rotate who goes first
        vectors: dict[str, np.ndarray] = {}
        for which in order:
            t0 = time.perf_counter()
            if which == "bare":
                vectors[which] = model.encode(
                    part, batch_size=batch, show_progress_bar=False, normalize_embeddings=True
                )
            else:
                frame, _ = sync_embeddings("org", "kb", ids, part, none, stages[which])
                vectors[which], parts = vectors_of(frame)
                assert (parts == 1).all(), "a benchmark text is longer than the model's window"
            seconds[which] += time.perf_counter() - t0
        for name in stages:
            cosines[name].append(np.sum(vectors[name] * vectors["bare"], axis=1))
    n = len(texts)
    print(f"embedding   {n} chunks of ~230 tokens (each within the model's window)")
    print(f"  SentenceTransformer.encode (torch)      {n / seconds['bare']:7.1f} chunks/s")
    for name in stages:
        worst = float(np.concatenate(cosines[name]).min())
        print(
            f"  pipeline stage, ONNX Runtime {name:<10} {n / seconds[name]:7.1f} chunks/s   "
            f"{seconds['bare'] / seconds[name]:5.2f}x torch   lowest cosine to torch {worst:.5f}"
        )
    print("  goals: the stage >= 1.50x torch; fp32 cosine >= 0.999 on every text")


def bench_chunking(texts: list[str]) -> None:
    document = "\n\n".join(texts)
    t0 = time.perf_counter()
    chunks = chunk_document(document, None, max_tokens=512, overlap_tokens=64)
    dt = time.perf_counter() - t0
    mb = len(document.encode()) / 1e6
    print(f"chunking    {mb:.1f} MB into {len(chunks)} chunks of <= 512 tokens")
    print(f"  chunk_document                 {mb / dt:8.2f} MB/s ({dt:.2f} s)")


def bench_bm25(ids: list[str], texts: list[str]) -> None:
    t0 = time.perf_counter()
    BM25Index.build(ids, texts)
    dt = time.perf_counter() - t0
    print(f"bm25        build over {len(texts)} chunks  {dt:6.2f} s")
    print(f"  per 10k chunks                 {dt * 10_000 / len(texts):8.2f} s")


def bench_search(ids: list[str], texts: list[str], queries: int, with_embed: int) -> None:
    rng = np.random.default_rng(0)
    vectors = l2_normalise(rng.standard_normal((len(texts), 384)).astype(np.float32))
    embedder = LocalMiniLMEmbedder()
    index = HybridIndex.build(ids, texts, vectors, embedder)
    words = random.Random(1)
    qs = [
        " ".join(words.choice(VOCAB[:60]) for _ in range(words.randint(2, 6)))
        for _ in range(queries)
    ]
    qvecs = embedder.embed(qs)
    for q, v in zip(qs[:5], qvecs[:5], strict=True):  # warm-up
        index.search(q, 10, 50, v)
    excl = []
    for q, v in zip(qs, qvecs, strict=True):
        t0 = time.perf_counter()
        index.search(q, k=10, candidates=50, query_vector=v)
        excl.append((time.perf_counter() - t0) * 1000)
    incl = []
    for q in qs[:with_embed]:
        t0 = time.perf_counter()
        index.search(q, k=10, candidates=50)
        incl.append((time.perf_counter() - t0) * 1000)
    print(f"search      hybrid k=10, 50 candidates each, over {len(texts)} chunks")
    print(
        f"  excluding query embedding      p50 {percentile(excl, 50):6.2f} ms   "
        f"p95 {percentile(excl, 95):6.2f} ms   ({len(excl)} queries; target p50 < 30 ms)"
    )
    print(
        f"  including query embedding      p50 {percentile(incl, 50):6.2f} ms   "
        f"p95 {percentile(incl, 95):6.2f} ms   ({len(incl)} queries)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=5000, help="chunks in the BM25/search index")
    parser.add_argument("--embed-chunks", type=int, default=256, help="chunks embedded twice")
    parser.add_argument("--batch", type=int, default=32, help="embedding batch size")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--queries-with-embedding", type=int, default=100)
    args = parser.parse_args()

    rng = random.Random(0)
    t0 = time.perf_counter()
    texts = [synthetic_chunk(rng) for _ in range(args.chunks)]
    ids = [f"chk_{i:06d}" for i in range(len(texts))]
    print(f"made {len(texts)} synthetic chunks in {time.perf_counter() - t0:.1f} s\n")

    bench_chunking(texts)
    bench_bm25(ids, texts)
    bench_search(ids, texts, args.queries, args.queries_with_embedding)
    bench_embedding(texts[: args.embed_chunks], args.batch)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory  {peak_mb:.0f} MB (resident, whole run)")


if __name__ == "__main__":
    main()
