"""The Dagster UI as a person uses it: `dagster dev -w workspace.yaml` driven in Chromium.

One UI (and one scripted OpenAI-compatible server) serves the whole module; each test opens its
own page and, when it fails, leaves `failure.png` in its tmp folder. The sample corpus's knowledge
bases and users are the instance's partitions before the UI starts. One knowledge-base partition
materialized from its asset page, the backfills of every partition of both ingestion jobs, and
the RLM query are launched from the UI once each (module fixtures) and checked by the tests that
need them; the backfills wait for the one-partition run, so that its test reads the partitions as
that run alone left them.
"""

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

from memcity_pipeline.definitions import defs
from memcity_pipeline.defs.partitions import knowledge_bases
from memcity_pipeline.defs.rlm import RLMQueryConfig
from memcity_pipeline.lake.delta import has_rows
from memcity_pipeline.lake.tables import scope_where, table_scopes
from memcity_pipeline.rlm.sessions import read_sessions
from tests.scripted_llm_server import ScriptedLLMServer
from tests.ui import driver

pytestmark = [pytest.mark.timeout(300), pytest.mark.chromium]


@dataclass
class UISession:
    """The running UI, its browser, and the folders of its instance."""

    ui: driver.DagsterUI
    browser: BrowserContext
    llm: ScriptedLLMServer
    artifacts: Path

    @property
    def base_url(self) -> str:
        return self.ui.base_url

    @property
    def lake(self) -> Path:
        return self.ui.home / "lake"


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UISession]:
    """`dagster dev` on a scratch instance with the sample corpus, and a Chromium to drive it."""
    root = tmp_path_factory.mktemp("ui")
    with (
        ScriptedLLMServer(driver.scripted_model) as llm,
        driver.running_ui(root / "home", llm.base_url) as running,
        sync_playwright() as playwright,
        driver.chromium(playwright, root / "profile") as browser,
    ):
        yield UISession(running, browser, llm, root)
    assert not driver.processes_mentioning(str(root / "home")), "a process of the UI outlived it"


@pytest.fixture
def page(ui: UISession, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Page]:
    """A fresh tab; a screenshot of it lands in the test's tmp folder if the test fails."""
    failed_before = request.session.testsfailed
    tab = ui.browser.new_page()
    yield tab
    if request.session.testsfailed > failed_before:
        shot = tmp_path / "failure.png"
        tab.screenshot(path=shot)
        print(f"screenshot of the failed page: {shot}")
    tab.close()


def _launched(ui: UISession, name: str, story: Callable[[Page], tuple[str, str]]) -> str:
    """Run a UI story in its own tab; its run's final status (a screenshot unless a success)."""
    tab = ui.browser.new_page()
    try:
        run_id, status = story(tab)
        if status != "Success":
            tab.screenshot(path=ui.artifacts / f"{name}-failure.png")
    except Exception:
        tab.screenshot(path=ui.artifacts / f"{name}-failure.png")
        raise
    finally:
        tab.close()
    return f"{status} ({name} run {run_id}; log {ui.ui.log_path})"


@dataclass
class OnePartition:
    """The run of one knowledge-base partition launched from its asset's page, and what the UI
    and the lake showed right after it (before any other ingestion run)."""

    outcome: str
    run_id: str
    view: dict[str, str]  # partition -> the status filter of the Partitions tab that lists it
    details: dict[str, tuple[str, str]]  # partition -> its status tag and latest run, selected
    raw_documents: list[str]  # the partitions (`<org>/<kb>`) the raw_documents table holds


@pytest.fixture(scope="module")
def one_partition(ui: UISession) -> OnePartition:
    """`ONE_PARTITION` of `raw_documents` materialized from the asset's page, once."""
    asset = driver.ONE_PARTITION_ASSET
    ran: dict[str, str] = {}

    def story(tab: Page) -> tuple[str, str]:
        ran["run_id"], ran["status"] = driver.one_partition_from_its_asset_page(tab, ui.base_url)
        return ran["run_id"], ran["status"]

    outcome = _launched(ui, "one_partition", story)
    tab = ui.browser.new_page()
    try:
        view = driver.partition_view(tab, ui.base_url, asset)
        details = {
            key: driver.partition_detail(tab, ui.base_url, asset, key)
            for key in ui.ui.partitions[knowledge_bases.name]
        }
    except Exception:
        tab.screenshot(path=ui.artifacts / "partition-view-failure.png")
        raise
    finally:
        tab.close()
    written = sorted("/".join(k) for k in table_scopes(ui.lake, asset))
    return OnePartition(outcome, ran["run_id"], view, details, written)


