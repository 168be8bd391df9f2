"""Start the Dagster UI (`dagster dev`) on a scratch instance and drive it in Chromium.

Used by `tests/ui/test_ui.py` and by `python -m tests.ui.driver --screenshots docs/images`
(`make screenshots`), which refreshes the README's screenshots with the same steps.

The UI runs from this virtualenv's `dagster dev -w workspace.yaml` in its own process group, with
its own `MEMCITY_HOME` and `DAGSTER_HOME`, the sample corpus in the landing folder, its knowledge
bases and users registered as the instance's dynamic partitions before the UI starts, and every
LLM call sent to a scripted OpenAI-compatible server of the calling process. The browser is
Debian's `/usr/bin/chromium`, driven by Playwright (no browser download).
"""

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import dagster as dg
from playwright.sync_api import (
    BrowserContext,
    Locator,
    Page,
    Playwright,
    expect,
    sync_playwright,
)

from memcity_pipeline.cli.runner import EMBEDDED_DAGSTER_YAML, copy_sample_corpus
from tests.partitioned import scope_keys
from tests.scripted_llm_server import ScriptedLLMServer

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOCATION = "memcity_pipeline"
CHROMIUM = "/usr/bin/chromium"
# Headless, and nothing that reaches for the network (refused connections stall Chromium here).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1440, "height": 900}
ROOT_MODEL = "root-model"
SUB_MODEL = "sub-model"

