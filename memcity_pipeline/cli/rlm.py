"""`memcity query` and `memcity sessions`, as plain functions of parsed arguments.

The typer commands in `memcity_pipeline.cli.app` parse the options and call these; they print with
rich (progress and messages on stderr, results on stdout) and return the exit code: 0 done (a
`partial` answer included), 1 the work failed, 2 a wrong request. A wrong request is reported by
`print_error` (one line, or JSON with `--json`) before any LLM call.

`memcity query` prints the answer as soon as it is known, before the session is recorded (the
figures follow once it is; with `--json` the whole result comes then, within the session store's
deadlines). Ctrl-C while the session is being recorded ends the command with 130 and leaves the
row in the lake, marked pending for the next session. Its files are read by `cli.inputs`.
"""

import enum
import inspect
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from memcity_pipeline.cli.console import print_error, print_wide, spinner
from memcity_pipeline.cli.inputs import read_custom_file, read_text_file
from memcity_pipeline.lake.delta import read_rows
from memcity_pipeline.rlm.config import MAX_PROMPT_CHARS, RLMConfig, RLMRequestError, RLMResult
from memcity_pipeline.rlm.sessions import SessionStore, read_sessions
from memcity_pipeline.rlm.trajectory import iteration_line, read_trajectory, trajectory_markdown
from memcity_pipeline.settings import Settings, load_settings

STATUS_STYLE = {"completed": "green", "partial": "yellow", "timeout": "yellow", "failed": "red"}


def check_rlm_options(config: dict[str, Any]) -> None:
    """RLMRequestError naming each engine option whose value `RLMConfig` refuses, as it was
    typed (`--max-iterations 0: ...`), rather than the model's validation report."""
    try:
        RLMConfig.model_validate(config)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error.get("loc") else ""
            option = (
                "--system-prompt-file"
                if field == "custom_system_prompt"
                else _rlm_option_name(field)
            )
            value = error.get("input")
            shown = (
                f" {value}" if isinstance(value, int | float | str) and len(str(value)) < 80 else ""
            )
            problems.append(f"{option}{shown}: {error['msg']}")
        raise RLMRequestError("; ".join(problems)) from None


def _rlm_option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def rlm_option_parameters() -> list[inspect.Parameter]:
    """One typer option per `RLMConfig` field (the one declaration of the engine's options):
    `--max-depth`, `--sandbox-mode`, ... with the field's description as help and, for fixed
    choices, an enum so `--help` lists them. `custom_system_prompt` is `--system-prompt-file`
    (a file's text) in `query_command`."""
    params = []
    for name, info in RLMConfig.model_fields.items():
        if name == "custom_system_prompt":
            continue
        annotation = info.annotation
        args = [a for a in get_args(annotation) if a is not type(None)]
        base = args[0] if len(args) == 1 and get_args(annotation) else annotation
        choices = get_args(base) if get_origin(base) is Literal else ()
        if choices:
            kind: Any = enum.Enum(f"{name.title().replace('_', '')}Choice", {c: c for c in choices})
        elif base is bool:
            kind = bool
        else:
            kind = base
        default = info.default
        if choices:
            default = None if default is None else kind(default)
            kind = kind | None if default is None else kind
        elif base is not bool:
            kind = kind | None
            default = None
        flag = (
            f"{_rlm_option_name(name)}/--no-{name.replace('_', '-')}"
            if base is bool
            else _rlm_option_name(name)
        )
        help_text = info.description or ""
        if default is None and info.default is not None and base is not bool:
            help_text += f" (default {info.default})"
        option = typer.Option(flag, help=help_text, rich_help_panel="RLM engine options")
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[kind, option],
            )
        )
    return params


