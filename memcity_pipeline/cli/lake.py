"""`memcity lake`: the lake's Delta tables: convert an earlier Parquet lake, show versions."""

import json
from typing import Annotated

import typer

from memcity_pipeline.cli.common import command_settings, out

lake_app = typer.Typer(help="The lake's tables (Delta Lake, local or on object storage).")
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


@lake_app.command("migrate")
def lake_migrate(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Convert a lake written by an earlier version (Parquet files) to Delta tables, in place.

    Every row is kept; each old file is removed once its rows are committed. Ingestion does the
    same on its first run; running it twice is harmless.
    """
    from memcity_pipeline.lake.migrate import migrate_lake

    settings = command_settings(ctx)
    report = migrate_lake(settings.lake)
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "lake": settings.lake.uri,
                    "converted": report.converted,
                    "files": report.files,
                    "rows": report.rows,
                    "bm25_indexes": report.indexes,
                }
            )
        )
    else:
        out.print(report.summary(settings.lake), highlight=False, soft_wrap=True)


@lake_app.command("versions")
def lake_versions(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """The current Delta version of every lake table (none: never written)."""
    from memcity_pipeline.lake.delta import table_versions
    from memcity_pipeline.lake.tables import TABLES

    settings = command_settings(ctx)
    versions = table_versions(settings.lake, TABLES)
    if as_json:
        out.print_json(json.dumps({"lake": settings.lake.uri, "versions": versions}))
        return
    out.print(f"lake: {settings.lake.uri}", highlight=False)
    for name, version in versions.items():
        out.print(f"{name:<20} {'-' if version is None else version}", highlight=False)
