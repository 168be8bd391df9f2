"""Retrieval quality on the sample corpus's labelled questions: recall@5, recall@10 and MRR for
BM25 alone, vectors alone and the hybrid, with enrichment on (the configured LLM; the embedded
SmolLM2 by default) and off.

    python bench/retrieval.py [--modes off,llm] [--home DIR]

A hit is relevant when its chunk comes from one of the question's `relevant_paths`; recall@k is
the share of questions with a relevant chunk in the top k, MRR the mean of 1/rank of the first.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memcity_pipeline.cli.ingest import ingest
from memcity_pipeline.cli.runner import copy_sample_corpus, sample_corpus_dir
from memcity_pipeline.search.fusion import vector_top_k
from memcity_pipeline.search.retrieval import _load
from memcity_pipeline.settings import get_settings


def _questions() -> list[dict]:
    path = sample_corpus_dir() / "eval" / "questions.jsonl"
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def _first_relevant(ranked: list[str], relevant_chunks: set[str]) -> int | None:
    for rank, chunk_id in enumerate(ranked, start=1):
        if chunk_id in relevant_chunks:
            return rank
    return None


def evaluate(mode: str, home: Path) -> dict[str, dict[str, float]]:
    os.environ["MEMCITY_HOME"] = str(home)
    os.environ["MEMCITY_ENRICHMENT"] = mode
    os.environ.pop("DAGSTER_HOME", None)
    settings = get_settings()
    copy_sample_corpus(settings.landing_dir)
    started = time.perf_counter()
    outcome = ingest(settings)
    if not outcome.success:
        failed = [f"{p.partition.key}: {p.failure}" for p in outcome.partitions if not p.success]
        why = "; ".join([outcome.layout_failure, *failed] if outcome.layout_failure else failed)
        raise SystemExit(f"ingestion failed ({mode}): {why}")
    print(f"  ingest ({mode}) took {time.perf_counter() - started:.1f} s", flush=True)

    from memcity_pipeline.settings import build_resources

    embedder = build_resources(settings)["embeddings"].get_embedder()
    lake = settings.lake_dir
    results: dict[str, list[int | None]] = {"bm25": [], "vector": [], "hybrid": []}
    for q in _questions():
        org, kb = q["org_id"], q["knowledge_base_id"]
        loaded = _load(lake, "chunks", org, kb, embedder, _rows)
        relevant = {
            cid
            for cid, row in loaded.rows.items()
            if any(row["source_path"].endswith("/" + p) for p in q["relevant_paths"])
        }
        index = loaded.index
        bm25 = [i for i, _ in index.bm25.query(q["question"], 10)]
        qv = embedder.embed([q["question"]])[0]
        vec = [index.ids[p] for p, _ in vector_top_k(index.vectors, qv, 10)]
        hyb = [h.id for h in index.search(q["question"], k=10, query_vector=qv)]
        for name, ranked in (("bm25", bm25), ("vector", vec), ("hybrid", hyb)):
            results[name].append(_first_relevant(ranked, relevant))
    out = {}
    for name, ranks in results.items():
        n = len(ranks)
        out[name] = {
            "recall@5": sum(1 for r in ranks if r and r <= 5) / n,
            "recall@10": sum(1 for r in ranks if r and r <= 10) / n,
            "mrr": sum(1 / r for r in ranks if r) / n,
        }
    return out


def _rows(lake: Path, org: str, kb: str) -> dict:
    from memcity_pipeline.lake.delta import read_rows
    from memcity_pipeline.lake.tables import scope_where

    chunks = read_rows(lake, "enriched_chunks", scope_where("enriched_chunks", org, kb))
    docs = read_rows(
        lake,
        "raw_documents",
        scope_where("raw_documents", org, kb),
        columns=["document_id", "source_path"],
    )
    return {r["chunk_id"]: r for r in chunks.join(docs, on="document_id").iter_rows(named=True)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", default="off,llm", help="enrichment modes to compare")
    parser.add_argument("--home", type=Path, default=None, help="keep the lakes here")
    args = parser.parse_args()
    base = args.home or Path(tempfile.mkdtemp(prefix="memcity-retrieval-"))
    print(f"{len(_questions())} labelled questions; lakes under {base}")
    table = []
    for mode in args.modes.split(","):
        scores = evaluate(mode, base / f"enrichment-{mode}")
        for retriever, s in scores.items():
            table.append((mode, retriever, s["recall@5"], s["recall@10"], s["mrr"]))
    print(f"\n{'enrichment':<11}{'retriever':<10}{'recall@5':>10}{'recall@10':>11}{'MRR':>8}")
    for mode, retriever, r5, r10, mrr in table:
        print(f"{mode:<11}{retriever:<10}{r5:>10.3f}{r10:>11.3f}{mrr:>8.3f}")


if __name__ == "__main__":
    main()
