"""What every `memcity` command shares: its consoles, its settings (read on first use), and how
it ends on an error: one line (JSON with `--json`) and an exit code.

Exit codes, for every command: 0 it did its job, 1 the work failed, 2 a wrong request (see
`memcity_pipeline.cli.app`). :class:`MemcityGroup`, the root command's class, turns every usage
error and :class:`CommandError` of any command into one line on stderr, `error: <what is
wrong>`, or `{"error": "...", "code": N}` on stdout when the command was given `--json`.
"""

import sys
from collections.abc import Sequence
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from memcity_pipeline.cli.console import print_error
from memcity_pipeline.settings import Settings, SettingsError, load_settings

console = Console(stderr=True)  # progress, warnings and errors
out = Console()  # results


class CommandError(typer.TyperException):
    """Ends a command with one line (JSON with `--json`) and an exit code: 2 for a wrong
    request, 1 when the work failed."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = code


def _target_command(group: TyperGroup, argv: Sequence[str]) -> Any:
    """The (sub)command `argv` names, as far as it names one."""
    command: Any = group
    for token in argv:
        sub = command.commands.get(token) if isinstance(command, TyperGroup) else None
        if sub is not None:
            command = sub
    return command


def _wants_json(group: TyperGroup, argv: Sequence[str]) -> bool:
    """Whether `argv` asks a command that takes `--json` for JSON (before any `--`)."""
    options = list(argv[: argv.index("--")] if "--" in argv else argv)
    command = _target_command(group, options)
    takes_json = any("--json" in getattr(p, "opts", ()) for p in command.params)
    return takes_json and "--json" in options


def _error_message(exc: typer.TyperException) -> str:
    """One line for a usage error or a CommandError, with where to look for a usage error."""
    message = exc.format_message().replace(": Value error, ", ": ")
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, CommandError) or ctx is None:
        return message
    return f"{message} (see `{ctx.command_path} --help`)"


class MemcityGroup(TyperGroup):
    """The root command: every usage error and :class:`CommandError` of any command is one
    line on stderr (or JSON on stdout when the command was given `--json`) and its exit code."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(
                argv,
                prog_name,
                complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
            code = result if isinstance(result, int) else 0
        except typer.TyperException as exc:
            code = print_error(
                _error_message(exc),
                int(getattr(exc, "exit_code", 1)),
                as_json=_wants_json(self, argv),
                out=out,
                err=console,
            )
        except typer.Abort:
            console.print("Aborted.")
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code)


def command_settings(ctx: typer.Context) -> Settings:
    """The settings of this command, read on first use; a bad variable is a wrong request."""
    root = ctx.find_root()
    if not isinstance(root.obj, Settings):
        try:
            root.obj = load_settings()
        except SettingsError as exc:
            raise CommandError(str(exc), 2) from None
    return root.obj
