"""The on-demand `rlm_query` job, the `rlm_sessions` asset it reports, and the session report.

Launch `rlm_query` from the UI's launchpad (its config mirrors the request, with defaults that
work on the sample corpus, and the `rlm` options derived from `RLMConfig`) or from the
`memcity query` command; both run `memcity_pipeline.rlm.query`. Each run logs its answer as soon
as it is known, then records one session row (lake + Postgres, within deadlines) and reports an
`rlm_sessions` materialization with the session's figures, its answer and its trajectory as
markdown (each iteration's code and output, with its sub-calls and searches); the run's log has
a line per iteration as it ends. `rlm_session_report` summarises latency, iterations and cost by
context type.
"""

import json
from enum import StrEnum
from typing import Any, Literal, get_args, get_origin

import dagster as dg
import polars as pl
from pydantic import BaseModel, Field, create_model

from memcity_pipeline.lake.delta import table_version
from memcity_pipeline.lake.location import Lake
from memcity_pipeline.resources.embeddings import EmbeddingsResource
from memcity_pipeline.resources.lake import LakeResource
from memcity_pipeline.resources.llm import LLMResource
from memcity_pipeline.resources.sandbox import SandboxResource
from memcity_pipeline.resources.sessions import SessionsResource
from memcity_pipeline.rlm.config import RLMConfig, RLMRequestError, RLMResult, parse_config
from memcity_pipeline.rlm.query import prepare_query, run_query
from memcity_pipeline.rlm.sessions import read_sessions
from memcity_pipeline.rlm.trajectory import iteration_line, read_trajectory, trajectory_markdown

rlm_sessions = dg.AssetSpec(
    "rlm_sessions",
    group_name="rlm",
    kinds={"deltalake", "postgres"},
    description="One row per RLM query (whatever its end): who asked what over which context, "
    "iterations, sub-calls, tokens, cost, time, status. The lake's Delta table `rlm_sessions` "
    "(partitioned by org and day), and the Postgres table `rlm_sessions`.",
)


def _choices(name: str, annotation: Any) -> Any:
    """`annotation` with each `Literal` of strings made a `StrEnum` (Dagster config knows enums,
    not literals), so the launchpad offers the choices."""
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return StrEnum(name, {value: value for value in args})
    if type(None) in args and len(args) == 2:
        inner = next(a for a in args if a is not type(None))
        return _choices(name, inner) | None
    return annotation


def _launchpad_config(model: type[BaseModel], name: str) -> type[dg.Config]:
    """A `dg.Config` with the fields, types, defaults and descriptions of `model` (the launchpad
    shows them; `model` still validates the values when the run starts)."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        kind = _choices(field_name.title().replace("_", ""), info.annotation)
        default = info.default
        enum_type = next(
            (a for a in (kind, *get_args(kind)) if isinstance(a, type) and issubclass(a, StrEnum)),
            None,
        )
        if enum_type is not None and default is not None:
            default = enum_type(default)
        fields[field_name] = (kind, Field(default=default, description=info.description))
    return create_model(name, __base__=dg.Config, __doc__=model.__doc__, **fields)


RLMOptions = _launchpad_config(RLMConfig, "RLMOptions")


ContextType = StrEnum(
    "ContextType", {name: name for name in ("memories", "documents", "conversation", "custom")}
)


class RLMQueryConfig(dg.Config):
    """An RLM query, as the launchpad edits it (empty strings mean "not set")."""

    org_id: str = Field(default="brambleway", description="Organisation to query.")
    query: str = Field(
        default="Summarize the key themes across all documents in this knowledge base.",
        description="The question.",
    )
    context_type: ContextType = Field(
        default=ContextType.documents, description="Which context is loaded into the sandbox."
    )
    user_id: str = Field(default="", description="User (memories, conversation).")
    knowledge_base_id: str = Field(
        default="company_docs", description="Knowledge base (documents)."
    )
    custom_context: str = Field(default="", description="Context text (custom).")
    custom_context_is_json_list: bool = Field(
        default=False, description="Parse custom_context as a JSON list of items."
    )
    rlm: RLMOptions = Field(  # type: ignore[valid-type]
        default_factory=RLMOptions, description="The engine's options (the spec's rlmConfig)."
    )

    def rlm_config(self) -> RLMConfig:
        """The engine options, validated (RLMRequestError when a value is out of range)."""
        values = {
            k: v.value if isinstance(v, StrEnum) else v for k, v in self.rlm.model_dump().items()
        }
        return parse_config(values)

    def custom(self) -> Any:
        """The custom context: the text, or the JSON list it holds."""
        custom: Any = self.custom_context or None
        if custom is not None and self.custom_context_is_json_list:
            try:
                custom = json.loads(custom)
            except json.JSONDecodeError as exc:
                raise RLMRequestError(f"custom_context is not a JSON list: {exc}") from exc
        return custom


def session_metadata(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one session as Dagster metadata."""
    return {
        "session_id": result["session_id"],
        "status": result["status"],
        "context_type": result["context_type"],
        "context_chars": result["context_chars"],
        "iterations": result["iterations"],
        "sub_calls": result["total_sub_calls"],
        "search_calls": result["search_calls"],
        "sub_call_cache_hits": result["sub_call_cache_hits"],
        "depth_reached": result["depth_reached"],
        "prompt_tokens": result["prompt_tokens"],
        "completion_tokens": result["completion_tokens"],
        "cost_usd": dg.MetadataValue.float(float(result["cost"] or 0.0)),
        "execution_time_s": dg.MetadataValue.float(float(result["execution_time_s"])),
        "root_model": result["root_model"] or "",
        "runtime_used": result["runtime_used"] or "",
        "warning": result["warning"] or "",
        "error": result["error"] or "",
        "answer": dg.MetadataValue.md(result["answer"][:4000] or "_(no answer)_"),
    }


