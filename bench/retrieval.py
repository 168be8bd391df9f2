"""Retrieval quality: recall@5, recall@10 and MRR (and nDCG@10 on the Python docs) for BM25
alone, vectors alone and the hybrid.

    python bench/retrieval.py [--modes off,llm] [--home DIR]           # the sample corpus
    python bench/retrieval.py --corpus python-docs [--modes off] [--home DIR]

The sample corpus's labelled questions are scored by chunk, with enrichment on (the configured
LLM; the embedded SmolLM2 by default) and off: a hit is relevant when its chunk comes from one of
the question's `relevant_paths`; recall@k is the share of questions with a relevant chunk in the
top k, MRR the mean of 1/rank of the first.

`--corpus python-docs` ingests the 494 content pages of the Python 3.11 HTML documentation
(`apt-get install python3.11-doc`; `bench/python_docs_corpus.py`) as one knowledge base and
scores the development set `bench/python_docs/questions.jsonl` by page: each retriever's ranked
chunks are collapsed to their pages (a page at the rank of its best chunk), and a question is
answered at rank k when one of its target pages is among the first k pages. nDCG@10 counts
every target page (binary gains). With `--home` the ingested lake is kept and reused. Enrichment
on this corpus needs a real model (12,000+ chunks): `--modes llm` with `MEMCITY_LLM_BASE_URL` or
`OPENROUTER_API_KEY` set.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # python_docs_corpus

from memcity_pipeline.cli.ingest import ingest
from memcity_pipeline.cli.runner import copy_sample_corpus, sample_corpus_dir
from memcity_pipeline.search.fusion import FUSION, WEIGHTS, rrf_fuse, score_fuse
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
        vec = [index.ids[p] for p, _ in index.nearest(qv, 10)]
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


def _page_ranking(chunk_ids: list[str], rows: dict, pages: int = 10) -> list[str]:
    """The pages of `chunk_ids` in the order of their best chunk, the first `pages` of them."""
    ranked: list[str] = []
    for chunk_id in chunk_ids:
        page = rows[chunk_id]["source_path"]
        if page not in ranked:
            ranked.append(page)
            if len(ranked) == pages:
                break
    return ranked


def _page_scores(rankings: list[tuple[list[str], set[str]]]) -> dict[str, float]:
    """recall@5, recall@10, MRR and nDCG@10 over (ranked pages, target pages) pairs."""
    r5 = r10 = mrr = ndcg = 0.0
    for ranked, targets in rankings:
        hits = [i for i, page in enumerate(ranked[:10], start=1) if page in targets]
        r5 += bool(hits and hits[0] <= 5)
        r10 += bool(hits)
        mrr += 1 / hits[0] if hits else 0.0
        ideal = sum(1 / math.log2(i + 1) for i in range(1, min(len(targets), 10) + 1))
        ndcg += sum(1 / math.log2(i + 1) for i in hits) / ideal
    n = len(rankings) or 1
    return {"recall@5": r5 / n, "recall@10": r10 / n, "mrr": mrr / n, "ndcg@10": ndcg / n}


def _percentiles(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p50 = ordered[len(ordered) // 2]
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"p50 {p50 * 1000:7.1f} ms   p95 {p95 * 1000:7.1f} ms"


def _step_seconds(home: Path, since: float) -> dict[str, float]:
    """Seconds per asset step of the steps that started after `since` (epoch seconds) on the
    home's instance (all partitions summed)."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(home / "dagster_home")
    totals: dict[str, float] = {}
    with dg.DagsterInstance.get() as instance:
        for run in instance.get_runs():
            for stat in instance.get_run_step_stats(run.run_id):
                if stat.start_time and stat.end_time and stat.start_time >= since:
                    step = stat.step_key.split("[")[0]
                    totals[step] = totals.get(step, 0.0) + stat.end_time - stat.start_time
    return totals


CANDIDATES = 50  # per retriever, as `get_context` fuses


def _fused(
    ranked: dict[str, list[tuple[str, float]]], method: str, k: int, weights: dict[str, float]
) -> list[str]:
    top = {name: pairs[:CANDIDATES] for name, pairs in ranked.items()}
    if method == "scores":
        return [h.id for h in score_fuse(top, weights)]
    return [h.id for h in rrf_fuse({n: [i for i, _ in p] for n, p in top.items()}, k, weights)]


