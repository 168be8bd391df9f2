"""Whatever sandboxed code sends, the host's memory stays bounded and the session says why.

The code is hostile here: it finds the REPL server's channel (Python: the file descriptor of
`search.__self__.channel`; JavaScript: the scaffold's calls, fired without awaiting) and writes
requests as fast as it can, lines longer than the protocol allows, forged results, floods of
stderr. Each flood runs in a child process that opens a real local sandbox (bwrap) and reports
its own peak RSS (`ru_maxrss`) before and after, so the test measures the host side alone.
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

from memcity_pipeline.sandbox.base import (
    MAX_FINAL_CHARS,
    MAX_LINE_BYTES,
    MAX_PENDING_CALLS,
    SandboxError,
)
from memcity_pipeline.sandbox.local import LocalSandboxBackend
from tests.fixtures_sandbox import BWRAP, RecordingLLM
from tests.rlm.test_rlm_js import INTERPRETERS

REPO = Path(__file__).resolve().parents[2]
HOST_GROWTH_BOUND_MB = 128
"""What a flood may add to the host's peak RSS: the host keeps at most a 16 MiB inbox, one
16 MiB line being read, 32 MiB of pending requests and their answers; before these bounds a
few seconds of the same floods added 0.9 to 4.6 GB."""

pytestmark = [
    pytest.mark.skipif(not Path(BWRAP).exists(), reason="bubblewrap is not installed"),
    pytest.mark.bwrap,
]

# The child: one session, one flood, its own peak RSS before and after, as JSON on stdout.
FLOOD_CHILD = """
import json, resource, sys, time
from pathlib import Path
from memcity_pipeline.sandbox.base import SandboxError
from memcity_pipeline.sandbox.local import LocalSandboxBackend

root, runtime, bun, code = sys.argv[1], sys.argv[2], sys.argv[3] or None, sys.argv[4]


def tool(name, args):
    time.sleep(0.005)
    return [{"text": "a hit"}]


def llm(prompts, model):
    time.sleep(0.005)
    return ["an answer" for _ in prompts]


backend = LocalSandboxBackend(
    Path(root), exec_timeout_s=6.0, kill_grace_s=1.0, memory_mb=2048, cpu_seconds=120,
    js_interpreter=bun,
)
session = backend.open_session("org_a", llm, tool_handler=tool, runtime=runtime)
session.execute("print(1)" if runtime == "python" else "console.log(1)")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcome = {}
try:
    result = session.execute(code)
    outcome = {"error": result.error, "timed_out": result.timed_out,
               "stdout": len(result.stdout), "stderr": len(result.stderr)}
except SandboxError as exc:
    outcome = {"raised": str(exc)}
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
refused = getattr(session.client, "calls_refused", None)  # None: code without the bounds
session.close()
backend.close()
print("FLOOD " + json.dumps({"before_kb": before, "after_kb": after, "refused": refused,
                             **outcome}), flush=True)
