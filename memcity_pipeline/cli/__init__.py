"""The `memcity` command (typer): ingest and demo through the Dagster instance, search, query,
sessions, doctor, the local model server and the Daytona snapshot."""

from memcity_pipeline.cli.app import app, main

__all__ = ["app", "main"]
