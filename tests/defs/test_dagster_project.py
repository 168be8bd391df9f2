"""The Dagster project as operators use it: definitions, the CLI, Postgres storage, multiprocess."""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from filelock import FileLock

from memcity_pipeline.cli.runner import (
    copy_sample_corpus,
    ensure_dagster_home,
    get_instance,
    ingest_knowledge_bases_job,
    ingest_users_job,
)
from memcity_pipeline.defs.ingest import execution_config
from memcity_pipeline.lake.delta import read_rows, table_versions
from memcity_pipeline.lake.tables import TABLES
from memcity_pipeline.settings import get_settings
from tests.conftest import POSTGRES_TEST_URL

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_definitions_validate_with_the_dagster_cli(tmp_path: Path) -> None:
    # With DAGSTER_HOME set, the Dagster CLI uses that instance, not the ./dagster.yaml of the
    # repository (which asks for Postgres): the embedded default.
    home = ensure_dagster_home(get_settings())
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    os.environ.pop("DAGSTER_HOME", None)
    proc = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_new_instance_is_opened_by_one_command_at_a_time() -> None:
    # Two commands started at once on a new home would both create the SQLite tables; the
    # second one waits on the home's lock file until the first has opened the instance.
    settings = get_settings()
    home = ensure_dagster_home(settings)
    opened = threading.Event()

    def open_instance() -> None:
        get_instance(settings).dispose()
        opened.set()

    with FileLock(home / ".instance.lock"):
        opener = threading.Thread(target=open_instance)
        opener.start()
        assert not opened.wait(1.0), "the instance opened while another process held the lock"
    assert opened.wait(60), "the instance did not open once the lock was free"
    opener.join()
    assert (home / "history" / "runs.db").is_file()
    assert not list(home.glob(".dagster.yaml.*.tmp"))


def test_definitions_hold_every_ingestion_piece() -> None:
    from memcity_pipeline.definitions import defs

    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"raw_documents", "memories", "conversations"} <= keys
    for job in ("ingest_knowledge_bases", "ingest_users", "sync_landing_layout_job"):
        assert repo.has_job(job), job
    assert sorted(s.name for s in repo.schedule_defs) == [
        "daily_ingest_knowledge_bases",
        "daily_ingest_users",
        "weekly_lake_maintenance",
    ]
    weekly = repo.get_schedule_def("weekly_lake_maintenance")
    assert weekly.cron_schedule == "0 3 * * 0" and weekly.job_name == "lake_maintenance_job"
    assert {"landing_sensor", "memcity_automation"} <= {s.name for s in repo.sensor_defs}
    # Every ingestion asset is partitioned: knowledge bases or users, never both in one job.
    graph = repo.asset_graph
    by_partitions: dict[str, set[str]] = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if node.group_name in ("ingestion", "enrichment", "indexing"):
            by_partitions.setdefault(node.partitions_def.name, set()).add(key.to_user_string())
    assert by_partitions == {
        "knowledge_bases": {
            "raw_documents",
            "document_structure",
            "chunks",
            "enriched_chunks",
            "chunk_embeddings",
            "bm25_index",
        },
        "users": {"memories", "conversations", "memory_index"},
    }
    # The LLM-calling steps share the `llm` pool; the spend-guarding checks are blocking.
    pools = {k.to_user_string(): graph.get(k).pools for k in graph.get_all_asset_keys()}
    assert {k for k, p in pools.items() if p and "llm" in p} == {
        "document_structure",
        "enriched_chunks",
    }
    blocking = {
        spec.name
        for spec in repo.asset_graph.asset_check_keys
        if graph.get_check_spec(spec).blocking
    }
    assert {"chunks_not_empty", "chunks_within_token_budget"} <= blocking


