"""Running the pipeline's jobs outside the UI, on the same definitions and Dagster instance.

The instance is the one `DAGSTER_HOME` names (the UI uses the same); with no `DAGSTER_HOME` it is
the embedded SQLite instance under `$MEMCITY_HOME/dagster_home`.
"""

import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import dagster as dg
from filelock import FileLock

from memcity_pipeline.settings import Settings

EMBEDDED_DAGSTER_YAML = """\
# Embedded default: SQLite run/event storage in this folder. See the README for Postgres.
telemetry:
  enabled: false
"""


def ensure_dagster_home(settings: Settings) -> Path:
    """Point `DAGSTER_HOME` at the embedded instance unless it is set already; return it."""
    home = os.environ.get("DAGSTER_HOME")
    if home:
        return Path(home)
    path = settings.dagster_home
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    if not config.exists():
        partial = config.with_name(f".dagster.yaml.{os.getpid()}.tmp")
        partial.write_text(EMBEDDED_DAGSTER_YAML)
        os.replace(partial, config)  # another process never reads half a file
    os.environ["DAGSTER_HOME"] = str(path)
    return path


def get_instance(settings: Settings) -> dg.DagsterInstance:
    """The Dagster instance the UI uses too.

    A new SQLite instance creates its tables when it is first opened; two commands started at
    once on a new home would both try, so opening it is serialized by a lock file in the home.
    """
    home = ensure_dagster_home(settings)
    if not os.access(home, os.W_OK):
        return dg.DagsterInstance.get()
    with FileLock(home / ".instance.lock"):
        return dg.DagsterInstance.get()


def sample_corpus_dir() -> Path:
    """The bundled sample corpus (a landing folder)."""
    return Path(str(resources.files("memcity_pipeline") / "sample_corpus"))


def copy_sample_corpus(landing: Path) -> int:
    """Copy the sample corpus's `orgs/` into `landing`, keeping mtimes; return files copied."""
    src = sample_corpus_dir() / "orgs"
    count = 0
    for path in sorted(src.rglob("*")):
        if path.is_file():
            dest = landing / "orgs" / path.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists() or dest.read_bytes() != path.read_bytes():
                shutil.copy2(path, dest)
            count += 1
    return count


@dataclass
class JobOutcome:
    """What a job run did: its status and each materialized asset's metadata."""

    run_id: str
    success: bool
    materializations: dict[str, dict[str, Any]] = field(default_factory=dict)
    check_results: dict[str, bool] = field(default_factory=dict)
    failure: str | None = None


def run_job(
    job_name: str,
    settings: Settings,
    *,
    run_config: dict[str, Any] | None = None,
    on_event: Callable[[str], None] | None = None,
    definitions: dg.Definitions | None = None,
    log_level: str = "WARNING",
) -> JobOutcome:
    """Execute a job of the definitions in this process, recorded in the shared instance.

    `on_event` receives a line for every step start/success/failure and log message while the
    run goes (from a thread that follows the run's event log).
    """
    from memcity_pipeline.definitions import build_definitions

    instance = get_instance(settings)
    defs = definitions or build_definitions(settings)
    job = defs.resolve_job_def(job_name)
    run_config = {
        "loggers": {"console": {"config": {"log_level": log_level}}},
        **(run_config or {}),
    }
    run_id = str(uuid.uuid4())
    stop = threading.Event()
    follower = None
    if on_event is not None:
        follower = threading.Thread(
            target=_follow_run, args=(instance, run_id, on_event, stop), daemon=True
        )
        follower.start()
    try:
        result = job.execute_in_process(
            instance=instance, run_config=run_config, run_id=run_id, raise_on_error=False
        )
    finally:
        stop.set()
        if follower is not None:
            follower.join(timeout=5)
    outcome = JobOutcome(run_id=run_id, success=result.success)
    for event in result.get_asset_materialization_events():
        mat = event.materialization
        outcome.materializations[mat.asset_key.to_user_string()] = {
            k: getattr(v, "value", v) for k, v in mat.metadata.items()
        }
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            data = event.event_specific_data
            outcome.check_results[data.check_name] = bool(data.passed)  # type: ignore[union-attr]
        if event.is_step_failure and outcome.failure is None:
            err = event.step_failure_data.error  # type: ignore[union-attr]
            outcome.failure = f"{event.step_key}: {err.message.strip() if err else 'failed'}"
    return outcome


def _follow_run(
    instance: dg.DagsterInstance,
    run_id: str,
    on_event: Callable[[str], None],
    stop: threading.Event,
) -> None:
    seen = 0
    while True:
        finished = stop.wait(0.3)
        try:
            records = instance.all_logs(run_id)
        except Exception:  # the run may not exist yet
            records = []
        for record in records[seen:]:
            line = _describe(record)
            if line:
                on_event(line)
        seen = len(records)
        if finished:
            return


def _describe(record: Any) -> str | None:
    event = record.dagster_event
    if event is None:
        return record.user_message or None
    kind = event.event_type
    if kind == dg.DagsterEventType.STEP_START:
        return f"started {event.step_key}"
    if kind == dg.DagsterEventType.STEP_SUCCESS:
        return f"finished {event.step_key}"
    if kind == dg.DagsterEventType.STEP_FAILURE:
        return f"FAILED {event.step_key}"
    return None


def ingest_job_def() -> dg.JobDefinition:
    """The `ingest` job, rebuilt from the environment (for `dg.reconstructable`, e.g. multiprocess)."""
    from memcity_pipeline.definitions import build_definitions

    return build_definitions().resolve_job_def("ingest")
