"""`memcity ingest` through the Dagster instance: one run per partition, only what changed,
removals, and which runs may overlap.

Two orgs with two knowledge bases each and a user each, enrichment off; every run is a real
`dg.execute_job` with the multiprocess executor on the embedded instance.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from memcity_pipeline.api import get_context
from memcity_pipeline.cli.ingest import PARTITION_TAG, ingest, plan_ingest
from memcity_pipeline.cli.runner import get_instance
from memcity_pipeline.lake.delta import has_rows
from memcity_pipeline.lake.tables import TABLES, Table, scope_where
from memcity_pipeline.search.retrieval import SearchError
from memcity_pipeline.settings import load_settings

pytestmark = pytest.mark.slow

MEMCITY = str(Path(sys.executable).with_name("memcity"))
KB_STEPS = {
    "raw_documents",
    "document_structure",
    "chunks",
    "enriched_chunks",
    "chunk_embeddings",
    "bm25_index",
}


def _landing(home: Path) -> Path:
    landing = home / "landing"
    for org in ("north", "south"):
        for kb in ("guides", "notes"):
            folder = landing / "orgs" / org / "knowledge_bases" / kb
            folder.mkdir(parents=True)
            (folder / "a.md").write_text(f"# {org} {kb}\n\nThe {kb} of {org} say hello.\n")
            (folder / "b.txt").write_text(f"More {kb} text for {org}, about tides and ferries.\n")
        user = landing / "orgs" / org / "users" / "ann"
        user.mkdir(parents=True)
        (user / "memories.jsonl").write_text(f'{{"id": "m1", "text": "{org} ann likes tea"}}\n')
    return landing


def _steps(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.STEP_SUCCESS, limit=1000
    ).records
    return [r.event_log_entry.dagster_event.step_key for r in records]  # type: ignore[union-attr]


def _materialized_partitions(instance: dg.DagsterInstance, run_id: str) -> set[str | None]:
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, limit=1000
    ).records
    return {r.event_log_entry.dagster_event.partition for r in records}  # type: ignore[union-attr]


def _lake_files(lake: Path) -> dict[str, int]:
    """Data files of the lake's tables (Delta never rewrites a file: a change adds new ones),
    by `<table>/<org>/<scope>/<file>` (partition folders `org_id=<org>/<column>=<scope>`)."""
    return {
        "/".join(part.split("=", 1)[-1] for part in p.relative_to(lake).parts): p.stat().st_mtime_ns
        for p in lake.rglob("*.parquet")
        if "_delta_log" not in p.parts
    }


def test_one_edited_file_runs_its_partition_only_and_a_removed_kb_leaves_no_trace(
    memcity_home: Path,
) -> None:
    landing = _landing(memcity_home)
    settings = load_settings()
    first = ingest(settings)
    assert first.success, [p.failure for p in first.partitions]
    assert sorted(p.partition.key for p in first.partitions) == [
        "north/ann",
        "north/guides",
        "north/notes",
        "south/ann",
        "south/guides",
        "south/notes",
    ]
    instance = get_instance(settings)
    assert sorted(instance.get_dynamic_partitions("knowledge_bases")) == [
        "north/guides",
        "north/notes",
        "south/guides",
        "south/notes",
    ]
    lake = settings.lake_dir
    before = _lake_files(lake)

    (landing / "orgs/south/knowledge_bases/notes/b.txt").write_text("Edited: the ferry is late.\n")
    second = ingest(settings)
    assert second.success
    assert [p.partition.key for p in second.partitions] == ["south/notes"]
    assert len(second.plan.unchanged) == 5
    run_id = second.partitions[0].run_id
    assert run_id is not None
    assert set(_steps(instance, run_id)) == KB_STEPS  # read from the run's event log
    assert _materialized_partitions(instance, run_id) == {"south/notes"}
    assert instance.get_run_by_id(run_id).tags[PARTITION_TAG] == "south/notes"  # type: ignore[union-attr]
    changed = {p for p, stamp in _lake_files(lake).items() if before.get(p) != stamp}
    assert changed and all("south/notes" in p for p in changed), changed
    hits = get_context("south", "notes", "ferry late", 3, settings=settings)
    assert any("ferry is late" in h.text for h in hits)

    # A knowledge base whose folder is removed: its partition and its files go, nothing else.
    for path in sorted((landing / "orgs/north/knowledge_bases/guides").iterdir()):
        path.unlink()
    (landing / "orgs/north/knowledge_bases/guides").rmdir()
    third = ingest(settings)
    assert third.success and third.layout_run_id is not None
    assert [p.key for p in third.plan.removed] == ["north/guides"]
    assert third.partitions == []
    assert "north/guides" not in instance.get_dynamic_partitions("knowledge_bases")
    left = [
        t.name
        for t in TABLES.values()
        if t.scope != "date" and _has_scope(lake, t, "north", "guides")
    ]
    assert left == [], left
    assert not list((lake / "indexes").rglob("north/guides/*"))
    assert has_rows(lake, "chunks", scope_where("chunks", "north", "notes"))
    with pytest.raises(SearchError, match="unknown knowledge base 'guides' in org 'north'"):
        get_context("north", "guides", "hello", settings=settings)


def _has_scope(lake: Path, table: Table, org: str, scope: str) -> bool:
    where = (
        {"org_id": org, "scope_id": scope}
        if table.scope == "lake"
        else table.scope_where(org, scope)
    )
    return has_rows(lake, table.name, where)


def _run_span(instance: dg.DagsterInstance, key: str) -> list[tuple[float, float]]:
    records = instance.get_run_records(dg.RunsFilter(tags={PARTITION_TAG: key}))
    return sorted((r.start_time, r.end_time) for r in records)  # type: ignore[misc]


def test_runs_on_two_knowledge_bases_overlap_and_runs_on_one_do_not(memcity_home: Path) -> None:
    _landing(memcity_home)
    settings = load_settings()
    both = ingest(settings, kbs=["north/guides", "north/notes"], parallel=2)
    assert both.success
    instance = get_instance(settings)
    (a_start, a_end), (b_start, b_end) = (
        _run_span(instance, "north/guides")[0],
        _run_span(instance, "north/notes")[0],
    )
    assert a_start < b_end and b_start < a_end, "runs on two knowledge bases did not overlap"

    # Two commands on the same partition at once: the second run starts when the first ends.
    env = {**os.environ, "DAGSTER_HOME": str(settings.dagster_home)}
    command = [MEMCITY, "ingest", "--kb", "south/notes", "--all"]
    procs = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert any("partition south/notes is being written by memcity ingest" in o for o in outputs), (
        outputs
    )
    (first_start, first_end), (second_start, _) = _run_span(instance, "south/notes")
    assert second_start >= first_end > first_start
    # Off a terminal, each command printed its run as lines: every step started and done, with
    # no terminal control codes; the first also the progress of the 2 chunks it embedded (read
    # from the run's log; the second found them embedded).
    for output in outputs:
        lines = output.splitlines()
        assert "south/notes: raw_documents started" in lines, output
        assert any(re.fullmatch(r"south/notes: \w+ done \(6/6 steps\)", ln) for ln in lines)
        assert "\x1b[" not in output
    progress = r"south/notes: chunk_embeddings 2/2 chunks in \d+s"
    assert any(re.fullmatch(progress, ln) for o in outputs for ln in o.splitlines()), outputs


def test_an_org_folder_the_scan_cannot_list_keeps_its_partitions_and_data(
    memcity_home: Path,
) -> None:
    """An org folder that cannot be listed hides its knowledge bases and users; they are not
    gone: no partition is removed and no data deleted (a missing landing folder likewise)."""
    landing = _landing(memcity_home)
    settings = load_settings()
    assert ingest(settings).success
    setpriv = shutil.which("setpriv")
    if os.geteuid() == 0 and setpriv is None:
        pytest.skip("needs setpriv to drop root's permission to read any folder")
    # Root (as the tests run) reads any folder: the command runs without that privilege.
    drop = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"] if setpriv else []
    env = {**os.environ, "DAGSTER_HOME": str(settings.dagster_home)}
    (landing / "orgs/north").chmod(0)
    try:
        done = subprocess.run(
            [*drop, MEMCITY, "ingest"], env=env, capture_output=True, text=True, timeout=600
        )
    finally:
        (landing / "orgs/north").chmod(0o755)
    assert done.returncode == 0, done.stdout + done.stderr
    instance = get_instance(settings)
    assert "north/guides" in instance.get_dynamic_partitions("knowledge_bases")
    assert "north/ann" in instance.get_dynamic_partitions("users")
    assert has_rows(settings.lake_dir, "chunks", scope_where("chunks", "north", "guides"))

    os.rename(landing, landing.with_name("landing-away"))  # an unmounted landing folder
    plan = plan_ingest(settings, instance)
    assert plan.removed == []
