"""Where the `memcity` command prints: results on stdout, progress and messages on stderr.

An error is one line on stderr (`error: <what is wrong>`), or with `--json` one JSON object on
stdout (`{"error": "<what is wrong>", "code": <exit code>}`); see :func:`print_error`.
"""

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.segment import Segments
from rich.table import Table

# Widest a table is printed off a terminal (a pipe or a file has no width to fit).
MAX_PIPE_WIDTH = 100_000


def print_error(message: str, code: int, *, as_json: bool, out: Console, err: Console) -> int:
    """Report a failed command: one line `error: <message>` on `err`, or with `as_json` the
    object `{"error": message, "code": code}` on `out`. Returns `code` (the exit code)."""
    line = " ".join(message.split())
    if as_json:
        out.print(
            json.dumps({"error": line, "code": code}), markup=False, highlight=False, soft_wrap=True
        )
    else:
        err.print(f"[red]error[/red]: {escape(line)}", highlight=False, soft_wrap=True)
    return code


def print_wide(out: Console, renderable: RenderableType) -> None:
    """Print a table whole: fitted to a terminal (cells wrap), and at its natural width
    anywhere else, so a pipe or a file gets every cell uncut rather than 80 columns."""
    if out.is_terminal:
        out.print(renderable)
        return
    options = out.options.update_width(MAX_PIPE_WIDTH)
    width = Measurement.get(out, options, renderable).maximum
    lines = out.render_lines(renderable, options.update_width(width), pad=False, new_lines=True)
    out.print(Segments([segment for line in lines for segment in line]), crop=False)


def spinner(console: Console, label: str, *, disable: bool = False) -> Progress:
    """A one-line spinner `label: <what is happening>` with the time elapsed; gone when done.
    Only on a terminal: a pipe or a file would keep what a terminal erases."""
    return Progress(
        SpinnerColumn(),
        TextColumn(f"[bold]{label}[/bold] {{task.description}}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=disable or not console.is_terminal,
    )


@contextmanager
def partition_progress(
    console: Console, partitions: list[Any], *, disable: bool = False
) -> Iterator[Callable[[Any, str, str, str], None]]:
    """Shows each partition's run as it goes; yields the callback that `run_ingest` calls with
    (partition, step, event, detail).

    On a terminal: a progress bar per partition (steps done of its job's steps, the step now
    running with its progress and estimated time left). Elsewhere (a pipe, a file, CI): one line
    per step started or done, and the steps' progress lines as they come (every few seconds).
    """
    from memcity_pipeline.cli.ingest import STEPS

    if disable or not partitions:
        yield lambda *_: None
    elif not console.is_terminal:
        yield _progress_lines(console, {p.key: STEPS[p.scope] for p in partitions})
    else:
        with _progress_bars(console, partitions, STEPS) as on_step:
            yield on_step


def _progress_lines(console: Console, totals: dict[str, int]) -> Callable[..., None]:
    """The callback that prints a line per step event and per progress report."""
    done = dict.fromkeys(totals, 0)
    lock = threading.Lock()

    def on_step(partition: Any, step: str, event: str, detail: str = "") -> None:
        key = partition.key
        with lock:
            if event in ("finished", "skipped", "failed"):
                done[key] += 1
            text = {
                "started": f"{step} started",
                "progress": f"{step} {detail}",
                "finished": f"{step} done ({done[key]}/{totals[key]} steps)",
                "skipped": f"{step} skipped ({done[key]}/{totals[key]} steps)",
                "failed": f"{step} FAILED",
            }.get(event, f"{step} {event}")
            console.print(f"{key}: {text}", highlight=False, markup=False, soft_wrap=True)

    return on_step


@contextmanager
def _progress_bars(
    console: Console, partitions: list[Any], steps: dict[Any, int]
) -> Iterator[Callable[..., None]]:
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[key]}[/bold]"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    tasks = {
        p.key: progress.add_task("queued", total=steps[p.scope], key=p.key) for p in partitions
    }
    running: dict[str, dict[str, str]] = {p.key: {} for p in partitions}
    lock = threading.Lock()

    def on_step(partition: Any, step: str, event: str, detail: str = "") -> None:
        with lock:
            now = running[partition.key]
            if event == "started":
                now[step] = ""
            elif event == "progress":
                now[step] = detail
            else:
                now.pop(step, None)
                progress.advance(tasks[partition.key])
            if event == "failed":
                text = f"[red]{escape(step)} failed[/red]"
            elif now:
                text = ", ".join(
                    escape(f"{name} {info}".strip()) for name, info in sorted(now.items())
                )
            else:
                finished = progress.tasks[tasks[partition.key]].finished
                text = "[green]done[/green]" if finished else "between steps"
            progress.update(tasks[partition.key], description=text)

    with progress:
        yield on_step


def print_plan(console: Console, plan: Any) -> None:
    """What `memcity ingest` is about to do: new and removed partitions, layout problems."""
    for part in plan.added:
        console.print(f"new partition: {part.key}", highlight=False)
    for part in plan.removed:
        console.print(
            f"removed from the landing folder: {part.key} (its data goes)", highlight=False
        )
    for problem in plan.layout_problems:
        console.print(
            f"[yellow]landing: {problem.rel_path}: {problem.reason}[/yellow]", highlight=False
        )
    if not plan.runs:
        console.print(
            f"nothing changed in the landing folder ({len(plan.unchanged)} partitions up to date;"
            " --all runs every one)",
            highlight=False,
        )
    elif plan.unchanged:
        console.print(
            f"{len(plan.runs)} partitions to ingest, {len(plan.unchanged)} up to date",
            highlight=False,
        )


def outcome_json(outcome: Any) -> dict[str, Any]:
    """`memcity ingest --json`: each partition's run, and what was added and removed."""
    return {
        "success": outcome.success,
        "partitions": [
            {
                "partition": p.partition.key,
                "job": p.partition.job,
                "run_id": p.run_id,
                "success": p.success,
                "failure": p.failure,
                "assets": p.materializations,
                "checks": p.check_results,
            }
            for p in outcome.partitions
        ],
        "added": [p.key for p in outcome.plan.added],
        "removed": [p.key for p in outcome.plan.removed],
        "unchanged": [p.key for p in outcome.plan.unchanged],
        "layout_problems": [
            {"path": p.rel_path, "reason": p.reason} for p in outcome.plan.layout_problems
        ],
    }


def print_outcome(out: Console, outcome: Any) -> None:
    """What each partition's run made, its ingestion errors, and the asset checks."""
    if not outcome.partitions:
        return
    table = Table(title="What this run made")
    table.add_column("partition")
    table.add_column("asset")
    table.add_column("summary")
    for part in outcome.partitions:
        for key, meta in part.materializations.items():
            table.add_row(part.partition.key, key, str(meta.get("summary", "")))
    out.print(table)
    for part in outcome.partitions:
        for key, meta in part.materializations.items():
            if meta.get("warnings"):
                out.print(
                    f"[yellow]{part.partition.key} {key}: ingestion errors "
                    "(also in the ingestion_errors table)[/yellow]"
                )
                out.print(str(meta["warnings"]))
    checks = [
        (p.partition.key, n, ok) for p in outcome.partitions for n, ok in p.check_results.items()
    ]
    failed = [f"{key} {name}" for key, name, ok in checks if not ok]
    if checks:
        out.print(
            f"asset checks: {len(checks) - len(failed)} passed"
            + (f", [red]{len(failed)} failed: {', '.join(failed)}[/red]" if failed else "")
        )