@pytest.fixture(scope="module")
def ingest_backfills(ui: UISession, one_partition: OnePartition) -> list[driver.Backfill]:
    """A backfill of every partition of each ingestion job, launched from the job's Partitions
    tab, once; after the one-partition run (`one_partition`), which must see the lake before."""
    tab = ui.browser.new_page()
    try:
        backfills = driver.ingest_every_partition_from_the_ui(tab, ui.base_url)
        if any(b.status != "Succeeded" for b in backfills):
            tab.screenshot(path=ui.artifacts / "ingest-failure.png")
    except Exception:
        tab.screenshot(path=ui.artifacts / "ingest-failure.png")
        raise
    finally:
        tab.close()
    return backfills


@pytest.fixture(scope="module")
def rlm_outcome(ui: UISession) -> str:
    """The `rlm_query` job launched from its launchpad with the scripted query, once."""
    return _launched(ui, "rlm_query", lambda tab: driver.rlm_query_from_launchpad(tab, ui.base_url))


def test_every_asset_shows_in_its_group(ui: UISession, page: Page) -> None:
    graph = defs.resolve_asset_graph()
    expected: dict[str, dict[str, str]] = {}
    for key in graph.get_all_asset_keys():
        group = graph.get(key).group_name
        expected.setdefault(group, {})[key.to_user_string()] = group
    # Every asset sits in one of the stage groups (none falls into Dagster's `default`).
    assert set(expected) == {"ingestion", "enrichment", "indexing", "rlm"}

    for group, assets in sorted(expected.items()):
        assert driver.group_assets(page, ui.base_url, group) == assets, group

    driver.open_global_lineage(page, ui.base_url)
    for assets in expected.values():
        for key in assets:
            expect(page.get_by_text(key, exact=True)).to_be_visible()


def test_one_knowledge_base_partition_materialized_from_its_asset_page(
    ui: UISession, one_partition: OnePartition
) -> None:
    chosen = driver.ONE_PARTITION
    partitions = ui.ui.partitions[knowledge_bases.name]
    assert chosen in partitions and len(partitions) > 1, partitions  # others to stay missing
    assert one_partition.outcome.startswith("Success"), one_partition.outcome

    # The Partitions tab lists the chosen partition as materialized, every other as missing.
    expected = {key: "Missing" for key in partitions} | {chosen: "Materialized"}
    assert one_partition.view == expected
    # Selected there, the chosen one is tagged materialized by the run launched from its page.
    assert one_partition.details[chosen] == ("Materialized", one_partition.run_id)
    for key in set(partitions) - {chosen}:
        assert one_partition.details[key] == ("", ""), key  # no tag, no run
    # The run wrote that knowledge base's partition of the table and no other.
    assert one_partition.raw_documents == [chosen]


def test_ingest_launched_from_the_ui_fills_the_lake(
    ui: UISession, page: Page, ingest_backfills: list[driver.Backfill]
) -> None:
    # Each job's dialog selected every partition of the instance; each backfill succeeded.
    partitions = {
        job: ui.ui.partitions[defs.resolve_job_def(job).partitions_def.name]  # type: ignore[union-attr]
        for job in driver.INGEST_JOBS
    }
    assert [b.job for b in ingest_backfills] == list(driver.INGEST_JOBS)
    for backfill in ingest_backfills:
        assert backfill.partitions == len(partitions[backfill.job]), backfill
        assert backfill.status == "Succeeded", f"{backfill}; log {ui.ui.log_path}"

    # Every knowledge base and every user of the sample corpus is in the lake.
    for key in partitions["ingest_knowledge_bases"]:
        for table in (
            "raw_documents",
            "document_structure",
            "chunks",
            "enriched_chunks",
            "chunk_embeddings",
        ):
            assert has_rows(ui.lake, table, scope_where(table, *key.split("/"))), (table, key)
        assert (ui.lake / "indexes" / "chunks_bm25" / key / "CURRENT").is_file(), key
    for key in partitions["ingest_users"]:
        for table in ("memories", "conversations", "memory_embeddings"):
            assert has_rows(ui.lake, table, scope_where(table, *key.split("/"))), (table, key)
        assert (ui.lake / "indexes" / "memories_bm25" / key / "CURRENT").is_file(), key

    # Each group's list shows every asset of the jobs with all its partitions materialized.
    by_group: dict[str, dict[str, int]] = {}
    graph = defs.resolve_asset_graph()
    for job in driver.INGEST_JOBS:
        for key in defs.resolve_job_def(job).asset_layer.executable_asset_keys:
            assets = by_group.setdefault(graph.get(key).group_name, {})
            assets[key.to_user_string()] = len(partitions[job])
    assert set(by_group) == {"ingestion", "enrichment", "indexing"}
    for group, assets in by_group.items():
        shown = driver.group_partition_counts(page, ui.base_url, group)
        assert set(shown) == set(assets), group
        for key, count in assets.items():
            all_materialized = {"partitions": count, "materialized": count}
            assert shown[key] == all_materialized | dict.fromkeys(
                ("missing", "failed", "materializing"), 0
            ), key


