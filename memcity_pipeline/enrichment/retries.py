"""Retries of the LLM phases converge.

A document (phase 1) or chunk (phase 3) whose LLM answer failed records its `attempts`: the runs
that tried the LLM on the same inputs (its fingerprint: the text, the document's context, the
model). The next run tries it again until it has had `max_attempts`
(`MEMCITY_ENRICHMENT_MAX_ATTEMPTS`); then it is kept as it is, failed with its reason, until its
inputs change, which starts its count again. A retry never gets the rejected answer back: the
LLM cache keeps only answers the pipeline accepted (`StructuredCall`'s `accept`). So after a
bounded number of runs, a run on unchanged input asks the LLM nothing and commits nothing.

Rows written before the `attempts` column existed read it as null: one attempt.
"""

import polars as pl


def given_up(failed: pl.Expr, max_attempts: int) -> pl.Expr:
    """Failed rows that had all their attempts: kept as they are while their inputs hold."""
    return failed & (pl.col("attempts").fill_null(1) >= max_attempts)


def prior_attempts(
    existing: pl.DataFrame, failed: pl.Expr, todo: pl.DataFrame, key: str, fingerprint: str
) -> dict[str, int]:
    """For each key of `todo`, the attempts of its failed existing row made from the same inputs
    (`fingerprint`); keys without one are absent."""
    if existing.height == 0 or todo.height == 0:
        return {}
    prior = existing.filter(failed).select(key, fingerprint, pl.col("attempts").fill_null(1))
    joined = todo.select(key, fingerprint).join(prior, on=[key, fingerprint], how="inner")
    return dict(zip(joined[key].to_list(), joined["attempts"].to_list(), strict=True))


def retries_due(frame: pl.DataFrame, status: str, max_attempts: int) -> int:
    """Rows of `frame` (document_structure: `status`; enriched_chunks: `enrichment_status`) that
    failed and that the next run tries again."""
    if frame.height == 0:
        return 0
    attempts = pl.col("attempts").fill_null(1) if "attempts" in frame.columns else pl.lit(1)
    return frame.filter((pl.col(status) == "failed") & (attempts < max_attempts)).height
