"""The local sandbox: a persistent REPL in an isolated process, and hostile code kept inside it."""

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memcity_pipeline.resources.sandbox import DaytonaSandboxResource, LocalSandboxResource
from memcity_pipeline.sandbox.base import SandboxError, ToolError
from memcity_pipeline.sandbox.local import LocalSandboxBackend, _tasks_of_uid
from memcity_pipeline.settings import SettingsError, build_resources, get_settings
from tests.fixtures_sandbox import BROKEN_BWRAP, RecordingLLM

REPO = Path(__file__).resolve().parents[2]
SECRET = "sk-or-v1-test-secret-must-not-leak-0123456789"
PRELUDE = (
    "def FINAL(value):\n"
    "    global __final__\n"
    "    __final__ = {'kind': 'value', 'value': str(value)}\n"
    "def FINAL_VAR(name):\n"
    "    global __final__\n"
    "    __final__ = {'kind': 'var', 'name': name, 'value': str(globals()[name])}\n"
)


def chunks(n: int = 5000, size: int = 1000) -> list[dict]:
    """n chunks of about `size` characters each."""
    body = "lorem ipsum dolor sit amet " * (size // 27 + 1)
    return [{"chunk_id": f"c{i}", "text": f"{i}: " + body[:size]} for i in range(n)]


@pytest.fixture
def session(sandbox_backend: LocalSandboxBackend, recording_llm: RecordingLLM) -> Iterator:
    with sandbox_backend.open_session("org_a", recording_llm, prelude=PRELUDE) as s:
        yield s


# -- the REPL ----------------------------------------------------------------------------------


@pytest.mark.bwrap
def test_state_persists_and_output_is_captured_per_execution(session) -> None:
    first = session.execute("x = 40\nprint('one')\nimport sys\nprint('warn', file=sys.stderr)")
    second = session.execute("x += 2\nprint('two', x)")
    assert (first.stdout, first.stderr, first.error) == ("one\n", "warn\n", None)
    assert (second.stdout, second.stderr) == ("two 42\n", "")
    assert session.get_variable("x") == "42"
    assert "'x': 'int'" in session.execute("print(SHOW_VARS())").stdout
    assert "FINAL" not in session.execute("print(SHOW_VARS())").stdout
    with pytest.raises(KeyError):
        session.get_variable("nope")


@pytest.mark.bwrap
def test_an_error_keeps_the_session(session) -> None:
    session.execute("total = 7")
    failed = session.execute("def f():\n    return 1 / 0\nf()")
    assert "ZeroDivisionError" in failed.error and "<cell-" in failed.error
    assert "repl_server" not in failed.error
    syntax = session.execute("def broken(:")
    assert "SyntaxError" in syntax.error
    assert session.execute("print(total)").stdout == "7\n"


@pytest.mark.bwrap
def test_final_hook_reports_once(session) -> None:
    session.execute("answer = 'brambleway'")
    result = session.execute("FINAL_VAR('answer')")
    assert result.final == {"kind": "var", "name": "answer", "value": "brambleway"}
    assert session.execute("print(1)").final is None


@pytest.mark.bwrap
def test_huge_output_is_truncated_with_a_note(session) -> None:
    result = session.execute("print('y' * 1_000_000)")
    assert len(result.stdout) < 200_000
    assert "more characters truncated" in result.stdout


@pytest.mark.bwrap
def test_llm_query_calls_back_to_the_host(session, recording_llm: RecordingLLM) -> None:
    result = session.execute(
        "a = llm_query('summarise', model='sub')\nb = llm_query_batched(['p1', 'p2'])\nprint(a, b)"
    )
    assert result.stdout == "echo:summarise ['echo:p1', 'echo:p2']\n"
    assert (["summarise"], "sub") in recording_llm.calls
    assert session.llm_prompts_served == 3


@pytest.mark.bwrap
def test_llm_query_batched_runs_concurrently_with_a_bound(
    sandbox_backend_factory: Callable[..., LocalSandboxBackend],
) -> None:
    llm = RecordingLLM(delay_s=0.3)
    backend = sandbox_backend_factory(max_llm_concurrency=3)
    with backend.open_session("org_a", llm) as s:
        result = s.execute("out = llm_query_batched([f'q{i}' for i in range(9)])\nprint(len(out))")
    assert result.stdout == "9\n"
    assert llm.max_in_flight == 3  # overlapping calls, never more than the bound


@pytest.mark.bwrap
def test_llm_handler_failure_is_an_error_in_the_code(
    sandbox_backend: LocalSandboxBackend,
) -> None:
    llm = RecordingLLM(fail_on="bad")
    with sandbox_backend.open_session("org_a", llm) as s:
        result = s.execute("llm_query('bad prompt')")
        assert "RuntimeError: llm_query failed" in result.error and "refused" in result.error
        assert s.execute("print(llm_query('good'))").stdout == "echo:good\n"


class Tools:
    """A host tool handler: `search` echoes its arguments; some queries fail on purpose."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def __call__(self, tool: str, args: Any) -> Any:
        self.calls.append((tool, args))
        query = args.get("query") if isinstance(args, dict) else None
        if query == "refuse":
            raise ToolError("query refused: say why")
        if query == "crash":
            raise KeyError(f"{SECRET} in a host path")
        if query == "odd":
            return {"not": {1, 2}}  # cannot travel as JSON
        return [{"query": query, "k": args.get("k")}]


@pytest.mark.bwrap
def test_search_is_answered_by_the_host_and_its_failures_are_errors_in_the_code(
    sandbox_backend: LocalSandboxBackend, recording_llm: RecordingLLM
) -> None:
    tools = Tools()
    with sandbox_backend.open_session("org_a", recording_llm, tool_handler=tools) as s:
        result = s.execute(
            "print(search('tides', 3), search('moon'))\n"
            "for q in ['refuse', 'crash', 'odd']:\n"
            "    try:\n"
            "        search(q)\n"
            "    except RuntimeError as exc:\n"
            "        print(exc)\n"
            "print('search' in SHOW_VARS())"
        )
        assert result.error is None, result.error
        assert result.stdout.splitlines() == [
            "[{'query': 'tides', 'k': 3}] [{'query': 'moon', 'k': 10}]",
            "search failed: query refused: say why",
            "search failed: an error on the host (KeyError)",  # never the host's own text
            "search failed: an error on the host (TypeError)",
            "False",
        ]
        assert s.tool_calls_served == 5 and s.alive
        assert tools.calls[0] == ("search", {"query": "tides", "k": 3})
    with sandbox_backend.open_session("org_a", recording_llm) as s:  # no tool handler
        failed = s.execute("search('tides')")
        assert "RuntimeError: search failed: not available in this sandbox session" in failed.error


@pytest.mark.bwrap
def test_context_of_5000_chunks_loads_once(session) -> None:
    context = chunks()
    session.load_context(context)
    assert session.context_info["length"] == 5000
    assert session.context_info["chars"] > 5_000_000
    assert not any(session.workdir.iterdir())  # the transfer file is gone: it lives in memory
    first = session.execute("print(len(context), context[4999]['chunk_id'])")
    second = session.execute("print(sum(len(c['text']) for c in context) > 5_000_000)")
    assert (first.stdout, second.stdout) == ("5000 c4999\n", "True\n")


@pytest.mark.bwrap
def test_text_context(session) -> None:
    session.load_context("line one\nline two")
    assert session.execute("print(context.splitlines()[1])").stdout == "line two\n"


# -- timeouts and dying processes ---------------------------------------------------------------


@pytest.mark.bwrap
def test_a_runaway_loop_is_interrupted_and_the_session_lives(session) -> None:
    session.execute("kept = 'yes'")
    result = session.execute("while True:\n    pass", timeout_s=1.0)
    assert result.timed_out and "TimeoutError" in result.error
    assert session.execute("print(kept)").stdout == "yes\n"


@pytest.mark.bwrap
def test_code_that_ignores_the_timeout_is_killed_and_the_host_goes_on(
    sandbox_backend: LocalSandboxBackend, recording_llm: RecordingLLM
) -> None:
    s = sandbox_backend.open_session("org_a", recording_llm)
    stubborn = "while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass"
    result = s.execute(stubborn, timeout_s=1.0)
    assert result.timed_out and "killed" in result.error
    assert s.process.poll() is not None
    with pytest.raises(SandboxError, match="closed"):
        s.execute("print(1)")
    s.close()
    assert not s.workdir.exists()
    with sandbox_backend.open_session("org_a", recording_llm) as fresh:
        assert fresh.execute("print('fine')").stdout == "fine\n"


@pytest.mark.bwrap
def test_cpu_time_limit_ends_the_session_with_a_clear_error(
    sandbox_backend_factory: Callable[..., LocalSandboxBackend], recording_llm: RecordingLLM
) -> None:
    backend = sandbox_backend_factory(cpu_seconds=1)
    with (
        backend.open_session("org_a", recording_llm) as s,
        pytest.raises(SandboxError, match="CPU time limit"),
    ):
        s.execute("while True:\n    pass", timeout_s=30)


@pytest.mark.bwrap
def test_a_crash_is_a_sandbox_error(session) -> None:
    with pytest.raises(SandboxError, match="SIGKILL"):
        session.execute("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")


# -- hostile code ------------------------------------------------------------------------------


@pytest.mark.bwrap
def test_no_secret_reaches_the_sandbox(
    sandbox_backend: LocalSandboxBackend,
    recording_llm: RecordingLLM,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEMCITY_LLM_API_KEY", SECRET)
    monkeypatch.setenv("DAYTONA_API_KEY", SECRET)
    code = (
        "import os, glob\n"
        "print(dict(os.environ))\n"
        "paths = ['/proc/self/environ', '/proc/1/environ', '/proc/HOST_PID/environ']\n"
        "for path in paths + glob.glob('/proc/*/environ'):\n"
        "    try:\n"
        "        print(path, open(path, 'rb').read())\n"
        "    except OSError as e:\n"
        "        print(path, 'refused', type(e).__name__)\n"
    ).replace("HOST_PID", str(os.getpid()))
    with sandbox_backend.open_session("org_a", recording_llm) as s:
        result = s.execute(code)
        pids = s.execute(
            "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
        )
    assert result.error is None
    assert SECRET not in result.stdout and "MEMCITY" not in result.stdout
    assert f"/proc/{os.getpid()}/environ refused" in result.stdout  # the host pid is not there
    assert max(eval(pids.stdout)) < 50  # its own PID namespace: no host process is visible


@pytest.mark.bwrap
def test_host_files_are_invisible(session, memcity_home: Path, tmp_path: Path) -> None:
    lake = memcity_home / "lake"
    lake.mkdir()
    (lake / "chunks.parquet").write_text("lake data")
    targets = [
        str(lake / "chunks.parquet"),
        str(REPO / "pyproject.toml"),
        str(REPO / ".env.example"),
        "/etc/passwd",
        "/etc/hostname",
        str(Path.home() / ".bashrc"),
        str(tmp_path),
    ]
    code = (
        "import os\n"
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        print(path, 'READ', os.listdir(path) if os.path.isdir(path) else open(path).read()[:20])\n"
        "    except OSError as e:\n"
        "        print(path, 'refused', type(e).__name__)\n"
    )
    result = session.execute(code)
    assert result.error is None
    assert "READ" not in result.stdout, result.stdout
    assert result.stdout.count("refused") == len(targets)
    written = session.execute("open('/usr/evil', 'w')")
    assert "OSError" in written.error or "PermissionError" in written.error


@pytest.mark.bwrap
def test_sessions_never_see_each_others_files(
    sandbox_backend: LocalSandboxBackend, recording_llm: RecordingLLM
) -> None:
    with (
        sandbox_backend.open_session("org_a", recording_llm) as a,
        sandbox_backend.open_session("org_b", recording_llm) as b,
    ):
        a.execute("open('notes.txt', 'w').write('org a private')")
        assert (a.workdir / "notes.txt").read_text() == "org a private"
        probes = [str(a.workdir / "notes.txt"), f"../{a.session_id}/notes.txt", "..", "/home"]
        result = b.execute(
            "import os\n"
            f"for path in {probes!r}:\n"
            "    try:\n"
            "        print(os.listdir(path) if os.path.isdir(path) else open(path).read())\n"
            "    except OSError as e:\n"
            "        print('refused', type(e).__name__)\n"
        )
        assert "org a private" not in result.stdout
        assert a.session_id not in result.stdout
        assert b.execute("print(os.listdir('.'))").stdout == "[]\n"


@pytest.mark.bwrap
def test_network_is_unreachable(session) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[object] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from the host
    code = (
        "import socket\n"
        f"for host, port in [('127.0.0.1', {port}), ('127.0.0.1', 5432), ('1.1.1.1', 53)]:\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=3).close()\n"
        "        print(host, port, 'CONNECTED')\n"
        "    except OSError as e:\n"
        "        print(host, port, 'refused', type(e).__name__)\n"
    )
    result = session.execute(code)
    listener.close()
    assert "CONNECTED" not in result.stdout
    assert result.stdout.count("refused") == 3
    assert len(accepted) == 1  # only the host's own probe got through


@pytest.mark.bwrap
def test_fork_bomb_is_bounded(
    sandbox_backend_factory: Callable[..., LocalSandboxBackend], recording_llm: RecordingLLM
) -> None:
    backend = sandbox_backend_factory(max_processes=12)
    s = backend.open_session("org_a", recording_llm)
    code = (
        "import os, time\n"
        "children, err = 0, None\n"
        "for _ in range(500):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as e:\n"
        "        err = e\n"
        "        break\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            os.fork()\n"
        "        except OSError:\n"
        "            pass\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    children += 1\n"
        "print(children, type(err).__name__)\n"
    )
    result = s.execute(code, timeout_s=20)
    children, error = result.stdout.split()
    assert int(children) < 12 and error == "BlockingIOError"
    assert s.execute("print('still here')").stdout == "still here\n"
    s.close()
    if s.uid is not None:  # root hosts: every process of the session uid is gone
        assert _tasks_of_uid(s.uid) == 0


@pytest.mark.bwrap
def test_memory_is_bounded(
    sandbox_backend_factory: Callable[..., LocalSandboxBackend], recording_llm: RecordingLLM
) -> None:
    backend = sandbox_backend_factory(memory_mb=512)
    with backend.open_session("org_a", recording_llm) as s:
        result = s.execute("hog = bytearray(8 * 1024 ** 3)")
        assert "MemoryError" in result.error
        assert s.execute("small = bytearray(10 * 1024 ** 2)\nprint(len(small))").stdout
        assert s.execute("print('ok')").stdout == "ok\n"


# -- without bwrap: fail closed, or the explicit opt-out ---------------------------------------


@pytest.mark.parametrize(
    ("bwrap", "reason"),
    [(BROKEN_BWRAP, "a trial run of /bin/false exited 1"), ("/nowhere/bwrap", "not found")],
)
def test_where_bwrap_cannot_isolate_code_is_refused_with_one_line(
    sandbox_backend_factory: Callable[..., LocalSandboxBackend],
    recording_llm: RecordingLLM,
    bwrap: str,
    reason: str,
) -> None:
    backend = sandbox_backend_factory(bwrap=bwrap)  # isolation: bwrap, the default
    for _ in range(2):  # refused every time, not only the first
        with pytest.raises(SandboxError) as refused:
            backend.open_session("org_a", recording_llm, prelude=PRELUDE)
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith("bubblewrap cannot isolate sandboxed code here (")
        assert bwrap in message and reason in message
        assert message.endswith(
            "install bubblewrap with user namespaces enabled, use MEMCITY_SANDBOX=daytona, or "
            "set MEMCITY_SANDBOX_ISOLATION=none to run it without isolation"
        )
    with pytest.raises(SandboxError, match="bubblewrap cannot isolate"):
        backend.isolated  # noqa: B018
    assert not backend.sessions_root.exists() or not any(backend.sessions_root.iterdir())
    assert recording_llm.calls == [] and backend.fallback_reason is None


def test_auto_is_not_an_isolation_any_more(memcity_home: Path) -> None:
    with pytest.raises(ValueError, match="isolation must be bwrap or none, not 'auto'"):
        LocalSandboxBackend(memcity_home / "sandboxes", isolation="auto")  # type: ignore[arg-type]
    assert LocalSandboxBackend(memcity_home / "sandboxes").isolation == "bwrap"


def test_isolation_none_runs_without_bwrap_warns_and_keeps_the_limits(
    sandbox_backend_factory: Callable[..., LocalSandboxBackend],
    recording_llm: RecordingLLM,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEMCITY_LLM_API_KEY", SECRET)
    backend = sandbox_backend_factory(
        isolation="none", bwrap=BROKEN_BWRAP, memory_mb=512, max_processes=12
    )
    with caplog.at_level(logging.WARNING):
        s = backend.open_session("org_a", recording_llm)
    assert backend.isolated is False and s.isolated is False
    assert "SANDBOX NOT ISOLATED" in caplog.text and "MEMCITY_SANDBOX_ISOLATION" in caplog.text
    assert backend.fallback_reason and "isolation='none'" in backend.fallback_reason
    with s:
        limits = s.execute(
            "import resource, os\n"
            "print(resource.getrlimit(resource.RLIMIT_AS)[0] >> 20,"
            " resource.getrlimit(resource.RLIMIT_NOFILE)[0], os.getcwd())\n"
            "print(dict(os.environ))"
        )
        as_mb, nofile, cwd = limits.stdout.splitlines()[0].split()
        assert (as_mb, nofile, cwd) == ("512", "128", str(s.workdir))
        assert SECRET not in limits.stdout
        assert "MemoryError" in s.execute("hog = bytearray(4 * 1024 ** 3)").error
        forks = s.execute(
            "import os, time\nn = 0\ntry:\n    for _ in range(500):\n"
            "        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n"
            "        n += 1\nexcept OSError as e:\n    print(n, type(e).__name__)"
        )
        n, error = forks.stdout.split()
        assert int(n) < 12 and error == "BlockingIOError"
        assert s.execute("while True: pass", timeout_s=1).timed_out
        assert s.execute("print(2)").stdout == "2\n"


# -- the resource ------------------------------------------------------------------------------


@pytest.mark.bwrap
def test_resource_picks_the_backend_from_settings(
    memcity_home: Path, monkeypatch: pytest.MonkeyPatch, recording_llm: RecordingLLM
) -> None:
    configured = build_resources(get_settings())["sandbox"]
    assert isinstance(configured, LocalSandboxResource) and configured.isolation == "bwrap"
    resource = configured.with_options(max_processes=32)
    backend = resource.get_backend()
    assert isinstance(backend, LocalSandboxBackend)
    assert backend.sessions_root == memcity_home.resolve() / "sandboxes"
    with resource.open_session("org_a", recording_llm) as s:
        assert s.execute("print(6 * 7)").stdout == "42\n"
    resource.close()
    monkeypatch.setenv("MEMCITY_SANDBOX", "daytona")
    assert isinstance(build_resources(get_settings())["sandbox"], DaytonaSandboxResource)
    monkeypatch.setenv("MEMCITY_SANDBOX", "docker")
    with pytest.raises(SettingsError, match="MEMCITY_SANDBOX='docker'"):
        get_settings()


def test_the_isolation_setting_reaches_the_local_backend(
    memcity_home: Path, monkeypatch: pytest.MonkeyPatch, recording_llm: RecordingLLM
) -> None:
    refusing = build_resources(get_settings())["sandbox"].with_options(bwrap=BROKEN_BWRAP)
    with pytest.raises(SandboxError, match="bubblewrap cannot isolate sandboxed code here"):
        refusing.open_session("org_a", recording_llm)
    refusing.close()
    monkeypatch.setenv("MEMCITY_SANDBOX_ISOLATION", "none")
    opted_out = build_resources(get_settings())["sandbox"].with_options(bwrap=BROKEN_BWRAP)
    assert isinstance(opted_out, LocalSandboxResource) and opted_out.isolation == "none"
    with opted_out.open_session("org_a", recording_llm) as s:
        assert s.isolated is False and s.execute("print(6 * 7)").stdout == "42\n"
    opted_out.close()
    monkeypatch.setenv("MEMCITY_SANDBOX_ISOLATION", "auto")
    with pytest.raises(SettingsError, match="MEMCITY_SANDBOX_ISOLATION"):
        get_settings()