def _tune(
    lists: list[dict[str, list[tuple[str, float]]]],
    targets: list[set[str]],
    named: list[tuple[dict[str, list[tuple[str, float]]], set[str]]],
    rows: dict,
) -> None:
    """The fusion over a grid: weighted RRF by its constant k and the vector weight, and fusion
    of min-max normalised scores by the vector weight. The pick beats each retriever alone on
    MRR and recall@10 of the questions and on MRR of the queries by name, and has the highest
    sum of the three among those that do."""

    def scores(method: str, k: int, w: float) -> tuple[float, float, float]:
        def fuse(lst: dict[str, list[tuple[str, float]]]) -> list[str]:
            if method in ("bm25", "vector"):
                return [i for i, _ in lst[method]]
            return _fused(lst, method, k, {"bm25": 1.0, "vector": w})

        asked = _page_scores(
            [(_page_ranking(fuse(lists[i]), rows), targets[i]) for i in range(len(lists))]
        )
        by_name = _page_scores([(_page_ranking(fuse(lst), rows), t) for lst, t in named])
        return asked["mrr"], asked["recall@10"], by_name["mrr"]

    inputs = {name: scores(name, 0, 0.0) for name in ("bm25", "vector")}
    vector_weights = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    grid = [("rrf", k, w) for k in (5, 10, 20, 40, 60) for w in vector_weights]
    grid += [("scores", 0, w) for w in vector_weights]
    results = {g: scores(*g) for g in grid}
    best_alone = [max(v[m] for v in inputs.values()) for m in range(3)]

    def beats_both(g: tuple[str, int, float]) -> bool:
        mrr, r10, by_name = results[g]
        return mrr > best_alone[0] and r10 >= best_alone[1] and by_name > best_alone[2]

    beats = [g for g in grid if beats_both(g)]
    best = max(beats or grid, key=lambda g: (sum(results[g]), -g[1]))
    print("\n  fusion: MRR / recall@10 of the questions / MRR of the queries by name")
    for name, (mrr, r10, by_name) in inputs.items():
        print(f"  {name + ' alone':<12}{mrr:>8.3f}/{r10:.3f}/{by_name:.3f}")
    print("  " + " " * 12 + "".join(f"{f'vector x{w}':>20}" for w in vector_weights))
    for method, k in [("rrf", k) for k in (5, 10, 20, 40, 60)] + [("scores", 0)]:
        label = f"RRF k={k}" if method == "rrf" else "scores"
        cells = "".join(
            "{:>8.3f}/{:.3f}/{:.3f}".format(*results[(method, k, w)]) for w in vector_weights
        )
        print(f"  {label:<12}{cells}")
    name = f"RRF k={best[1]}" if best[0] == "rrf" else "normalised scores"
    print(
        f"  {len(beats)} of {len(grid)} beat both retrievers on all three; the pick: {name}, "
        f"vector weight {best[2]} (BM25 1); configured: {FUSION}, {WEIGHTS}"
    )