def query_command(
    question: str,
    *,
    org: str,
    context_type: str,
    kb: str | None = None,
    user: str | None = None,
    custom_file: Path | None = None,
    system_prompt_file: Path | None = None,
    as_json: bool = False,
    out: Console | None = None,
    err: Console | None = None,
    settings: Settings | None = None,
    **rlm_options: Any,
) -> int:
    """Run one RLM query and print the answer and its figures; returns the exit code
    (0 completed or partial, 1 failed or timeout, 2 a bad request, 130 interrupted while the
    session was being recorded). `rlm_options` are `RLMConfig` fields; None means "the
    default". Each iteration is a line on stderr as it ends (`rlm.trajectory.iteration_line`),
    unless `as_json`; the answer is printed before the session is recorded."""
    out = out or Console()
    err = err or Console(stderr=True)
    config: dict[str, Any] = {
        k: (v.value if isinstance(v, enum.Enum) else v)
        for k, v in rlm_options.items()
        if v is not None
    }
    answered: list[RLMResult] = []

    def on_answer(result: RLMResult) -> None:
        answered.append(result)
        if not as_json:
            print_answer(result, out)

    try:
        settings = settings or load_settings()
        if system_prompt_file is not None:
            config["custom_system_prompt"] = read_text_file(
                system_prompt_file,
                "--system-prompt-file",
                MAX_PROMPT_CHARS,
                "the most a system prompt may have",
            )
        check_rlm_options(config)
        custom = (
            read_custom_file(custom_file, settings.max_custom_context_chars)
            if custom_file is not None
            else None
        )
        with spinner(err, "rlm", disable=as_json) as progress:
            task = progress.add_task("gathering the context", total=None)

            def on_event(event: str, data: dict[str, Any]) -> None:
                if event == "iteration_start":
                    text = f"iteration {data['iteration']}: the root model is writing"
                elif event == "iteration_done":
                    if not as_json:
                        err.print(
                            iteration_line(data), markup=False, highlight=False, soft_wrap=True
                        )
                    text = f"iteration {data['iteration']} done"
                else:
                    text = event.replace("_", " ")
                progress.update(task, description=text)

            from memcity_pipeline.api import rlm_query  # the engine, imported only to run it

            result = rlm_query(
                org,
                question,
                context_type,
                user_id=user,
                knowledge_base_id=kb,
                custom_context=custom,
                rlm_config=config,
                settings=settings,
                progress=on_event,
                on_answer=on_answer,
            )
    except (RLMRequestError, OSError, ValueError) as exc:
        return print_error(str(exc), 2, as_json=as_json, out=out, err=err)
    except KeyboardInterrupt:
        if not answered:
            raise
        result = answered[0]
        print_result(result, as_json=as_json, out=out, err=err, answer_printed=True)
        err.print(
            f"[yellow]interrupted[/yellow] while recording session {result.session_id}: what was "
            "written is kept (a row in the lake waits, marked pending, for the next session or "
            "`memcity sessions --sync` to copy it to Postgres)",
            soft_wrap=True,
        )
        return 130
    print_result(result, as_json=as_json, out=out, err=err, answer_printed=True)
    return 0 if result.status in {"completed", "partial"} else 1


def print_answer(result: RLMResult, out: Console) -> None:
    """The answer on stdout (or a dim `(no answer)`)."""
    if result.answer:
        out.print(result.answer, markup=False, highlight=False)
    else:
        out.print("[dim](no answer)[/dim]")


def print_result(
    result: RLMResult, *, as_json: bool, out: Console, err: Console, answer_printed: bool = False
) -> None:
    """The answer on stdout (unless `answer_printed`), the figures and any warning on stderr
    (or all of it as JSON)."""
    if as_json:
        out.print_json(result.model_dump_json())
        return
    if not answer_printed:
        print_answer(result, out)
    style = STATUS_STYLE.get(result.status, "white")
    cost = f"${result.cost:.4f}" if result.cost is not None else "n/a"
    hits = result.sub_call_cache_hits
    cached = f" ({hits} from the cache)" if hits else ""
    searches = f"{result.search_calls} searches · " if result.search_calls else ""
    err.print(
        f"[{style}]{result.status}[/{style}] · {result.iterations} iterations · "
        f"{result.total_sub_calls} sub-calls{cached} · {searches}"
        f"{result.prompt_tokens + result.completion_tokens} tokens · cost {cost} · "
        f"{result.execution_time_s:.1f} s · session {result.session_id}",
        soft_wrap=True,
    )
    if result.warning:
        err.print(f"[yellow]warning[/yellow]: {escape(result.warning)}", soft_wrap=True)
    if result.error:
        err.print(f"[red]error[/red]: {escape(result.error)}", soft_wrap=True)