# Variables of the caller's environment that must not reach the UI's processes.
_SCRUBBED_PREFIXES = ("MEMCITY_", "DAGSTER_", "DAYTONA_")
_SCRUBBED = {"OPENROUTER_API_KEY"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ui_environment(home: Path, llm_base_url: str) -> dict[str, str]:
    """The environment of `dagster dev`: a scratch instance, no secrets, the scripted LLM."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_SCRUBBED_PREFIXES) and k not in _SCRUBBED
    }
    env.update(
        {
            "MEMCITY_HOME": str(home),
            "DAGSTER_HOME": str(home / "dagster_home"),
            "MEMCITY_ENRICHMENT": "off",
            "MEMCITY_LLM_BASE_URL": llm_base_url,
            "MEMCITY_LLM_MODEL": ROOT_MODEL,
            "MEMCITY_LLM_SUB_MODEL": SUB_MODEL,
            "MEMCITY_LLM_MAX_RETRIES": "0",
            # Hashed vectors from the scripted server: seconds instead of loading torch per step.
            "MEMCITY_EMBEDDINGS": "openai:scripted-embeddings",
            "MEMCITY_SANDBOX": "local",
        }
    )
    return env


def prepare_home(home: Path) -> dict[str, list[str]]:
    """An embedded Dagster instance, the sample corpus in the landing folder, and its knowledge
    bases and users added to the instance as partitions; the partition keys by partitions name.

    A run of a dynamic partition needs the partition in the instance. They are added here, before
    `dagster dev` opens the same SQLite storage, the way `memcity ingest` or the landing sensor
    would add them (the sensor is off in the UI, so that every run is one the test launches).
    """
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text(EMBEDDED_DAGSTER_YAML)
    copy_sample_corpus(home / "landing")
    keys = scope_keys(home / "landing")
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        for name, partition_keys in keys.items():
            instance.add_dynamic_partitions(name, partition_keys)
    finally:
        instance.dispose()
    return keys


@dataclass
class DagsterUI:
    """`dagster dev -w workspace.yaml` on a free port, in its own process group."""

    home: Path
    env: dict[str, str]
    partitions: dict[str, list[str]] = field(default_factory=dict)  # keys by partitions name
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "dagster_dev.log"

    def start(self, timeout_s: float = 180.0) -> None:
        """Start the UI; return once its code location is loaded."""
        with self.log_path.open("wb") as log:
            # cwd: the scratch home, so no `.env` or `dagster.yaml` of the repository is read.
            self.process = subprocess.Popen(
                [
                    str(BIN / "dagster"),
                    "dev",
                    "-w",
                    str(REPO / "workspace.yaml"),
                    "-p",
                    str(self.port),
                    "-h",
                    "127.0.0.1",
                ],
                cwd=self.home,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not self._location_loaded():
            if self.process.poll() is not None:
                raise RuntimeError(f"dagster dev exited early; see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the UI did not come up in {timeout_s:.0f} s")
            time.sleep(0.5)
        # The community sign-up dialog would cover the page on a fresh instance.
        self.graphql("mutation { setNuxSeen }")

    def _location_loaded(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/server_info", timeout=5):
                pass
            data = self.graphql(
                "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
                "locationOrLoadError { __typename } } } } }"
            )
        except (OSError, urllib.error.URLError):
            return False
        entries = data["workspaceOrError"].get("locationEntries") or []
        for entry in entries:
            if entry["name"] == LOCATION and entry["loadStatus"] == "LOADED":
                kind = entry["locationOrLoadError"]["__typename"]
                if kind != "RepositoryLocation":
                    raise RuntimeError(f"the code location failed to load; see {self.log_path}")
                return True
        return False

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run a GraphQL query against the webserver; its `data`."""
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.base_url}/graphql",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise RuntimeError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop `dagster dev` and every process it started (its group, then stragglers)."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        # Run workers may have left the group; they all name this instance's folder.
        for pid in processes_mentioning(str(self.home)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def processes_mentioning(text: str) -> list[int]:
    """Ids of live processes whose command line contains `text` (never this process)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


@contextlib.contextmanager
def running_ui(home: Path, llm_base_url: str) -> Iterator[DagsterUI]:
    """A started UI on a prepared `home`; always stopped on exit."""
    partitions = prepare_home(home)
    ui = DagsterUI(home=home, env=ui_environment(home, llm_base_url), partitions=partitions)
    try:
        ui.start()
        yield ui
    finally:
        ui.stop()


@contextlib.contextmanager
def chromium(playwright: Playwright, profile_dir: Path) -> Iterator[BrowserContext]:
    """Debian's Chromium, headless, with a fresh profile."""
    context = playwright.chromium.launch_persistent_context(
        str(profile_dir),
        executable_path=CHROMIUM,
        args=CHROMIUM_ARGS,
        headless=True,
        viewport=VIEWPORT,  # type: ignore[arg-type]
    )
    context.set_default_timeout(30_000)
    try:
        yield context
    finally:
        context.close()


# -- the scripted model's part of an RLM query -------------------------------------------------

APIARIES = {"Gorse Hill": 12, "Heathermoor": 7, "Wenlock Edge": 5}
CUSTOM_CONTEXT = "\n".join(f"{name}: {hives} hives" for name, hives in APIARIES.items())
QUESTION = "How many hives do our apiaries hold in all?"
EXPECTED_ANSWER = f"{len(APIARIES)} apiaries, {sum(APIARIES.values())} hives in all"
# The root model's one reply: code that reads the context in the sandbox and ends the query.
ROOT_REPLY = """I will count the hives listed in the context.
```repl
rows = [line.split(": ") for line in context.splitlines() if line.strip()]
total = sum(int(count.split()[0]) for _, count in rows)
FINAL(f"{len(rows)} apiaries, {total} hives in all")
```"""


def scripted_model(request: dict[str, Any]) -> str:
    """Responder of the scripted server: the root model counts hives; sub-calls answer `ok`."""
    return ROOT_REPLY if request.get("model") == ROOT_MODEL else "ok"


def rlm_query_config() -> str:
    """Launchpad YAML of an RLM query over `CUSTOM_CONTEXT` for the sample org `brambleway`."""
    return (
        "ops:\n"
        "  run_rlm_query:\n"
        "    config:\n"
        "      org_id: brambleway\n"
        "      context_type: custom\n"
        f"      query: {json.dumps(QUESTION)}\n"
        f"      custom_context: {json.dumps(CUSTOM_CONTEXT)}\n"
        "      rlm:\n"
        "        max_iterations: 5\n"
        "        max_timeout: 120\n"
    )


# The ingestion jobs, each over its own partitions (knowledge bases, users).
INGEST_JOBS = ("ingest_knowledge_bases", "ingest_users")
# The partition materialized alone from its asset page, before the ingestion jobs run.
ONE_PARTITION_ASSET = "raw_documents"
ONE_PARTITION = "saltmarsh/operations"


# -- driving the pages ---------------------------------------------------------------------------

RUN_ID = re.compile(r"/runs/([0-9a-f-]{36})")
RUN_STATUS = re.compile(r"^(Success|Failure|Canceled)$")
RUN_TIMEOUT_MS = 180_000
BACKFILL_ID = re.compile(r"Created backfill ([a-z]{8})")
# A backfill's status tag once it has ended (COMPLETED_SUCCESS reads "Succeeded").
BACKFILL_STATUS = re.compile(r"^(Succeeded|Completed|Failed|Canceled)$")
BACKFILL_TIMEOUT_MS = 240_000
# For a page's data to load (`expect` waits 5 s by default; the UI shares two cores with runs).
LOAD_TIMEOUT_MS = 30_000
# The status filters of an asset's Partitions tab: their label, and their value in the URL.
PARTITION_STATUSES = {
    "Failed": "FAILED",
    "Materialized": "MATERIALIZED",
    "Materializing": "MATERIALIZING",
    "Missing": "MISSING",
}
# The counts of a partitioned asset's row in a list, in their order on screen.
PARTITION_COUNTS = ("materialized", "missing", "failed", "materializing")


def button(page: Page | Locator, text: str) -> Locator:
    """The button whose visible text is exactly `text` (icons carry their own labels)."""
    return page.get_by_role("button").filter(has_text=re.compile(f"^{re.escape(text)}$"))


def group_assets(page: Page, base_url: str, group: str) -> dict[str, str]:
    """Asset key -> group, as the list tab of `group`'s page shows them."""
    page.goto(f"{base_url}/locations/{LOCATION}/asset-groups/{group}/list")
    group_links = page.locator('a[href^="/asset-groups~group"]')
    group_links.first.wait_for()
    shown: dict[str, str] = {}
    for href in group_links.evaluate_all("links => links.map(a => a.getAttribute('href'))"):
        match = re.fullmatch(r'/asset-groups~group%3A"([^"]+)"/(.+)', href)
        if match:
            shown[match.group(2)] = match.group(1)
    return shown


def group_partition_counts(page: Page, base_url: str, group: str) -> dict[str, dict[str, int]]:
    """Asset key -> its partitions' counts (`partitions`, `materialized`, `missing`, `failed`,
    `materializing`), as the list tab of `group`'s page shows them (once they are loaded)."""
    page.goto(f"{base_url}/locations/{LOCATION}/asset-groups/{group}/list")
    group_links = page.locator('a[href^="/asset-groups~group"]')
    group_links.first.wait_for()
    counts: dict[str, dict[str, int]] = {}
    for link in group_links.all():
        match = re.fullmatch(
            r'/asset-groups~group%3A"[^"]+"/(.+)', link.get_attribute("href") or ""
        )
        if not match:
            continue
        # The row: the nearest ancestor with the partition count labels.
        row = link.locator("xpath=ancestor::*[.//*[@aria-label='partition_missing']][1]")
        total = row.get_by_text(re.compile(r"^[\d,]+ partitions?$"))
        expect(total).to_be_visible(timeout=LOAD_TIMEOUT_MS)
        partitions = int(total.inner_text().split()[0].replace(",", ""))
        labels = row.locator("span[data-state]").filter(
            has=page.locator('[aria-label^="partition_"]')
        )
        expect(labels).to_have_count(len(PARTITION_COUNTS), timeout=LOAD_TIMEOUT_MS)
        shown = {"partitions": partitions}
        for name, text in zip(PARTITION_COUNTS, labels.all_inner_texts(), strict=True):
            # A count equal to the number of partitions reads "All".
            shown[name] = partitions if text.strip() == "All" else int(text.replace(",", ""))
        counts[match.group(1)] = shown
    return counts


def open_global_lineage(page: Page, base_url: str) -> None:
    """The global asset graph alone (no side panel), with every group expanded."""
    page.goto(f"{base_url}/asset-groups")
    toolbar = page.get_by_role("button").filter(has_text=re.compile(r"^Materialize all"))
    toolbar.first.wait_for()

    def icon_button(icon: str) -> Locator:
        return page.get_by_role("button").filter(has=page.locator(f'[aria-label="{icon}"]'))

    # The side panel's toggle is the text-less one ("Hide navigation" has the same icon).
    icon_button("panel_show_right").filter(has_not_text=re.compile(r"\S")).first.click()
    icon_button("settings").last.click()  # the graph's settings, after the navigation's
    page.get_by_role("menuitem", name=re.compile("Expand all groups")).click()
    page.keyboard.press("Escape")


def open_launchpad(page: Page, base_url: str, job: str) -> None:
    """The launchpad of `job`, once its config editor is ready."""
    page.goto(f"{base_url}/locations/{LOCATION}/jobs/{job}/playground")
    button(page, "Launch Run").wait_for()
    page.locator(".CodeMirror").wait_for()


def editor_text(page: Page) -> str:
    """The launchpad's run config, whole (the editor draws only the lines in view)."""
    return str(page.evaluate("document.querySelector('.CodeMirror').CodeMirror.getValue()"))


def replace_config(page: Page, yaml_text: str) -> None:
    """Select everything in the config editor and paste `yaml_text` over it."""
    page.locator(".CodeMirror").click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(yaml_text)
    expect(page.get_by_text("No errors", exact=True)).to_be_visible()


def scaffold_all_defaults(page: Page) -> None:
    """Press "Scaffold all default config" and confirm; wait for the editor to change."""
    before = editor_text(page)
    button(page, "Scaffold all default config").click()
    page.get_by_role("dialog").get_by_role("button", name="Confirm", exact=True).click()
    page.wait_for_function(
        "before => document.querySelector('.CodeMirror').CodeMirror.getValue() !== before",
        arg=before,
    )


def launch_run(page: Page) -> str:
    """Press "Launch Run" in the launchpad; the new run's id (the UI opens its page)."""
    button(page, "Launch Run").click()
    page.wait_for_url(RUN_ID)
    match = RUN_ID.search(page.url)
    assert match is not None
    return match.group(1)


def follow_run_toast(page: Page) -> str:
    """Follow the "Launched run" toast to the run's page; the run's id."""
    expect(page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))).to_be_visible()
    page.get_by_role("link", name="View", exact=True).or_(
        page.get_by_role("button", name="View", exact=True)
    ).first.click()
    page.wait_for_url(RUN_ID)
    match = RUN_ID.search(page.url)
    assert match is not None
    return match.group(1)


