"""Start the Dagster UI (`dagster dev`) on a scratch instance and drive it in Chromium.

Used by `tests/ui/test_ui.py` and by `python -m tests.ui.driver --screenshots docs/images`
(`make screenshots`), which refreshes the README's screenshots with the same steps.

The UI runs from this virtualenv's `dagster dev -w workspace.yaml` in its own process group, with
its own `MEMCITY_HOME` and `DAGSTER_HOME`, the sample corpus in the landing folder and every LLM
call sent to a scripted OpenAI-compatible server of the calling process. The browser is Debian's
`/usr/bin/chromium`, driven by Playwright (no browser download).
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

from playwright.sync_api import (
    BrowserContext,
    Locator,
    Page,
    Playwright,
    expect,
    sync_playwright,
)

from memcity_pipeline.cli.runner import EMBEDDED_DAGSTER_YAML, copy_sample_corpus
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


def prepare_home(home: Path) -> None:
    """An embedded Dagster instance and the sample corpus in the landing folder."""
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text(EMBEDDED_DAGSTER_YAML)
    copy_sample_corpus(home / "landing")


@dataclass
class DagsterUI:
    """`dagster dev -w workspace.yaml` on a free port, in its own process group."""

    home: Path
    env: dict[str, str]
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
    prepare_home(home)
    ui = DagsterUI(home=home, env=ui_environment(home, llm_base_url))
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


# ``execution`` of the `ingest` job in one process: its default, one process per step, takes
# minutes on two cores for the few files of the sample corpus.
INGEST_IN_PROCESS = "execution:\n  config:\n    in_process: {}\n"


# -- driving the pages ---------------------------------------------------------------------------

RUN_ID = re.compile(r"/runs/([0-9a-f-]{36})")
RUN_STATUS = re.compile(r"^(Success|Failure|Canceled)$")
RUN_TIMEOUT_MS = 180_000


def button(page: Page, text: str) -> Locator:
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


def materialize_asset(page: Page, base_url: str, key: str) -> str:
    """Press "Materialize" on the asset's page and follow the toast to the run; its id."""
    page.goto(f"{base_url}/assets/{key}")
    button(page, "Materialize").click()
    expect(page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))).to_be_visible()
    page.get_by_role("link", name="View", exact=True).or_(
        page.get_by_role("button", name="View", exact=True)
    ).first.click()
    page.wait_for_url(RUN_ID)
    match = RUN_ID.search(page.url)
    assert match is not None
    return match.group(1)


def wait_for_run_end(page: Page, timeout_ms: int = RUN_TIMEOUT_MS) -> str:
    """On a run's page: wait until the run ends; its status as shown (Success, Failure...)."""
    status = page.get_by_text(RUN_STATUS).first
    status.wait_for(timeout=timeout_ms)
    return status.inner_text().strip()


# -- the stories the tests and the screenshots share ---------------------------------------------


def ingest_from_launchpad(page: Page, base_url: str) -> tuple[str, str]:
    """Launch the `ingest` job from its launchpad (in one process); run id and final status."""
    open_launchpad(page, base_url, "ingest")
    replace_config(page, INGEST_IN_PROCESS)
    run_id = launch_run(page)
    return run_id, wait_for_run_end(page)


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
    launchpad = out_dir / "rlm-query-launchpad.png"
    session = out_dir / "rlm-session-answer.png"
    graph = out_dir / "asset-graph.png"
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="memcity-ui-")))
        llm = stack.enter_context(ScriptedLLMServer(scripted_model))
        ui = stack.enter_context(running_ui(tmp / "home", llm.base_url))
        browser = stack.enter_context(chromium(stack.enter_context(sync_playwright()), tmp / "p"))
        page = browser.new_page()
        for name, (run_id, status) in [
            ("ingest", ingest_from_launchpad(page, ui.base_url)),
            ("rlm_query", rlm_query_from_launchpad(page, ui.base_url, screenshot=launchpad)),
        ]:
            if status != "Success":
                raise RuntimeError(f"the {name} run {run_id} ended with {status}")
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
    return [graph, launchpad, session]


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