def session_trajectory(lake: Lake, session_id: str, runtime: str | None) -> str:
    """The session's trajectory as markdown (each iteration's code, output, sub-calls and
    searches), or a line saying why there is none."""
    try:
        trajectory = read_trajectory(lake, session_id)
    except Exception as exc:  # the session stands without its trajectory
        return f"_the trajectory could not be read: {type(exc).__name__}: {exc}_"
    if trajectory is None:
        return "_no trajectory was saved for this session_"
    return trajectory_markdown(trajectory, runtime=runtime)


@dg.op(
    name="run_rlm_query",
    description="Answer a question over an org's context with a Recursive Language Model.",
    out=dg.Out(dict, description="The RLMResult as a dict."),
    pool="llm",
)
def run_rlm_query(
    context: dg.OpExecutionContext,
    config: RLMQueryConfig,
    llm: LLMResource,
    sandbox: SandboxResource,
    lake: LakeResource,
    sessions: SessionsResource,
    embeddings: EmbeddingsResource,
) -> Any:
    def progress(event: str, data: dict[str, Any]) -> None:
        if event == "iteration_done":
            context.log.info(iteration_line(data))
        elif event != "iteration_start":
            context.log.info(event.replace("_", " "))

    try:
        cfg = config.rlm_config()
        prepared = prepare_query(
            config.org_id,
            config.query,
            str(config.context_type),
            user_id=config.user_id or None,
            knowledge_base_id=config.knowledge_base_id or None,
            custom_context=config.custom(),
            rlm_config=cfg,
            lake_dir=lake.lake,
            max_custom_chars=lake.max_custom_context_chars,
        )
    except RLMRequestError as exc:
        raise dg.Failure(description=f"bad RLM request: {exc}") from exc

    def on_answer(result: RLMResult) -> None:
        """The answer in the run's log before the session is recorded (which may wait)."""
        context.log.info(f"session {result.session_id} {result.status}: {result.answer[:4000]}")

    tuned = sandbox.with_options(**cfg.sandbox_overrides())
    try:
        result = run_query(
            prepared,
            llm=llm.get_client(),
            sandbox=tuned.get_backend(),
            session_store=sessions.get_store(),
            progress=progress,
            embedder=embeddings.get_embedder,
            on_answer=on_answer,
        )
    finally:
        if tuned is not sandbox:
            tuned.close()
    data = result.model_dump()
    yield dg.AssetMaterialization(
        asset_key="rlm_sessions",
        description=f"session {result.session_id} ({result.status})",
        metadata={
            **session_metadata(data),
            "trajectory": dg.MetadataValue.md(
                session_trajectory(lake.lake, result.session_id, result.runtime_used)
            ),
            "table_version": table_version(lake.lake, "rlm_sessions") or 0,
        },
    )
    if result.warning:
        context.log.warning(result.warning)
    if result.status == "failed":
        raise dg.Failure(
            description=f"RLM session {result.session_id} failed: {result.error}",
            metadata={"session_id": result.session_id},
        )
    yield dg.Output(data)


