"""The daemon path for real: `dagster-daemon` on a Postgres instance configured by the repository's
dagster.yaml (queued run coordinator), the landing sensor turned on with the CLI, and files for
two new knowledge bases dropped into the landing folder while the daemon runs."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from memcity_pipeline.defs.ingest import KNOWLEDGE_BASE_ASSETS
from memcity_pipeline.settings import get_settings
from tests.conftest import POSTGRES_TEST_URL

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVER_URL = POSTGRES_TEST_URL.rsplit("/", 1)[0]
# Everything the daemon does, from its start to the last run's end (about 3 min on 2 busy cores:
# each run's forkserver imports the pipeline and sentence-transformers); under pytest's timeout.
DEADLINE_S = 660.0
NEW_KBS = ["acme/kb1", "acme/kb2"]
DOCUMENTS = {
    "acme/kb1": ("a.md", "# Hive care\n\nInspect the brood frames every week in spring.\n"),
    "acme/kb2": ("notes/b.md", "# Gateway\n\nThe gateway reboots when the uplink drops.\n"),
}

T = TypeVar("T")


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """A Postgres database of its own (no runs, ticks or partitions of other tests), dropped
    afterwards; its URL."""
    name = f"memcity_daemon_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(f"{SERVER_URL}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:  # pragma: no cover - CI starts Postgres
        pytest.fail(f"Postgres at {SERVER_URL} is not reachable: {exc}")
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{SERVER_URL}/{name}"
    finally:
        with psycopg.connect(f"{SERVER_URL}/postgres", autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the daemon and all it started (code servers, run workers, step processes): they are
    in its process group, as it leads a session of its own."""
    pgid = proc.pid
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reaps the daemon itself once it exits
            if not _group_members(pgid):
                return
            time.sleep(0.2)
    left = _group_members(pgid)
    assert not left, f"processes of the daemon outlived SIGKILL: {left}"


def _tail(path: Path, lines: int = 100) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


class Daemon:
    """The running `dagster-daemon`, its log, and the time it has left."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log
        self.deadline = time.monotonic() + DEADLINE_S

    def wait_for(self, what: str, probe: Callable[[], T | None]) -> T:
        """Poll `probe` until it returns something (not None); fail if the daemon dies first or
        the deadline passes, with the tail of the daemon's log."""
        while time.monotonic() < self.deadline:
            found = probe()
            if found is not None:
                return found
            if self.proc.poll() is not None:
                pytest.fail(
                    f"dagster-daemon exited ({self.proc.returncode}) before {what}:\n"
                    f"{_tail(self.log)}"
                )
            time.sleep(1.0)
        pytest.fail(f"timed out waiting for {what}; dagster-daemon's log:\n{_tail(self.log)}")


def _sensor_ticks(instance: dg.DagsterInstance) -> list[Any]:
    """The landing sensor's ticks, oldest first."""
    states = [s for s in instance.all_instigator_state() if s.name == "landing_sensor"]
    assert len(states) == 1, states
    state = states[0]
    ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id)
    return sorted(ticks, key=lambda t: t.timestamp)


