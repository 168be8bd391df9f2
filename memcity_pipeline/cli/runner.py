"""The Dagster instance and jobs that the `memcity` command runs, outside the UI.

The instance is the one `DAGSTER_HOME` names (the UI uses the same); with no `DAGSTER_HOME` it is
the embedded SQLite instance under `$MEMCITY_HOME/dagster_home`. The job factories rebuild a job
of the definitions from the environment, so that `dg.reconstructable` can rebuild it in the step
processes of the multiprocess executor. `cli.ingest` plans and runs ingestion with them.
"""

import os
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import dagster as dg
from filelock import FileLock

from memcity_pipeline.settings import Settings

EMBEDDED_DAGSTER_YAML = """\
# Embedded default: SQLite run/event storage in this folder. See the README for Postgres.
telemetry:
  enabled: false
# LLM-calling steps share the `llm` pool: at most this many run at once across all runs.
concurrency:
  pools:
    default_limit: 2
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


def _job(name: str) -> dg.JobDefinition:
    from memcity_pipeline.definitions import build_definitions

    return build_definitions().resolve_job_def(name)


def ingest_knowledge_bases_job() -> dg.JobDefinition:
    """The `ingest_knowledge_bases` job, rebuilt from the environment (for `dg.reconstructable`)."""
    return _job("ingest_knowledge_bases")


def ingest_users_job() -> dg.JobDefinition:
    """The `ingest_users` job, rebuilt from the environment (for `dg.reconstructable`)."""
    return _job("ingest_users")


def sync_landing_layout_job() -> dg.JobDefinition:
    """The `sync_landing_layout_job`, rebuilt from the environment (for `dg.reconstructable`)."""
    return _job("sync_landing_layout_job")


JOB_FACTORIES: dict[str, Callable[[], dg.JobDefinition]] = {
    "ingest_knowledge_bases": ingest_knowledge_bases_job,
    "ingest_users": ingest_users_job,
}
