"""The Dagster UI as a person uses it: `dagster dev -w workspace.yaml` driven in Chromium.

One UI (and one scripted OpenAI-compatible server) serves the whole module; each test opens its
own page and, when it fails, leaves `failure.png` in its tmp folder. The ingestion and the RLM
query are launched from the UI once (module fixtures) and checked by the tests that need them.
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
from memcity_pipeline.defs.rlm import RLMQueryConfig
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


@pytest.fixture(scope="module")
def ingest_outcome(ui: UISession) -> str:
    """The `ingest` job launched from its launchpad, once."""
    return _launched(ui, "ingest", lambda tab: driver.ingest_from_launchpad(tab, ui.base_url))


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


def test_ingest_launched_from_the_ui_fills_the_lake(
    ui: UISession, page: Page, ingest_outcome: str
) -> None:
    assert ingest_outcome.startswith("Success"), ingest_outcome
    for table in ("raw_documents", "document_structure", "chunks", "enriched_chunks"):
        assert (ui.lake / table / "brambleway" / "company_docs.parquet").is_file(), table
    for table in ("memories", "conversations", "memory_embeddings"):
        assert (ui.lake / table / "brambleway" / "helene.parquet").is_file(), table
    assert (ui.lake / "chunk_embeddings" / "brambleway" / "company_docs.parquet").is_file()
    assert (ui.lake / "indexes" / "chunks_bm25" / "brambleway" / "company_docs").is_dir()

    # Each group's list shows every asset of the job as materialized.
    by_group: dict[str, set[str]] = {}
    graph = defs.resolve_asset_graph()
    for key in defs.resolve_job_def("ingest").asset_layer.executable_asset_keys:
        by_group.setdefault(graph.get(key).group_name, set()).add(key.to_user_string())
    assert set(by_group) == {"ingestion", "enrichment", "indexing"}
    for group, keys in by_group.items():
        assert set(driver.group_assets(page, ui.base_url, group)) == keys
        expect(page.get_by_text("Materialized", exact=True)).to_have_count(len(keys))


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