@dg.job(
    name="rlm_query",
    description="On demand: an RLM query over memories, documents, a conversation or custom "
    "context; records the session and reports an rlm_sessions materialization.",
    tags={"kind": "rlm"},
)
def rlm_query_job() -> None:
    run_rlm_query()


def _bar(value: float, top: float, width: int = 24) -> str:
    """A text bar for Markdown charts."""
    if top <= 0:
        return ""
    return "█" * max(1, round(width * value / top)) if value > 0 else ""


def session_summary(frame: pl.DataFrame) -> pl.DataFrame:
    """Latency, iterations and cost by context type."""
    return (
        frame.group_by("context_type")
        .agg(
            pl.len().alias("sessions"),
            (pl.col("status") == "completed").mean().alias("completed_share"),
            pl.col("execution_time_s").mean().alias("latency_mean_s"),
            pl.col("execution_time_s").quantile(0.5).alias("latency_p50_s"),
            pl.col("execution_time_s").quantile(0.95).alias("latency_p95_s"),
            pl.col("iterations").mean().alias("iterations_mean"),
            pl.col("sub_calls").mean().alias("sub_calls_mean"),
            pl.col("cost_usd").fill_null(0.0).sum().alias("cost_usd_total"),
        )
        .sort("context_type")
    )


def summary_markdown(summary: pl.DataFrame) -> str:
    """The summary as a Markdown table with a latency bar chart."""
    top = float(summary["latency_mean_s"].max() or 0.0) if summary.height else 0.0
    lines = [
        "| context type | sessions | completed | mean latency (s) | p95 (s) | iterations | "
        "sub-calls | cost (USD) | latency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in summary.iter_rows(named=True):
        lines.append(
            f"| {r['context_type']} | {r['sessions']} | {r['completed_share']:.0%} | "
            f"{r['latency_mean_s']:.2f} | {r['latency_p95_s']:.2f} | "
            f"{r['iterations_mean']:.1f} | {r['sub_calls_mean']:.1f} | "
            f"{r['cost_usd_total']:.4f} | {_bar(r['latency_mean_s'], top)} |"
        )
    return "\n".join(lines)


@dg.asset(
    group_name="rlm",
    kinds={"polars"},
    deps=[rlm_sessions],
    description="Latency, iterations and cost of RLM sessions by context type (from the lake).",
    # Hourly, once new sessions were reported since the last tick (the automation sensor runs it).
    automation_condition=dg.AutomationCondition.on_cron("0 * * * *"),
)
def rlm_session_report(lake: LakeResource) -> dg.MaterializeResult:
    """Latency, iterations and cost of RLM sessions by context type, with charts.

    Numeric entries (sessions, latency, iterations, cost) are plotted by the Dagster UI across
    materializations; the Markdown table carries a bar chart of latency by context type.
    """
    frame = read_sessions(lake.lake)
    summary = session_summary(frame) if not frame.is_empty() else pl.DataFrame()
    metadata: dict[str, Any] = {"sessions": frame.height}
    if frame.is_empty():
        metadata["by_context_type"] = dg.MetadataValue.md("_no RLM session yet_")
        return dg.MaterializeResult(metadata=metadata)
    latency = frame["execution_time_s"]
    metadata.update(
        {
            "latency_p50_s": dg.MetadataValue.float(float(latency.quantile(0.5) or 0.0)),
            "latency_p95_s": dg.MetadataValue.float(float(latency.quantile(0.95) or 0.0)),
            "iterations_mean": dg.MetadataValue.float(float(frame["iterations"].mean() or 0.0)),
            "cost_usd_total": dg.MetadataValue.float(float(frame["cost_usd"].fill_null(0.0).sum())),
            "completed_share": dg.MetadataValue.float(
                float((frame["status"] == "completed").mean() or 0.0)
            ),
            "by_context_type": dg.MetadataValue.md(summary_markdown(summary)),
            "by_context_type_table": dg.MetadataValue.table(
                records=[
                    dg.TableRecord(
                        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                    )
                    for r in summary.iter_rows(named=True)
                ],
                schema=dg.TableSchema(
                    columns=[
                        dg.TableColumn(name, "string" if name == "context_type" else "float")
                        for name in summary.columns
                    ]
                ),
            ),
        }
    )
    for r in summary.iter_rows(named=True):
        metadata[f"latency_mean_s/{r['context_type']}"] = dg.MetadataValue.float(
            float(r["latency_mean_s"] or 0.0)
        )
    return dg.MaterializeResult(metadata=metadata)
