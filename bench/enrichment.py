"""Enrichment cost on the sample corpus: LLM calls per chunk, prompt tokens per chunk, and the LLM
calls of an immediate second run (which must be 0).

    python bench/enrichment.py [--files N (default 2; 0 = all)] [--home DIR]

Uses the configured LLM (the embedded SmolLM2 by default: slow on a CPU, so `--files` limits the
knowledge-base files copied from the sample corpus). The response cache is bypassed on the first
run so that its figures are real calls.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memcity_pipeline.cli.ingest import IngestOutcome, ingest
from memcity_pipeline.cli.runner import sample_corpus_dir
from memcity_pipeline.settings import get_settings


def _copy_files(landing: Path, limit: int | None) -> int:
    src = sample_corpus_dir() / "orgs"
    kb_files = sorted(p for p in src.glob("brambleway/knowledge_bases/*/**/*") if p.is_file())
    chosen = kb_files[:limit] if limit else kb_files
    for path in chosen:
        dest = landing / "orgs" / path.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    return len(chosen)


def _total(outcome: IngestOutcome, asset: str, key: str) -> float:
    """`key` of `asset`'s metadata summed over the partitions (knowledge bases) that ran."""
    return sum(m[key] for m in outcome.materializations(asset))


def _figures(outcome: IngestOutcome) -> dict[str, float]:
    def both(key: str) -> float:
        return _total(outcome, "document_structure", key) + _total(outcome, "enriched_chunks", key)

    return {
        "chunks": _total(outcome, "chunks", "dagster/row_count"),
        "llm_calls": both("llm_calls"),
        "cache_hits": both("cache_hits"),
        "prompt_tokens": both("prompt_tokens"),
        "completion_tokens": both("completion_tokens"),
        "failed_chunks": _total(outcome, "enriched_chunks", "chunks_failed"),
        "failed_documents": _total(outcome, "document_structure", "failed"),
    }


def _failure(outcome: IngestOutcome) -> str:
    failed = [f"{p.partition.key}: {p.failure}" for p in outcome.partitions if not p.success]
    return "; ".join([outcome.layout_failure, *failed] if outcome.layout_failure else failed)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=2, help="knowledge-base files to use (0: all)")
    parser.add_argument("--home", type=Path, default=None)
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="memcity-enrichment-"))
    os.environ["MEMCITY_HOME"] = str(home)
    os.environ["MEMCITY_ENRICHMENT"] = "llm"
    os.environ.pop("DAGSTER_HOME", None)
    settings = get_settings()
    shutil.rmtree(settings.cache_dir / "llm", ignore_errors=True)
    files = _copy_files(settings.landing_dir, args.files)
    print(f"{files} knowledge-base files; lake under {home}", flush=True)

    started = time.perf_counter()
    first = ingest(settings)
    first_s = time.perf_counter() - started
    if not first.success:
        raise SystemExit(f"first run failed: {_failure(first)}")
    started = time.perf_counter()
    # Every partition again, although nothing changed (by default `ingest` would skip them all):
    # the figure is that of the assets' own reuse of unchanged rows.
    second = ingest(settings, everything=True)
    second_s = time.perf_counter() - started
    if not second.success:
        raise SystemExit(f"second run failed: {_failure(second)}")
    f1, f2 = _figures(first), _figures(second)
    chunks = max(1, f1["chunks"])
    print(f"first run:  {first_s:8.1f} s, {f1['chunks']} chunks, {f1['llm_calls']} LLM calls")
    print(f"  LLM calls per chunk:      {f1['llm_calls'] / chunks:.2f}")
    print(f"  prompt tokens per chunk:  {f1['prompt_tokens'] / chunks:.0f}")
    print(f"  completion tokens/chunk:  {f1['completion_tokens'] / chunks:.0f}")
    print(
        f"  failed: {f1['failed_documents']} documents (phase 1), {f1['failed_chunks']} chunks (phase 3)"
    )
    print(
        f"second run: {second_s:8.1f} s, {f2['llm_calls']} LLM calls (must be 0), {f2['cache_hits']} cache hits"
    )


if __name__ == "__main__":
    main()