def config_defaults(model: Any) -> dict[str, Any]:
    """The defaults of a Config class as the launchpad shows them (nested configs as dicts,
    enums by name, unset options left out)."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        value = (
            config_defaults(field.annotation)
            if field.default_factory is not None
            else field.default
        )
        if isinstance(value, enum.Enum):
            value = value.name
        if value is not None:
            out[name] = value
    return out


def contains(whole: dict[str, Any], part: dict[str, Any]) -> bool:
    """Whether every entry of `part` is in `whole` (recursively for nested dicts)."""
    return all(
        contains(whole.get(k) or {}, v) if isinstance(v, dict) else whole.get(k) == v
        for k, v in part.items()
    )


def test_rlm_query_launchpad_scaffolds_the_default_config(ui: UISession, page: Page) -> None:
    defaults = config_defaults(RLMQueryConfig)
    assert defaults["rlm"]["max_iterations"] == 20 and defaults["context_type"] == "documents"
    driver.open_launchpad(page, ui.base_url, "rlm_query")
    opened = yaml.safe_load(driver.editor_text(page))
    assert contains(opened["ops"]["run_rlm_query"]["config"], defaults), opened

    # Emptied, the editor gets the defaults back from "Scaffold all default config".
    driver.replace_config(page, "")
    driver.scaffold_all_defaults(page)
    scaffolded = yaml.safe_load(driver.editor_text(page))
    assert contains(scaffolded["ops"]["run_rlm_query"]["config"], defaults), scaffolded


def test_rlm_query_launched_from_the_launchpad_answers_and_logs_a_session(
    ui: UISession, page: Page, rlm_outcome: str
) -> None:
    assert rlm_outcome.startswith("Success"), rlm_outcome
    sessions = read_sessions(ui.lake, org_id="brambleway")
    assert sessions.height == 1
    row = sessions.row(0, named=True)
    assert row["context_type"] == "custom"
    assert row["status"] == "completed"
    assert row["query"] == driver.QUESTION
    assert row["iterations"] == 1
    # The root model's code ran in the sandbox over the context; the UI shows its answer.
    page.goto(f"{ui.base_url}/assets/rlm_sessions")
    expect(page.get_by_text(driver.EXPECTED_ANSWER, exact=True)).to_be_visible()
    assert ui.llm.call_count >= 1


def test_rlm_session_report_materialized_from_the_ui_shows_its_charts(
    ui: UISession, page: Page, rlm_outcome: str
) -> None:
    assert rlm_outcome.startswith("Success"), rlm_outcome
    driver.materialize_asset(page, ui.base_url, "rlm_session_report")
    status = driver.wait_for_run_end(page)
    assert status == "Success", page.url

    page.goto(f"{ui.base_url}/assets/rlm_session_report")
    # The Markdown table with its latency bars, one row per context type.
    markdown = page.get_by_role("row").filter(has_text="by_context_type").first
    expect(markdown).to_contain_text("custom")
    expect(markdown).to_contain_text("█")
    # The numeric entries plotted across materializations.
    driver.button(page, "Plots").click()
    for entry in ("latency_p50_s", "latency_p95_s", "iterations_mean", "cost_usd_total"):
        title = page.get_by_text(entry, exact=True)
        expect(title.locator("xpath=../..").locator("canvas")).to_be_visible()