def _finished_tick(instance: dg.DagsterInstance, after: float = 0.0) -> Any:
    """The first landing-sensor tick after `after` that has finished evaluating, or None."""
    for tick in _sensor_ticks(instance):
        if tick.timestamp > after and tick.status.value != "STARTED":
            return tick
    return None


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_daemon_sensor_launches_one_run_per_new_knowledge_base_in_separate_processes(
    tmp_path: Path, fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "dagster_home_daemon"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv(
        "MEMCITY_DAGSTER_POSTGRES_URL",
        fresh_database.replace("postgresql://", "postgresql+psycopg2://"),
    )
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    env = dict(os.environ)  # MEMCITY_HOME and MEMCITY_ENRICHMENT=off come from `memcity_home`
    workspace = str(REPO / "workspace.yaml")
    landing = get_settings().landing_dir

    # The test opens the instance first, so the tables are created once, before any subprocess.
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        started = subprocess.run(
            [str(BIN / "dagster"), "sensor", "start", "landing_sensor", "-w", workspace],
            cwd=tmp_path,  # no stray .env of a working directory
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert started.returncode == 0, started.stdout + started.stderr

        log = tmp_path / "daemon.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(BIN / "dagster-daemon"), "run", "-w", workspace],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _drop_two_knowledge_bases_and_check_their_runs(instance, Daemon(proc, log), landing)
        finally:
            _stop_group(proc)


def _drop_two_knowledge_bases_and_check_their_runs(
    instance: dg.DagsterInstance, daemon: Daemon, landing: Path
) -> None:
    # The first tick comes right after the daemon starts, on an empty landing folder: no
    # partition, at most the run of the layout job (there was no layout fingerprint yet).
    first = daemon.wait_for("the landing sensor's first tick", lambda: _finished_tick(instance))
    assert first.status.value in ("SUCCESS", "SKIPPED"), first.error
    assert instance.get_dynamic_partitions("knowledge_bases") == []
    before = instance.get_runs()
    assert {r.job_name for r in before} <= {"sync_landing_layout_job"}

    # Files for two new knowledge bases arrive; the next tick (30 s later) sees them.
    for key, (name, text) in DOCUMENTS.items():
        org, kb = key.split("/")
        path = landing / "orgs" / org / "knowledge_bases" / kb / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    tick = daemon.wait_for(
        "the tick that sees the new files", lambda: _finished_tick(instance, first.timestamp)
    )
    assert tick.status.value == "SUCCESS", (tick.status, tick.error)
    assert sorted(instance.get_dynamic_partitions("knowledge_bases")) == NEW_KBS
    assert instance.get_dynamic_partitions("users") == []
    requested = [r for r in instance.get_runs() if r.run_id not in {b.run_id for b in before}]
    assert sorted(r.run_id for r in requested) == sorted(tick.run_ids)
    assert [r.job_name for r in requested] == ["ingest_knowledge_bases"] * len(NEW_KBS)
    assert sorted(r.tags.get("dagster/partition") for r in requested) == NEW_KBS

    # The queued run coordinator launches them; every run of the instance ends in success.
    def every_run_finished() -> list[dg.DagsterRun] | None:
        runs = instance.get_runs()
        return runs if all(r.is_finished for r in runs) else None

    runs = daemon.wait_for("the runs to finish", every_run_finished)
    assert [(r.job_name, r.status) for r in runs if not r.is_success] == [], _tail(daemon.log)
    ingest = [r for r in runs if r.job_name == "ingest_knowledge_bases"]
    assert sorted(r.run_id for r in ingest) == sorted(tick.run_ids)

    # Each run materialized every asset of the job, for its own partition only.
    asset_keys = {a.key for a in KNOWLEDGE_BASE_ASSETS}
    run_pids: dict[str, int] = {}
    step_pids: set[int] = set()
    for run in ingest:
        partition = run.tags["dagster/partition"]
        events = [e.dagster_event for e in instance.all_logs(run.run_id) if e.dagster_event]
        materialized = [
            e for e in events if e.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION
        ]
        assert sorted(e.asset_key.to_user_string() for e in materialized) == sorted(
            k.to_user_string() for k in asset_keys
        ), partition
        assert {e.partition for e in materialized} == {partition}
        (run_start,) = [e for e in events if e.event_type == dg.DagsterEventType.RUN_START]
        run_pids[partition] = run_start.pid
        step_pids |= {e.pid for e in events if e.event_type == dg.DagsterEventType.STEP_START}
    for key in asset_keys:
        assert instance.get_materialized_partitions(key) == set(NEW_KBS), key

    # Each run in a worker process of its own, neither the test's nor the daemon's; the
    # multiprocess executor runs the steps in further processes.
    pids = set(run_pids.values())
    assert len(pids) == len(NEW_KBS), run_pids
    assert not pids & {os.getpid(), daemon.proc.pid}, run_pids
    assert len(step_pids) == len(asset_keys) * len(NEW_KBS)
    assert not step_pids & (pids | {os.getpid(), daemon.proc.pid})
    assert daemon.proc.poll() is None, _tail(daemon.log)
