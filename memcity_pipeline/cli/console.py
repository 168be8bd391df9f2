"""Where the `memcity` command prints: results on stdout, progress and messages on stderr."""

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


def spinner(console: Console, label: str, *, disable: bool = False) -> Progress:
    """A one-line spinner `label: <what is happening>` with the time elapsed; gone when done."""
    return Progress(
        SpinnerColumn(),
        TextColumn(f"[bold]{label}[/bold] {{task.description}}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=disable,
    )