def _cold_start(settings_home: Path, calls: int = 10) -> list[float]:
    """Wall seconds of `memcity search` from a fresh process, `calls` times."""
    import python_docs_corpus as corpus

    memcity = Path(sys.executable).parent / "memcity"
    cmd = [str(memcity)] if memcity.exists() else [sys.executable, "-m", "memcity_pipeline.cli"]
    env = {**os.environ, "MEMCITY_HOME": str(settings_home)}
    out = []
    for i in range(calls):
        started = time.perf_counter()
        subprocess.run(
            [*cmd, "search", "--org", corpus.ORG, "--kb", corpus.KB, "--json",
             f"how do I read a file line by line {i}"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        out.append(time.perf_counter() - started)
    return out


def evaluate_python_docs(mode: str, home: Path, tune: bool) -> dict[str, dict[str, float]]:
    """Page-level scores of BM25, vectors and the hybrid on the Python docs development set,
    with the ingest's time, search latencies and (with `tune`) the fusion's weight grid."""
    import python_docs_corpus as corpus  # bench/python_docs_corpus.py, beside this script

    from memcity_pipeline.api import get_context

    os.environ["MEMCITY_HOME"] = str(home)
    os.environ["MEMCITY_ENRICHMENT"] = mode
    os.environ.pop("DAGSTER_HOME", None)
    settings = get_settings()
    questions = corpus.load_questions()
    pages = corpus.copy_to_landing(settings.landing_dir)
    started, epoch = time.perf_counter(), time.time()
    outcome = ingest(settings, kbs=[f"{corpus.ORG}/{corpus.KB}"])
    if not outcome.success:
        failed = [f"{p.partition.key}: {p.failure}" for p in outcome.partitions if not p.success]
        raise SystemExit(f"ingestion failed ({mode}): {'; '.join(failed)}")
    wall = time.perf_counter() - started
    print(f"  {pages} pages, {len(questions)} questions", flush=True)
    steps = _step_seconds(home, epoch)
    if steps.get("chunk_embeddings"):
        embed = steps.get("chunk_embeddings", 0.0)
        print(
            f"  ingest ({mode}, chunks of {settings.chunk_tokens} tokens): {wall:.0f} s wall; "
            f"chunk_embeddings {embed:.0f} s ({embed / wall:.0%} of the wall time); steps: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(steps.items(), key=lambda x: -x[1])),
            flush=True,
        )
    else:
        print(f"  ingest ({mode}): up to date", flush=True)

    from memcity_pipeline.settings import build_resources

    embedder = build_resources(settings)["embeddings"].get_embedder()
    loaded = _load(settings.lake, "chunks", corpus.ORG, corpus.KB, embedder, _rows)
    index, depth = loaded.index, 100  # chunks fetched to fill 10 pages
    vectors = int(index.vectors.shape[0])
    print(f"  {len(index)} chunks, {vectors} vectors ({vectors / len(index):.2f} per chunk)")
    rankings: dict[str, list[tuple[list[str], set[str]]]] = {"bm25": [], "vector": [], "hybrid": []}
    if settings.rerank == "llm":
        rankings["hybrid+llm"] = []
    lists, targets, without, with_embedding = [], [], [], []
    for q in questions:
        wanted = {corpus.source_path(t) for t in q["targets"]}
        qv = embedder.embed([q["question"]])[0]
        started = time.perf_counter()
        hybrid = [
            h.id
            for h in index.search(q["question"], k=depth, candidates=CANDIDATES, query_vector=qv)
        ]
        without.append(time.perf_counter() - started)
        started = time.perf_counter()
        get_context(corpus.ORG, corpus.KB, q["question"], 10, settings=settings)
        with_embedding.append(time.perf_counter() - started)
        scored = {
            "bm25": index.bm25.query(q["question"], depth),
            "vector": [(index.ids[p], v) for p, v in index.nearest(qv, depth)],
        }
        lists.append(scored)
        targets.append(wanted)
        ranked = {name: [i for i, _ in pairs] for name, pairs in scored.items()}
        ranked["hybrid"] = hybrid
        if settings.rerank == "llm":
            reranked = get_context(corpus.ORG, corpus.KB, q["question"], 10, settings=settings)
            ranked["hybrid+llm"] = [h.chunk_id for h in reranked]
        for name, chunk_ids in ranked.items():
            rankings[name].append((_page_ranking(chunk_ids, loaded.rows), wanted))
    by_name = corpus.load_questions(corpus.BY_NAME)
    named: dict[str, list[tuple[list[str], set[str]]]] = {"bm25": [], "vector": [], "hybrid": []}
    named_lists = []
    for q in by_name:
        wanted = {corpus.source_path(t) for t in q["targets"]}
        qv = embedder.embed([q["question"]])[0]
        scored = {
            "bm25": index.bm25.query(q["question"], depth),
            "vector": [(index.ids[p], v) for p, v in index.nearest(qv, depth)],
        }
        named_lists.append((scored, wanted))
        ranked = {
            "bm25": [i for i, _ in scored["bm25"]],
            "vector": [i for i, _ in scored["vector"]],
            "hybrid": [
                h.id
                for h in index.search(
                    q["question"], k=depth, candidates=CANDIDATES, query_vector=qv
                )
            ],
        }
        for name, chunk_ids in ranked.items():
            named[name].append((_page_ranking(chunk_ids, loaded.rows), wanted))
    print(f"  {len(by_name)} queries that name the API (`functools.lru_cache`): MRR", end="")
    print(", ".join(f" {n} {_page_scores(r)['mrr']:.3f}" for n, r in named.items()))
    print(f"  hybrid search, warm, without the query embedding: {_percentiles(without)}")
    print(f"  get_context, warm, with the query embedding:      {_percentiles(with_embedding)}")
    cold = _cold_start(home)
    print(f"  `memcity search` from a cold start (10 calls):     {_percentiles(cold)}")
    if tune:
        _tune(lists, targets, named_lists, loaded.rows)
    return {name: _page_scores(r) for name, r in rankings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", choices=["sample", "python-docs"], default="sample")
    parser.add_argument("--modes", default=None, help="enrichment modes (default: off,llm; off)")
    parser.add_argument("--home", type=Path, default=None, help="keep the lakes here")
    parser.add_argument(
        "--tune", action="store_true", help="python-docs: print the fusion's weight grid"
    )
    args = parser.parse_args()
    docs = args.corpus == "python-docs"
    if docs:
        try:
            import python_docs_corpus

            python_docs_corpus.docs_root()
        except FileNotFoundError as exc:
            print(f"skipped: {exc}")
            return
    modes = (args.modes or ("off" if docs else "off,llm")).split(",")
    base = args.home or Path(tempfile.mkdtemp(prefix="memcity-retrieval-"))
    print(f"{args.corpus}; lakes under {base}")
    table = []
    for mode in modes:
        home = base / (f"python-docs-{mode}" if docs else f"enrichment-{mode}")
        scores = evaluate_python_docs(mode, home, args.tune) if docs else evaluate(mode, home)
        for retriever, s in scores.items():
            table.append((mode, retriever, s))
    metrics = ["recall@5", "recall@10", "mrr", *(["ndcg@10"] if docs else [])]
    print(f"\n{'enrichment':<11}{'retriever':<11}" + "".join(f"{m:>11}" for m in metrics))
    for mode, retriever, s in table:
        print(f"{mode:<11}{retriever:<11}" + "".join(f"{s[m]:>11.3f}" for m in metrics))
    if docs:
        print("goals (enrichment off, hybrid): recall@10 >= 0.93, MRR >= 0.75")


if __name__ == "__main__":
    main()