@pytest.mark.slow
def test_memcity_demo_runs_on_embedded_defaults_and_second_run_changes_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    first = subprocess.run(
        [str(BIN / "memcity"), "demo", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["success"] is True
    partitions = {p["partition"]: p for p in report["partitions"]}
    assert set(partitions) == {
        "brambleway/company_docs",
        "saltmarsh/operations",
        "brambleway/declan",
        "brambleway/helene",
        "brambleway/priya",
        "saltmarsh/ruth",
    }
    assert partitions["saltmarsh/operations"]["assets"]["raw_documents"]["changed"] == 2
    assert all(p["success"] for p in partitions.values())
    home = Path(env["MEMCITY_HOME"])
    assert (home / "dagster_home" / "dagster.yaml").exists()  # embedded SQLite instance
    assert (home / "lake" / "raw_documents" / "_delta_log").is_dir()  # a Delta table
    assert read_rows(home / "lake", "raw_documents").height > 0
    versions = table_versions(home / "lake", TABLES)

    second = subprocess.run(
        [str(BIN / "memcity"), "ingest"], capture_output=True, text=True, env=env, timeout=900
    )
    assert second.returncode == 0, second.stderr
    assert "nothing changed in the landing folder (6 partitions up to date" in second.stderr
    assert table_versions(home / "lake", TABLES) == versions  # nothing committed

    # The runs are in the same instance the UI reads: one per partition (and the layout's).
    os.environ["DAGSTER_HOME"] = str(home / "dagster_home")
    try:
        with dg.DagsterInstance.get() as instance:
            runs = instance.get_runs()
            assert all(r.is_success for r in runs)
            by_job: dict[str, list[str]] = {}
            for r in runs:
                by_job.setdefault(r.job_name, []).append(r.tags.get("dagster/partition", ""))
            assert sorted(by_job["ingest_knowledge_bases"]) == sorted(
                k for k in partitions if k.endswith(("company_docs", "operations"))
            )
            assert len(by_job["ingest_users"]) == 4
    finally:
        del os.environ["DAGSTER_HOME"]


@pytest.fixture
def postgres_instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dg.DagsterInstance:
    """An instance configured by the repository's own dagster.yaml, on the machine's Postgres."""
    try:
        psycopg.connect(POSTGRES_TEST_URL, connect_timeout=5).close()
    except psycopg.OperationalError as exc:  # pragma: no cover - CI starts Postgres
        pytest.fail(f"Postgres at {POSTGRES_TEST_URL} is not reachable: {exc}")
    home = tmp_path / "dagster_home_pg"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv(
        "MEMCITY_DAGSTER_POSTGRES_URL",
        POSTGRES_TEST_URL.replace("postgresql://", "postgresql+psycopg2://"),
    )
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = dg.DagsterInstance.get()
    yield instance
    instance.dispose()


@pytest.mark.postgres
def test_materialization_lands_in_real_postgres(postgres_instance: dg.DagsterInstance) -> None:
    settings = get_settings()
    copy_sample_corpus(settings.landing_dir)
    postgres_instance.add_dynamic_partitions("users", ["saltmarsh/ruth"])
    result = ingest_users_job().execute_in_process(
        instance=postgres_instance, partition_key="saltmarsh/ruth"
    )
    assert result.success
    with psycopg.connect(POSTGRES_TEST_URL) as conn:
        rows = conn.execute(
            "SELECT asset_key, dagster_event_type FROM event_logs WHERE run_id = %s"
            " AND dagster_event_type = 'ASSET_MATERIALIZATION'",
            (result.run_id,),
        ).fetchall()
        status = conn.execute(
            "SELECT status FROM runs WHERE run_id = %s", (result.run_id,)
        ).fetchone()
    keys = {json.loads(r[0])[0] for r in rows}
    assert keys == {"memories", "conversations", "memory_index"}
    assert status == ("SUCCESS",)


@pytest.mark.postgres
def test_multiprocess_executor_runs_steps_in_child_processes(
    postgres_instance: dg.DagsterInstance,
) -> None:
    settings = get_settings()
    copy_sample_corpus(settings.landing_dir)
    postgres_instance.add_dynamic_partitions("knowledge_bases", ["saltmarsh/operations"])
    with dg.execute_job(
        dg.reconstructable(ingest_knowledge_bases_job),
        instance=postgres_instance,
        run_config=execution_config(2),
        tags={"dagster/partition": "saltmarsh/operations"},
    ) as result:
        assert result.success
        starts = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_START]
        pids = {e.pid for e in starts}
        assert len(starts) == 6
        assert os.getpid() not in pids and len(pids) == len(starts)


def test_embedded_home_is_created_when_dagster_home_is_unset() -> None:
    settings = get_settings()
    path = ensure_dagster_home(settings)
    try:
        assert path == settings.dagster_home
        assert "telemetry" in (path / "dagster.yaml").read_text()
    finally:
        os.environ.pop("DAGSTER_HOME", None)


@pytest.mark.postgres
def test_multiprocess_concurrency_limit_of_one_runs_steps_one_at_a_time(
    postgres_instance: dg.DagsterInstance,
) -> None:
    copy_sample_corpus(get_settings().landing_dir)
    postgres_instance.add_dynamic_partitions("users", ["brambleway/helene"])
    with dg.execute_job(
        dg.reconstructable(ingest_users_job),
        instance=postgres_instance,
        run_config=execution_config(1),
        tags={"dagster/partition": "brambleway/helene"},
    ) as result:
        assert result.success
        running: set[str] = set()
        most = 0
        for event in result.all_events:
            if event.event_type == dg.DagsterEventType.STEP_START:
                running.add(event.step_key)
                most = max(most, len(running))
            elif event.event_type in (
                dg.DagsterEventType.STEP_SUCCESS,
                dg.DagsterEventType.STEP_FAILURE,
            ):
                running.discard(event.step_key)
        assert most == 1