def materialize_asset(page: Page, base_url: str, key: str) -> str:
    """Press "Materialize" on the asset's page and follow the toast to the run; its id."""
    page.goto(f"{base_url}/assets/{key}")
    button(page, "Materialize").click()
    return follow_run_toast(page)


def materialize_partition(page: Page, base_url: str, key: str, partition: str) -> str:
    """Press "Materialize…" on a partitioned asset's page, pick `partition` alone in the dialog,
    launch its run and follow the toast to it; the run's id."""
    page.goto(f"{base_url}/assets/{key}")
    button(page, "Materialize…").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Select a partition or create one").click()
    page.get_by_role("menuitem").filter(has_text=re.compile(f"^{re.escape(partition)}")).click()
    page.keyboard.press("Escape")  # closes the list of partitions, not the dialog
    expect(dialog.get_by_text("1 partition", exact=True)).to_be_visible(timeout=LOAD_TIMEOUT_MS)
    button(dialog, "Launch 1 run").click()
    return follow_run_toast(page)


@dataclass
class Backfill:
    """A backfill launched from the UI: its job, id, partitions selected and final status."""

    job: str
    id: str
    partitions: int
    status: str = ""


def launch_backfill_of_every_partition(page: Page, base_url: str, job: str) -> Backfill:
    """From the Partitions tab of a partitioned job: "Materialize…", "All", "Launch backfill";
    the backfill (its id, and the number of partitions the dialog selected)."""
    page.goto(f"{base_url}/locations/{LOCATION}/jobs/{job}/partitions")
    button(page, "Materialize…").click()
    dialog = page.get_by_role("dialog")
    button(dialog, "All").click()
    selected = dialog.get_by_text(re.compile(r"^\d+ partitions?$"))
    expect(button(dialog, "Launch backfill")).to_be_enabled(timeout=LOAD_TIMEOUT_MS)
    count = int(selected.inner_text().split()[0])
    button(dialog, "Launch backfill").click()
    toast = page.get_by_text(BACKFILL_ID)
    expect(toast).to_be_visible(timeout=LOAD_TIMEOUT_MS)
    match = BACKFILL_ID.search(toast.inner_text())
    assert match is not None
    expect(dialog).to_have_count(0)
    return Backfill(job=job, id=match.group(1), partitions=count)