"""

CHANNEL = "import os, json\nfd = search.__self__.channel.fd\n"
REQUESTS_FLOOD = CHANNEL + (
    "tool = {'type': 'tool_request', 'id': 't', 'exec_id': 0, 'tool': 'search',\n"
    "        'args': {'query': 'q' * 2000, 'k': 10}}\n"
    "llm = {'type': 'llm_request', 'id': 'l', 'exec_id': 0, 'prompts': ['p' * 2000] * 20}\n"
    "block = ((json.dumps(tool) + '\\n' + json.dumps(llm) + '\\n') * 200).encode()\n"
    "while True:\n"
    "    os.write(fd, block)\n"
)
LONG_LINE = CHANNEL + (
    'os.write(fd, b\'{"type": "result", "stdout": "\')\n'
    "block = b'x' * (1 << 20)\n"
    "for _ in range(400):\n"
    "    os.write(fd, block)\n"
)
STDERR_FLOOD = (
    "import os\n"
    "block = b'y' * (1 << 20)\n"
    "for _ in range(400):\n"
    "    os.write(2, block)\n"  # fd 2, no newline: the host's stderr reader sees one line
    "for i in range(10 ** 6):\n"
    "    print('z' * 100)\n"
)
JS_FLOOD = (  # unawaited calls, and one awaited so that the server reads its answers
    "const big = 'q'.repeat(2000)\n"
    "for (;;) {\n"
    "  for (let i = 0; i < 300; i++) search(big, 10).catch(() => {})\n"
    "  llm_query_batched(Array(20).fill(big)).catch(() => {})\n"
    "  await search('x', 1).catch(() => {})\n"
    "}\n"
)


def flood(memcity_home: Path, runtime: str, code: str, bun: str | None = None) -> dict[str, Any]:
    """Run one flood in a child process; its report (sizes in KB)."""
    root = str(memcity_home / "sandboxes")
    done = subprocess.run(
        [sys.executable, "-c", FLOOD_CHILD, root, runtime, bun or "", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("FLOOD ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[0].removeprefix("FLOOD "))
    report["growth_mb"] = (report["after_kb"] - report["before_kb"]) / 1024
    return report


@pytest.mark.parametrize(
    ("code", "check"),
    [
        pytest.param(
            REQUESTS_FLOOD,
            lambda r: (r["refused"] or 0) > 0,  # the requests reached the host, were refused
            id="requests-written-to-the-channel",
        ),
        pytest.param(
            LONG_LINE,
            lambda r: f"a line over {MAX_LINE_BYTES:,} bytes" in r["raised"],
            id="a-400-MiB-line",
        ),
        pytest.param(
            STDERR_FLOOD,
            lambda r: 0 < r["stdout"] <= 100_200,  # the prints, cut in the sandbox
            id="stderr-and-stdout",
        ),
    ],
)
def test_a_python_flood_keeps_the_host_s_memory_bounded(
    memcity_home: Path, code: str, check: Callable[[dict[str, Any]], bool]
) -> None:
    report = flood(memcity_home, "python", code)
    assert check(report), report
    assert report["growth_mb"] < HOST_GROWTH_BOUND_MB, report


def test_a_javascript_flood_of_unawaited_calls_is_refused_and_keeps_the_host_s_memory_bounded(
    memcity_home: Path,
) -> None:
    # JavaScript runtimes buffer their own output: a flood that never yields ends in the
    # sandbox's memory limit before it reaches the host in bulk. One that lets the server read
    # its answers goes on, and the host must refuse what is past its bound.
    if INTERPRETERS["bun"] is None:
        pytest.skip("no bun here")
    report = flood(memcity_home, "bun", JS_FLOOD, INTERPRETERS["bun"])
    assert report["refused"] and report["refused"] > 0, report
    assert report["growth_mb"] < HOST_GROWTH_BOUND_MB, report


# -- what honest code sees of the bounds --------------------------------------------------------


def test_calls_past_the_bound_are_refused_in_the_code_and_the_session_goes_on(
    sandbox_backend: LocalSandboxBackend,
) -> None:
    slow = RecordingLLM(delay_s=0.05)
    with sandbox_backend.open_session(
        "org_a", slow, tool_handler=lambda tool, args: ["hit"]
    ) as session:
        batch = session.execute(
            f"try:\n    llm_query_batched(['p'] * {MAX_PENDING_CALLS + 1})\n"
            "except RuntimeError as exc:\n    print(exc)"
        )
        assert f"a batch of {MAX_PENDING_CALLS + 1} prompts is over the limit" in batch.stdout
        assert slow.calls == []  # refused before any prompt was asked
        assert session.execute("print(llm_query_batched(['a', 'b']))").stdout == (
            "['echo:a', 'echo:b']\n"
        )


def test_a_javascript_burst_past_the_bound_gets_refusals_not_a_dead_session(
    sandbox_backend_factory: Callable[..., LocalSandboxBackend],
) -> None:
    if INTERPRETERS["bun"] is None:
        pytest.skip("no bun here")
    backend = sandbox_backend_factory(js_interpreter=INTERPRETERS["bun"])
    refused = threading.Event()  # searches wait until the host has refused one

    def tool(name: str, args: Any) -> list[str]:
        refused.wait()
        return ["hit"]

    session = backend.open_session("org_a", RecordingLLM(), tool_handler=tool, runtime="bun")

    def release_after_a_refusal() -> None:
        while not session.client.calls_refused:
            time.sleep(0.01)
        refused.set()

    threading.Thread(target=release_after_a_refusal, daemon=True).start()
    with session:
        burst = session.execute(
            "const outcomes = await Promise.allSettled(\n"
            "  Array.from({ length: 2000 }, (_, i) => search('q' + i, 1)))\n"
            "const refused = outcomes.filter(o => o.status === 'rejected')\n"
            "console.log(outcomes.length - refused.length, refused.length > 0)\n"
            "console.log(refused[0].reason.message)"
        )
        assert burst.error is None, burst
        served, message = burst.stdout.splitlines()
        assert int(served.split()[0]) >= MAX_PENDING_CALLS and served.endswith(" true")
        assert message.startswith("search failed: too many calls are waiting for the host")
        assert session.execute("console.log((await search('again', 1)).length)").stdout == "1\n"


def test_outputs_and_the_final_answer_are_cut_on_the_host_whatever_the_server_sends(
    sandbox_backend: LocalSandboxBackend, recording_llm: RecordingLLM
) -> None:
    with sandbox_backend.open_session("org_a", recording_llm) as session:
        forged = session.execute(
            CHANNEL + "server = search.__self__\n"
            "result = {'type': 'result', 'id': server.current_exec, 'stdout': 'o' * 3_000_000,\n"
            "          'stderr': 'e' * 3_000_000, 'error': 'x' * 3_000_000, 'timed_out': False,\n"
            "          'final': {'value': 'v' * 5_000_000}, 'duration_s': 0}\n"
            "os.write(fd, (json.dumps(result) + '\\n').encode())\n"
            "import time\ntime.sleep(1)"
        )
        limit = sandbox_backend.max_output_chars
        for text in (forged.stdout, forged.stderr, forged.error or ""):
            assert len(text) < limit + 100 and "more characters truncated" in text
        assert forged.final is not None
        assert len(forged.final["value"]) < MAX_FINAL_CHARS + 100
        # an honest final answer is cut by the server itself, with the same note
        honest = session.execute("__final__ = {'value': 'w' * 2_000_000}")
        assert honest.final is not None
        assert honest.final["value"].startswith("w" * MAX_FINAL_CHARS + "\n[... 1000000 more")


def test_a_request_over_the_line_limit_is_refused_in_the_sandbox(
    sandbox_backend: LocalSandboxBackend, recording_llm: RecordingLLM
) -> None:
    with sandbox_backend.open_session("org_a", recording_llm) as session:
        result = session.execute(
            "try:\n    llm_query('p' * (17 << 20))\nexcept RuntimeError as exc:\n    print(exc)"
        )
        assert result.stdout.startswith("llm_query failed: the request is 17.0 MiB; at most 16")
        assert recording_llm.calls == []
        assert session.execute("print(llm_query('small'))").stdout == "echo:small\n"


def test_the_servers_refuse_what_the_host_would_not_read() -> None:
    """The standalone servers cannot import the host's limits: they repeat them."""
    python = (REPO / "memcity_pipeline/sandbox/servers/repl_server.py").read_text()
    js = (REPO / "memcity_pipeline/sandbox/servers/repl_server.js").read_text()
    assert "MAX_LINE_BYTES = 16 << 20" in python and MAX_LINE_BYTES == 16 << 20
    assert "const MAX_LINE_BYTES = 16 * 1024 * 1024;" in js
    assert f"MAX_FINAL_CHARS = {MAX_FINAL_CHARS:_}" in python
    assert f"const MAX_FINAL_CHARS = {MAX_FINAL_CHARS};" in js


def test_a_session_that_went_over_a_bound_says_so_and_the_next_one_works(
    sandbox_backend: LocalSandboxBackend, recording_llm: RecordingLLM
) -> None:
    session = sandbox_backend.open_session("org_a", recording_llm)
    with pytest.raises(SandboxError, match="sent a line over 16,777,216 bytes"):
        session.execute(LONG_LINE)
    with pytest.raises(SandboxError, match="line over"):
        session.execute("print(1)")
    session.close()
    with sandbox_backend.open_session("org_a", recording_llm) as fresh:
        assert fresh.execute("print('fine')").stdout == "fine\n"