SESSION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("started", "left"),
    ("session", "left"),
    ("org", "left"),
    ("context", "left"),
    ("status", "left"),
    ("iter", "right"),
    ("sub-calls", "right"),
    ("cost", "right"),
    ("seconds", "right"),
    ("query", "left"),
    ("error", "left"),
)


def sessions_table(frame: Any) -> Table:
    """The sessions of `frame` (rows of `rlm_sessions`) as a table: when, which session, org,
    context, status and figures, the query, and the error (or, failing that, the warning).
    Cells wrap rather than being cut."""
    table = Table(title=f"Recent RLM sessions ({frame.height})")
    for column, justify in SESSION_COLUMNS:
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in frame.iter_rows(named=True):
        style = STATUS_STYLE.get(r["status"], "white")
        problem = (
            f"[red]{escape(r['error_message'])}[/red]"
            if r["error_message"]
            else (f"[yellow]{escape(r['warning'])}[/yellow]" if r["warning"] else "")
        )
        table.add_row(
            r["started_at"].strftime("%Y-%m-%d %H:%M:%S"),
            r["session_id"],
            r["org_id"],
            r["context_type"],
            f"[{style}]{r['status']}[/{style}]",
            str(r["iterations"]),
            str(r["sub_calls"]),
            f"{r['cost_usd']:.4f}" if r["cost_usd"] is not None else "-",
            f"{r['execution_time_s']:.1f}" if r["execution_time_s"] is not None else "-",
            escape(r["query"] or ""),
            problem,
        )
    return table


def sessions_command(
    *,
    org: str | None = None,
    limit: int = 20,
    sync: bool = False,
    trajectory: str | None = None,
    as_json: bool = False,
    out: Console | None = None,
    err: Console | None = None,
    settings: Settings | None = None,
) -> int:
    """List recent RLM sessions from the lake (every column with `as_json`); `sync` first copies
    missing rows to Postgres. With `trajectory` (a session id), print that session's trajectory
    as markdown instead (its entries with `as_json`)."""
    out = out or Console()
    err = err or Console(stderr=True)
    settings = settings or load_settings()
    if trajectory is not None:
        return trajectory_command(trajectory, settings, as_json=as_json, out=out, err=err)
    if sync:
        if not settings.postgres_url:
            return print_error(
                "MEMCITY_POSTGRES_URL is not set: nothing to sync to",
                2,
                as_json=as_json,
                out=out,
                err=err,
            )
        try:
            copied = SessionStore(settings.lake, settings.postgres_url).sync_to_postgres()
        except Exception as exc:
            return print_error(
                f"sync to Postgres failed: {type(exc).__name__}: {exc}",
                1,
                as_json=as_json,
                out=out,
                err=err,
            )
        err.print(f"copied {copied} session row(s) to Postgres")
    frame = read_sessions(settings.lake, org_id=org).head(limit)
    if as_json:
        out.print_json(json.dumps(frame.to_dicts(), default=str))
        return 0
    if frame.is_empty():
        which = f" of org {org!r}" if org else ""
        err.print(
            f"no RLM session{which} yet in the lake at {settings.lake}",
            highlight=False,
            soft_wrap=True,
        )
        return 0
    print_wide(out, sessions_table(frame))
    return 0


def trajectory_command(
    session_id: str, settings: Settings, *, as_json: bool, out: Console, err: Console
) -> int:
    """Print a session's trajectory: markdown, or its entries as JSON; 2 when there is none."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", session_id):
        return print_error(
            f"{session_id!r} is not a session id", 2, as_json=as_json, out=out, err=err
        )
    found = read_trajectory(settings.lake, session_id)
    if found is None:
        return print_error(
            f"no trajectory of session {session_id} in the lake at {settings.lake}",
            2,
            as_json=as_json,
            out=out,
            err=err,
        )
    if as_json:
        out.print_json(json.dumps(found.entries, default=str))
        return 0
    row = read_rows(settings.lake, "rlm_sessions", {"session_id": session_id}, ["runtime_used"])
    runtime = row["runtime_used"][0] if row.height else None
    out.print(
        trajectory_markdown(found, runtime=runtime), markup=False, highlight=False, soft_wrap=True
    )
    return 0
