"""Helpers that turn frames and reports into metadata a person reads in the Dagster UI."""

from typing import Any

import dagster as dg
import polars as pl

from memcity_pipeline.progress import ProgressLog


def _cell(value: Any, max_chars: int) -> str:
    text = "" if value is None else str(value)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def markdown_table(rows: list[dict[str, Any]], columns: list[str], max_chars: int = 80) -> str:
    """A Markdown table of `rows` limited to `columns`, each cell cut to `max_chars`."""
    if not rows:
        return "_(none)_"
    head = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    body = "\n".join(
        "| " + " | ".join(_cell(r.get(c), max_chars) for c in columns) + " |" for r in rows
    )
    return head + body


def preview(frame: pl.DataFrame, columns: list[str], n: int = 5) -> dg.MetadataValue:
    """The first `n` rows of `frame` as a Markdown table."""
    cols = [c for c in columns if c in frame.columns]
    return dg.MetadataValue.md(markdown_table(frame.head(n).to_dicts(), cols))


def step_progress(
    context: dg.AssetExecutionContext, org: str, scope: str, unit: str
) -> ProgressLog:
    """Progress of this step on one partition, in the run's log every few seconds:
    `enriched_chunks brambleway/company_docs: 24/71 chunks, 1m05s elapsed, about 2m10s left`
    (`memcity ingest` shows the same lines as it follows the run)."""
    step = context.assets_def.key.to_user_string() if context.has_assets_def else context.op.name
    return ProgressLog(f"{step} {org}/{scope}", unit, context.log.info)
