"""The `memcity` command.

Exit codes, for every command: 0 it did its job (an RLM query that ended `partial` included),
1 the work failed (a run, a query that `failed` or timed out, a Daytona build), 2 a wrong request
(an unknown option value, org or knowledge base, a bad file, a bad environment variable). A
wrong request or a failure is one line on stderr, `error: <what is wrong>` (with the choices
where there are some), never a traceback; a command given `--json` prints it as JSON on stdout
instead, `{"error": "...", "code": 2}` (:class:`MemcityGroup` does this for every command).

The settings are read once per command, when it first needs them (`_settings`); a bad variable
is a wrong request that names it. `--help` and `--version` work whatever the environment holds.
"""

import enum
import inspect
import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from memcity_pipeline.cli.common import CommandError, MemcityGroup, command_settings, console, out
from memcity_pipeline.cli.console import (
    outcome_json,
    partition_progress,
    print_outcome,
    print_plan,
)
from memcity_pipeline.cli.lake import lake_app
from memcity_pipeline.cli.services import daytona_app, llm_app
from memcity_pipeline.settings import Settings

app = typer.Typer(
    cls=MemcityGroup, help="memcity-pipeline: enriched, searchable knowledge and RLM queries."
)

# On 2 cores one run at a time is the quicker (a run keeps both cores busy; two at a time took
# 1.16x as long on 8 knowledge bases, `bench/partitions.py`).
DEFAULT_PARALLEL = max(1, (os.cpu_count() or 2) // 2)
ParallelOption = Annotated[
    int,
    typer.Option(
        "--parallel",
        min=1,
        max=64,
        help="Runs at once, one per partition (default: a run per 2 cores; a run uses "
        "several cores).",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ExecutorChoice = enum.Enum(  # type: ignore[misc]
    "ExecutorChoice", {name: name for name in ("in_process", "multiprocess")}
)
ContextTypeChoice = enum.Enum(  # type: ignore[misc]
    "ContextTypeChoice",
    {name: name for name in ("memories", "documents", "conversation", "custom")},
)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"memcity-pipeline {version('memcity-pipeline')}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _load(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """memcity-pipeline: enriched, searchable knowledge and RLM queries."""


def _run_ingest(
    settings: Settings,
    as_json: bool,
    *,
    orgs: list[str] | None = None,
    kbs: list[str] | None = None,
    users: list[str] | None = None,
    everything: bool = False,
    parallel: int = DEFAULT_PARALLEL,
    executor: str = "in_process",
) -> None:
    from memcity_pipeline.cli.ingest import SelectionError, plan_ingest, run_ingest
    from memcity_pipeline.cli.runner import get_instance
    from memcity_pipeline.lake.migrate import migrate_lake

    migrated = migrate_lake(settings.lake)  # a Parquet lake of an earlier version, once
    if migrated.converted:
        console.print(migrated.summary(settings.lake), highlight=False)
    instance = get_instance(settings)
    try:
        plan = plan_ingest(
            settings,
            instance,
            orgs=orgs or [],
            kbs=kbs or [],
            users=users or [],
            everything=everything,
        )
    except SelectionError as exc:
        raise CommandError(str(exc), 2) from None
    if not as_json:
        print_plan(console, plan)
    with partition_progress(console, plan.runs, disable=as_json) as on_step:
        outcome = run_ingest(
            settings,
            plan,
            parallel=parallel,
            executor=executor,  # type: ignore[arg-type]
            on_step=on_step,
            on_wait=lambda text: console.print(f"[yellow]{text}[/yellow]", highlight=False),
            instance=instance,
        )
    if as_json:
        out.print_json(json.dumps(outcome_json(outcome), default=str))
    else:
        print_outcome(out, outcome)
        console.print(f"lake: {settings.lake}", highlight=False)
    if not outcome.success:
        failed = [p for p in outcome.partitions if not p.success]
        for p in failed:
            console.print(f"[red]{p.partition.key} failed[/red] (run {p.run_id}): {p.failure}")
        if outcome.layout_failure:
            console.print(f"[red]{outcome.layout_failure}[/red]")
        raise typer.Exit(1)


@app.command()
def ingest(
    ctx: typer.Context,
    orgs: Annotated[
        list[str] | None, typer.Option("--org", help="Every partition of this org (repeatable).")
    ] = None,
    kbs: Annotated[
        list[str] | None, typer.Option("--kb", help="The knowledge base ORG/KB (repeatable).")
    ] = None,
    users: Annotated[
        list[str] | None, typer.Option("--user", help="The user ORG/USER (repeatable).")
    ] = None,
    everything: Annotated[
        bool, typer.Option("--all", help="Run every partition, changed or not.")
    ] = False,
    parallel: ParallelOption = DEFAULT_PARALLEL,
    executor: Annotated[
        ExecutorChoice,
        typer.Option(
            "--executor",
            help="Steps of a run in its own process (in_process), or one process per step "
            "(multiprocess, as runs the daemon launches).",
        ),
    ] = ExecutorChoice.in_process,
    as_json: JsonFlag = False,
) -> None:
    """Ingest the landing folder through the Dagster instance, one run per partition.

    By default every knowledge base and user whose files changed since the lake last read them
    (or whose last run did not finish); `--org`, `--kb ORG/KB`, `--user ORG/USER` pick partitions
    (repeatable); `--all` runs every one.
    """
    _run_ingest(
        command_settings(ctx),
        as_json,
        orgs=orgs,
        kbs=kbs,
        users=users,
        everything=everything,
        parallel=parallel,
        executor=executor.value,
    )


@app.command()
def demo(
    ctx: typer.Context,
    parallel: ParallelOption = DEFAULT_PARALLEL,
    as_json: JsonFlag = False,
) -> None:
    """Copy the bundled sample corpus into the landing folder and ingest it (as `ingest`)."""
    from memcity_pipeline.cli.runner import copy_sample_corpus

    settings = command_settings(ctx)
    count = copy_sample_corpus(settings.landing_dir)
    if not as_json:
        console.print(f"sample corpus: {count} files in {settings.landing_dir}")
    _run_ingest(settings, as_json, parallel=parallel)


@app.command()
def search(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="What to look for.")],
    org: Annotated[str, typer.Option("--org", help="Organisation id.")],
    kb: Annotated[str | None, typer.Option("--kb", help="Knowledge base id.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Search this user's memories.")] = None,
    k: Annotated[int, typer.Option("--k", min=1, max=100, help="How many results.")] = 10,
    per_document: Annotated[
        bool,
        typer.Option("--per-document", help="The best chunk of each of the k best documents."),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Hybrid search (BM25 + vectors) over a knowledge base (--kb) or a user's memories (--user)."""
    from memcity_pipeline.api import ContextHit, SearchError, get_context, search_memories

    if (kb is None) == (user is None):
        raise CommandError("give exactly one of --kb or --user", 2)
    if per_document and kb is None:
        raise CommandError("--per-document applies to a knowledge base (--kb)", 2)
    settings = command_settings(ctx)
    try:
        hits = (
            get_context(org, kb, query, k, per_document=per_document, settings=settings)
            if kb is not None
            else search_memories(org, user or "", query, k, settings=settings)
        )
    except SearchError as exc:  # an unknown org, kb or user, or an index not built yet
        raise CommandError(str(exc), 2) from None
    if as_json:
        out.print_json(json.dumps([h.to_dict() for h in hits], default=str))
        return
    table = Table(title=f"{len(hits)} results for {query!r}")
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("found by")
    table.add_column("where")
    table.add_column("text")
    for i, h in enumerate(hits, start=1):
        where = (
            (h.header or f"{h.title} › {h.section or ''}")
            if isinstance(h, ContextHit)
            else str(h.created_at)
        )
        text = getattr(h, "resolved_text", None) or h.text
        table.add_row(
            str(i), f"{h.score:.4f}", ", ".join(h.retrievers), where, " ".join(text.split())[:200]
        )
    out.print(table)


def query(
    ctx: typer.Context,
    question: Annotated[str, typer.Argument(help="The question for the RLM.")],
    org: Annotated[str, typer.Option("--org", help="Organisation id.")],
    context_type: Annotated[
        ContextTypeChoice, typer.Option("--context-type", help="Which context to load.")
    ] = ContextTypeChoice.documents,
    kb: Annotated[str | None, typer.Option("--kb", help="Knowledge base (documents).")] = None,
    user: Annotated[
        str | None, typer.Option("--user", help="User (memories, conversation).")
    ] = None,
    custom_file: Annotated[
        Path | None, typer.Option("--custom-file", help="Custom context: text, .json or .jsonl.")
    ] = None,
    system_prompt_file: Annotated[
        Path | None,
        typer.Option(
            "--system-prompt-file",
            help="Replace the built-in system prompt with this file's text (advanced).",
            rich_help_panel="RLM engine options",
        ),
    ] = None,
    as_json: JsonFlag = False,
    **rlm_options: Any,
) -> None:
    """Answer a question over ALL of a context with a Recursive Language Model."""
    from memcity_pipeline.cli.rlm import query_command

    code = query_command(
        question,
        org=org,
        context_type=context_type.value,
        kb=kb,
        user=user,
        custom_file=custom_file,
        system_prompt_file=system_prompt_file,
        as_json=as_json,
        out=out,
        err=console,
        settings=command_settings(ctx),
        **rlm_options,
    )
    raise typer.Exit(code)


def _with_rlm_options(command: Any) -> Any:
    """`command` with one option per RLMConfig field in place of its `**rlm_options`."""
    from memcity_pipeline.cli.rlm import rlm_option_parameters

    signature = inspect.signature(command)
    fixed = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
    params = fixed + rlm_option_parameters()
    command.__signature__ = signature.replace(parameters=params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


app.command()(_with_rlm_options(query))


@app.command()
def sessions(
    ctx: typer.Context,
    org: Annotated[str | None, typer.Option("--org", help="Only this organisation.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many, newest first.")] = 20,
    sync: Annotated[
        bool, typer.Option("--sync", help="First copy sessions missing in Postgres to it.")
    ] = False,
    trajectory: Annotated[
        str | None,
        typer.Option(
            "--trajectory",
            metavar="SESSION_ID",
            help="Print this session's trajectory as markdown (its iterations: code, output, "
            "sub-calls, searches) instead of the list.",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """List recent RLM sessions (from the lake), or show one's trajectory."""
    from memcity_pipeline.cli.rlm import sessions_command

    raise typer.Exit(
        sessions_command(
            org=org,
            limit=limit,
            sync=sync,
            trajectory=trajectory,
            as_json=as_json,
            out=out,
            err=console,
            settings=command_settings(ctx),
        )
    )


@app.command()
def doctor(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Check this machine: sandbox isolation, the LLM, embeddings, Postgres, Daytona, folders.

    Exit code 0 when no check failed (warnings included), 1 otherwise.
    """
    from memcity_pipeline.cli.doctor import doctor_command

    raise typer.Exit(doctor_command(settings=command_settings(ctx), as_json=as_json, out=out))


app.add_typer(llm_app, name="llm")
app.add_typer(daytona_app, name="daytona")
app.add_typer(lake_app, name="lake")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