def wait_for_backfill_end(
    page: Page, base_url: str, backfill_id: str, timeout_ms: int = BACKFILL_TIMEOUT_MS
) -> str:
    """Open a backfill's page and wait until it ends; its status as shown (Succeeded...)."""
    page.goto(f"{base_url}/runs/b/{backfill_id}")
    status = page.get_by_text("Status", exact=True).first.locator("xpath=following-sibling::*[1]")
    expect(status).to_have_text(BACKFILL_STATUS, timeout=timeout_ms)
    return status.inner_text().strip()


def partition_view(page: Page, base_url: str, key: str) -> dict[str, str]:
    """Partition key -> status ("Materialized", "Missing"...), as the asset's Partitions tab lists
    them with one status filter ticked at a time."""
    shown: dict[str, str] = {}
    for label, value in PARTITION_STATUSES.items():
        page.goto(f"{base_url}/assets/{key}?view=partitions&status={value}")
        page.get_by_text(re.compile(r"^[\d,]+ Partitions? Selected$")).wait_for()
        page.wait_for_load_state("networkidle")
        count = page.get_by_text(re.compile(rf"^{label} \(([\d,]+)\)$"))
        number = int(re.sub(r"\D", "", count.inner_text()))
        # The list on the left: one truncated title per partition of the ticked status (the
        # selected partition's heading has its title one level further down).
        listed = page.locator("[data-tooltip] > [title]")
        expect(listed).to_have_count(number, timeout=LOAD_TIMEOUT_MS)
        for partition in listed.evaluate_all("els => els.map(e => e.getAttribute('title'))"):
            shown[partition] = label
    return shown


