"""A session ends cleanly whatever its code left running, and so does the process around it.

Closing a session stops serving its calls and waits for the tool calls still running (they
run native code: ONNX Runtime, numpy, bm25s), which run on normal threads so that the
interpreter never finalizes under them. The end-to-end check runs real `memcity query`
processes, many times, over a knowledge base ingested by `memcity ingest` (the local
all-MiniLM-L6-v2 on ONNX Runtime), with a scripted LLM whose code leaves searches running in
threads (Python) or as unawaited promises (JavaScript) and answers at once: every process must
exit 0 (before, most ended by SIGSEGV or SIGABRT after printing the answer).
"""

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from memcity_pipeline.sandbox.local import LocalSandboxBackend
from tests.fixtures_sandbox import BWRAP, RecordingLLM
from tests.rlm.test_rlm_js import INTERPRETERS
from tests.scripted_llm_server import ScriptedLLMServer

REPO = Path(__file__).resolve().parents[2]
MEMCITY = str(Path(sys.executable).with_name("memcity"))
RUNS = 4  # per runtime: the crash came at most exits, not all

pytestmark = [
    pytest.mark.skipif(not Path(BWRAP).exists(), reason="bubblewrap is not installed"),
    pytest.mark.bwrap,
]


class GatedTool:
    """A tool handler whose calls block until `release()`; records each call's thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.running = 0
        self.started = 0
        self.finished = 0
        self.daemon_threads = 0
        self.released = False

    def __call__(self, tool: str, args: Any) -> list[str]:
        with self.cond:
            self.started += 1
            self.running += 1
            self.daemon_threads += threading.current_thread().daemon
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.released)
            self.running -= 1
            self.finished += 1
        return ["hit"]

    def wait_running(self, count: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.running >= count)

    def release(self) -> None:
        with self.cond:
            self.released = True
            self.cond.notify_all()


def test_close_drops_queued_calls_and_waits_for_the_running_ones(
    sandbox_backend_factory: Callable[..., LocalSandboxBackend], recording_llm: RecordingLLM
) -> None:
    backend = sandbox_backend_factory(max_llm_concurrency=2)
    tool = GatedTool()
    session = backend.open_session("org_a", recording_llm, tool_handler=tool)
    try:
        # six searches left behind: two run on the host (the concurrency), the others wait
        result = session.execute(
            "import threading, time\n"
            "for _ in range(6):\n"
            "    threading.Thread(target=search, args=('pump',), daemon=True).start()\n"
            "while len(search.__self__.pending) < 6:\n"
            "    time.sleep(0.01)"
        )
        assert result.error is None, result
        tool.wait_running(2)
        closing = threading.Thread(target=session.close)
        closing.start()
        while not session.client.closing:
            time.sleep(0.01)
        assert closing.is_alive()  # close waits for the two running calls...
    finally:
        tool.release()
    closing.join()
    # ...and when it returns nothing runs any more; the queued calls never started
    assert (tool.running, tool.started, tool.finished) == (0, 2, 2)
    assert tool.daemon_threads == 0  # tool calls never run on daemon threads
    assert not session.alive and session.process.poll() is not None


# -- real `memcity query` processes ---------------------------------------------------------------

LEAVE_THREADS = (
    "import threading\n"
    "def keep_searching():\n"
    "    while True:\n"
    "        try:\n"
    "            search('lighthouse pump pressure', k=10)\n"
    "        except Exception:\n"
    "            pass\n"
    "for _ in range(8):\n"
    "    threading.Thread(target=keep_searching, daemon=True).start()\n"
    "FINAL('done')"
)
LEAVE_PROMISES = (
    "for (let i = 0; i < 40; i++) search('lighthouse pump pressure ' + i, 10).catch(() => {})\n"
    "FINAL('done')"
)


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any deployment's settings or secrets, plus `extra`."""
    prefixes = ("MEMCITY_", "DAYTONA_", "OPENROUTER_", "AWS_", "OTEL_", "DAGSTER_HOME")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    return {**env, "PYTHONPATH": str(REPO), "MEMCITY_ENRICHMENT": "off", **extra}


@pytest.fixture(scope="module")
def ingested_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MEMCITY_HOME with knowledge base acme/manual ingested by `memcity ingest` (local
    embeddings on ONNX Runtime)."""
    home = tmp_path_factory.mktemp("shutdown") / "memcity"
    folder = home / "landing" / "orgs" / "acme" / "knowledge_bases" / "manual"
    folder.mkdir(parents=True)
    words = ["pump", "filter", "valve", "pressure", "harbour", "lighthouse", "ferry", "tide"]
    for d in range(4):
        paragraphs = [
            " ".join(words[(d + p + i) % len(words)] for i in range(80)) + "." for p in range(12)
        ]
        (folder / f"part{d}.md").write_text(f"# Part {d}\n\n" + "\n\n".join(paragraphs) + "\n")
    done = subprocess.run(
        [MEMCITY, "ingest", "--kb", "acme/manual"],
        env=_clean_env(MEMCITY_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=home,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return home


@pytest.mark.slow
@pytest.mark.parametrize(
    ("runtime", "code"), [("python", LEAVE_THREADS), ("bun", LEAVE_PROMISES)], ids=["python", "bun"]
)
def test_memcity_query_exits_0_every_time_its_code_leaves_searches_running(
    runtime: str, code: str, ingested_home: Path, scripted_llm: ScriptedLLMServer
) -> None:
    if runtime == "bun" and INTERPRETERS["bun"] is None:
        pytest.skip("no bun here")
    scripted_llm.responder = lambda request: f"Searching.\n```repl\n{code}\n```"
    env = _clean_env(
        MEMCITY_HOME=str(ingested_home),
        MEMCITY_LLM_BASE_URL=scripted_llm.base_url,
        MEMCITY_LLM_MODEL="root-model",
    )
    argv = [MEMCITY, "query", "--org", "acme", "--kb", "manual", "--json"]
    argv += ["--runtime", runtime, "--no-runtime-fallback-to-python", "What is there?"]
    outcomes = []
    for _ in range(RUNS):
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=300, cwd=ingested_home
        )
        result = json.loads(done.stdout[done.stdout.index("{") :]) if "{" in done.stdout else {}
        outcomes.append((done.returncode, result.get("status"), result.get("search_calls")))
        assert done.returncode == 0, (outcomes, done.stderr[-3000:])
    # each answered at once while its searches were still being served
    assert all(status == "completed" and searches for _, status, searches in outcomes), outcomes