def partition_detail(page: Page, base_url: str, key: str, partition: str) -> tuple[str, str]:
    """The status tag of `partition` on the asset's Partitions tab, with the partition selected,
    and the id of the run of its latest materialization ("" where the view shows none: a missing
    partition has no tag, and "None" as its run)."""
    page.goto(f"{base_url}/assets/{key}?view=partitions&partition={quote(partition, safe='')}")
    # The heading of the selected partition (its name in the list has no span around it).
    heading = page.locator(f'[data-tooltip="{partition}"]').filter(
        has=page.locator(f'span > [title="{partition}"]')
    )
    run = page.get_by_text("Run", exact=True).locator("xpath=..")  # the label and the run
    expect(run).to_have_text(re.compile(r"^Run\s*(None|[0-9a-f]{8})$"), timeout=LOAD_TIMEOUT_MS)
    page.wait_for_load_state("networkidle")
    expect(heading).to_be_visible(timeout=LOAD_TIMEOUT_MS)
    tag = heading.locator(".BaseTag")
    links = run.locator('a[href^="/runs/"]')
    match = RUN_ID.search(links.first.get_attribute("href") or "") if links.count() else None
    return (tag.inner_text().strip() if tag.count() else ""), (match.group(1) if match else "")


def wait_for_run_end(page: Page, timeout_ms: int = RUN_TIMEOUT_MS) -> str:
    """On a run's page: wait until the run ends; its status as shown (Success, Failure...)."""
    status = page.get_by_text(RUN_STATUS).first
    status.wait_for(timeout=timeout_ms)
    return status.inner_text().strip()


# -- the stories the tests and the screenshots share ---------------------------------------------


def one_partition_from_its_asset_page(
    page: Page, base_url: str, screenshot: Path | None = None
) -> tuple[str, str]:
    """Materialize `ONE_PARTITION` of `ONE_PARTITION_ASSET` from the asset's page; run id and
    final status. With `screenshot`, the asset's Partitions tab with that partition selected."""
    run_id = materialize_partition(page, base_url, ONE_PARTITION_ASSET, ONE_PARTITION)
    status = wait_for_run_end(page)
    if screenshot is not None and status == "Success":
        tag, _ = partition_detail(page, base_url, ONE_PARTITION_ASSET, ONE_PARTITION)
        if tag != "Materialized":
            raise RuntimeError(f"{ONE_PARTITION} of {ONE_PARTITION_ASSET} reads {tag!r}")
        metadata = page.get_by_text("summary", exact=True)  # the first entry of its metadata
        expect(metadata).to_be_visible(timeout=LOAD_TIMEOUT_MS)
        settle(page, page.get_by_text("Latest materialization", exact=True))
        page.screenshot(path=screenshot)
    return run_id, status


def ingest_every_partition_from_the_ui(page: Page, base_url: str) -> list[Backfill]:
    """A backfill of every partition of each ingestion job, launched from the job's Partitions
    tab (both launched, then both waited for); the backfills with their final status."""
    backfills = [launch_backfill_of_every_partition(page, base_url, job) for job in INGEST_JOBS]
    for backfill in backfills:
        backfill.status = wait_for_backfill_end(page, base_url, backfill.id)
    return backfills


def rlm_query_from_launchpad(
    page: Page, base_url: str, screenshot: Path | None = None
) -> tuple[str, str]:
    """Launch `rlm_query` over `CUSTOM_CONTEXT` from its launchpad; run id and final status."""
    open_launchpad(page, base_url, "rlm_query")
    replace_config(page, rlm_query_config())
    if screenshot is not None:
        expect(button(page, "Launch Run")).to_be_enabled()
        page.screenshot(path=screenshot)
    run_id = launch_run(page)
    return run_id, wait_for_run_end(page)


def settle(page: Page, locator: Locator, rounds: int = 50) -> None:
    """For a screenshot: wait until the data is loaded and `locator` stops moving (animations)."""
    page.wait_for_load_state("networkidle")
    last = None
    for _ in range(rounds):
        box = locator.bounding_box()
        if box is not None and box == last:
            return
        last = box
        page.wait_for_timeout(200)


def take_screenshots(out_dir: Path) -> list[Path]:
    """Run the whole story on a scratch instance and save the README's screenshots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    partitions = out_dir / "partitions.png"
    launchpad = out_dir / "rlm-query-launchpad.png"
    session = out_dir / "rlm-session-answer.png"
    graph = out_dir / "asset-graph.png"
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="memcity-ui-")))
        llm = stack.enter_context(ScriptedLLMServer(scripted_model))
        ui = stack.enter_context(running_ui(tmp / "home", llm.base_url))
        browser = stack.enter_context(chromium(stack.enter_context(sync_playwright()), tmp / "p"))
        page = browser.new_page()
        run_id, status = one_partition_from_its_asset_page(page, ui.base_url, screenshot=partitions)
        if status != "Success":
            raise RuntimeError(f"the {ONE_PARTITION} run {run_id} ended with {status}")
        for backfill in ingest_every_partition_from_the_ui(page, ui.base_url):
            if backfill.status != "Succeeded":
                raise RuntimeError(f"the {backfill.job} backfill {backfill.id}: {backfill.status}")
        run_id, status = rlm_query_from_launchpad(page, ui.base_url, screenshot=launchpad)
        if status != "Success":
            raise RuntimeError(f"the rlm_query run {run_id} ended with {status}")
        materialize_asset(page, ui.base_url, "rlm_session_report")
        if (status := wait_for_run_end(page)) != "Success":
            raise RuntimeError(f"the rlm_session_report run ended with {status}")
        page.goto(f"{ui.base_url}/assets/rlm_sessions")
        answer = page.get_by_text(EXPECTED_ANSWER)
        expect(answer).to_be_visible()
        # The metadata table at the top of the view, down to the answer.
        page.get_by_text("Metadata", exact=True).evaluate("e => e.scrollIntoView({block: 'start'})")
        page.screenshot(path=session)
        page.set_viewport_size({"width": VIEWPORT["width"], "height": 1000})  # room for labels
        open_global_lineage(page, ui.base_url)
        expect(page.get_by_role("menuitem")).to_have_count(0)
        settle(page, page.get_by_text("memory_index", exact=True))
        page.screenshot(path=graph)
    return [graph, partitions, launchpad, session]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--screenshots",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for the PNG files (the README's are in docs/images)",
    )
    args = parser.parse_args(argv)
    for path in take_screenshots(args.screenshots):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
