"""The Daytona backend with the real `daytona` SDK against a fake Daytona API server.

The fake (tests/sandbox/fake_daytona.py) serves real HTTP on 127.0.0.1 and really runs the session
commands, so the REPL server runs and speaks its protocol end to end.
"""

import base64
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daytona import Daytona, DaytonaConfig

from memcity_pipeline.resources.sandbox import DaytonaSandboxResource
from memcity_pipeline.sandbox.base import MAX_PENDING_CALLS, SandboxError, ToolError
from memcity_pipeline.sandbox.daytona import (
    DaytonaBackend,
    DaytonaSandboxes,
    DaytonaSession,
    RetryPolicy,
)
from memcity_pipeline.sandbox.snapshot import BAKED_SERVER_PATH, create_snapshot, server_source
from tests.sandbox.fake_daytona import API_KEY, FakeDaytona

HOST_SECRET = "sk-host-secret-must-not-leak"
FAST_RETRY = RetryPolicy(attempts=3, base_delay_s=0.05)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeDaytona]:
    """A fake Daytona API server on a free port."""
    with FakeDaytona(tmp_path / "daytona") as server:
        yield server


def sdk_client(fake: FakeDaytona) -> Daytona:
    """The real SDK client pointed at the fake."""
    return Daytona(DaytonaConfig(api_key=API_KEY, api_url=fake.api_url, target="us"))


def make_sandboxes(
    fake: FakeDaytona, *, sandbox_mode: str = "per_org", create_timeout_s: float = 10.0
) -> DaytonaSandboxes:
    """The sandbox finder/creator of a new backend process."""
    return DaytonaSandboxes(
        lambda: sdk_client(fake),
        sandbox_mode=sandbox_mode,
        snapshot="memcity-rlm-v1",
        auto_stop_minutes=30,
        auto_archive_minutes=1440,
        network_block_all=True,
        create_timeout_s=create_timeout_s,
        start_timeout_s=10.0,
        retry=FAST_RETRY,
    )


def make_backend(fake: FakeDaytona, **overrides: object) -> DaytonaBackend:
    """A backend talking to the fake, with short timeouts."""
    settings: dict = {
        "api_key": API_KEY,
        "api_url": fake.api_url,
        "target": "us",
        "sandbox_mode": "per_org",
        "exec_timeout_s": 30.0,
        "kill_grace_s": 2.0,
        "create_timeout_s": 10.0,
        "start_timeout_s": 10.0,
        "ready_timeout_s": 20.0,
        "retry": FAST_RETRY,
    }
    settings.update(overrides)
    return DaytonaBackend(**settings)


@pytest.fixture
def backend(fake: FakeDaytona) -> Iterator[DaytonaBackend]:
    """A per-org backend, closed afterwards."""
    with make_backend(fake) as b:
        yield b


class RecordingLLM:
    """A host-side LLM handler that answers deterministically and records prompts."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, prompts: list[str], model: str | None) -> list[str]:
        with self.lock:
            self.prompts.extend(prompts)
        return [f"answer to {p}" for p in prompts]


def session_dir(fake: FakeDaytona, session: DaytonaSession) -> Path:
    """Where the fake keeps a session's directory on the host."""
    return fake.sandboxes[session.sandbox_id].host_path(session.directory)


# ----- snapshot -----


def test_create_snapshot_sends_image_with_python_packages_and_server(
    fake: FakeDaytona, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMCITY_LLM_API_KEY", HOST_SECRET)
    create_snapshot("memcity-rlm-v1", daytona=sdk_client(fake), cpu=2, memory_gib=4, disk_gib=8)

    (call,) = fake.calls_to("POST", r"^/api/snapshots$")
    body = call.body
    assert body["name"] == "memcity-rlm-v1"
    assert (body["cpu"], body["memory"], body["disk"]) == (2, 4, 8)
    dockerfile = body["buildInfo"]["dockerfileContent"]
    assert dockerfile.startswith("FROM python:3.12")
    assert re.search(r"pip install .*numpy.*pandas.*scipy", dockerfile)
    inlined = re.search(rf"echo (\S+) \| base64 -d > {re.escape(BAKED_SERVER_PATH)}", dockerfile)
    assert inlined is not None
    assert base64.b64decode(inlined[1]) == server_source()
    assert HOST_SECRET not in fake.recorded_text()
    assert "ENV " not in dockerfile


def test_create_snapshot_failure_is_a_clear_error(fake: FakeDaytona) -> None:
    fake.inject(r"POST /api/snapshots$", status=409)
    with pytest.raises(RuntimeError, match="Could not create Daytona snapshot 'memcity-rlm-v1'"):
        create_snapshot(daytona=sdk_client(fake))


# ----- finding, creating, starting and deleting sandboxes -----


def test_created_from_snapshot_with_labels_intervals_and_network_block(fake: FakeDaytona) -> None:
    sandboxes = make_sandboxes(fake, sandbox_mode="shared")
    entry = sandboxes.acquire("org-a")

    (create,) = fake.calls_to("POST", r"^/api/sandbox$")
    body = create.body
    assert body["snapshot"] == "memcity-rlm-v1"
    assert body["labels"]["app"] == "memcity-rlm" and body["labels"]["mode"] == "shared"
    assert body["autoStopInterval"] == 30 and body["autoArchiveInterval"] == 1440
    assert body["networkBlockAll"] is True
    assert body["env"] == {}
    assert [s.id for s in fake.live_sandboxes()] == [entry.sandbox.id]


def test_shared_mode_serves_every_org_from_one_sandbox(fake: FakeDaytona) -> None:
    first = make_sandboxes(fake, sandbox_mode="shared")
    a = first.acquire("org-a").sandbox.id
    b = first.acquire("org-b").sandbox.id
    # another process (a new backend) finds the same sandbox by its labels
    c = make_sandboxes(fake, sandbox_mode="shared").acquire("org-c").sandbox.id
    assert a == b == c
    assert len(fake.calls_to("POST", r"^/api/sandbox$")) == 1


def test_per_org_mode_gives_each_org_its_own_sandbox_found_again_by_labels(
    fake: FakeDaytona,
) -> None:
    a = make_sandboxes(fake, sandbox_mode="per_org").acquire("org-a").sandbox
    b = make_sandboxes(fake, sandbox_mode="per_org").acquire("org-b").sandbox
    again = make_sandboxes(fake, sandbox_mode="per_org").acquire("org-a").sandbox
    assert a.id != b.id
    assert again.id == a.id
    assert a.labels["org_id"] == "org-a" and b.labels["org_id"] == "org-b"
    listed = fake.calls_to("GET", r"^/api/sandbox$")
    assert any(json.loads(c.query["labels"][0]).get("org_id") == "org-a" for c in listed)


def test_a_stopped_sandbox_is_started_again(fake: FakeDaytona) -> None:
    sandbox_id = make_sandboxes(fake).acquire("org-a").sandbox.id
    fake.set_state(sandbox_id, "stopped")

    entry = make_sandboxes(fake).acquire("org-a")

    assert entry.sandbox.id == sandbox_id and not entry.fresh
    assert fake.calls_to("POST", rf"^/api/sandbox/{sandbox_id}/start$")
    assert fake.sandboxes[sandbox_id].current_state() == "started"
    assert len(fake.calls_to("POST", r"^/api/sandbox$")) == 1


def test_a_sandbox_that_stopped_while_cached_is_started_again(fake: FakeDaytona) -> None:
    sandboxes = make_sandboxes(fake)
    sandbox_id = sandboxes.acquire("org-a").sandbox.id
    fake.set_state(sandbox_id, "stopped")
    assert sandboxes.acquire("org-a").sandbox.id == sandbox_id
    assert fake.sandboxes[sandbox_id].current_state() == "started"


def test_create_error_is_retried_then_reported_and_leaves_nothing_behind(
    fake: FakeDaytona,
) -> None:
    fake.inject(r"POST /api/sandbox$", status=500, times=100)
    with pytest.raises(SandboxError, match=r"find or create the sandbox after 3 attempts"):
        make_sandboxes(fake).acquire("org-a")
    assert len(fake.calls_to("POST", r"^/api/sandbox$")) == 3
    assert fake.live_sandboxes() == []


def test_a_transient_create_error_is_retried(fake: FakeDaytona) -> None:
    fake.inject(r"POST /api/sandbox$", status=503, times=1)
    entry = make_sandboxes(fake).acquire("org-a")
    assert [s.id for s in fake.live_sandboxes()] == [entry.sandbox.id]


def test_stuck_in_creating_times_out_and_the_sandbox_is_deleted(fake: FakeDaytona) -> None:
    fake.create_state = "creating"
    with pytest.raises(SandboxError, match="was not started within 2 s; it has been deleted"):
        make_sandboxes(fake, create_timeout_s=2).acquire("org-a")
    (created,) = fake.sandboxes.values()
    assert fake.calls_to("DELETE", rf"^/api/sandbox/{created.id}$")
    assert fake.live_sandboxes() == []


# ----- sessions: upload, execute, context, llm_query -----


def test_session_uploads_the_server_and_keeps_state_between_executions(
    backend: DaytonaBackend, fake: FakeDaytona
) -> None:
    with backend.open_session("org-a", RecordingLLM()) as session:
        assert session.execute("x = 41").error is None
        result = session.execute("print(x + 1)")
        assert result.stdout == "42\n" and result.error is None and not result.timed_out

        failing = session.execute("1 / 0")
        assert "ZeroDivisionError" in (failing.error or "")
        assert session.execute("print(x)").stdout == "41\n"

    uploads = fake.calls_to("POST", r"/files/bulk-upload$")
    paths = [c.body["files[0].path"] for c in uploads]
    assert any(re.search(r"/repl_server-[0-9a-f]{16}\.py$", p) for p in paths)
    (start,) = fake.calls_to("POST", r"/process/session/[^/]+/exec$")
    assert start.body["runAsync"] is True and start.body["suppressInputEcho"] is True
    assert "env -i" in start.body["command"]
    assert "/home/daytona/sessions/" in start.body["command"]


def test_context_is_uploaded_once_as_a_file(backend: DaytonaBackend, fake: FakeDaytona) -> None:
    chunks = [{"id": i, "text": f"chunk {i} " + "x" * 200} for i in range(5000)]
    with backend.open_session("org-a", RecordingLLM()) as session:
        session.load_context(chunks)
        assert session.context_info["length"] == 5000
        for _ in range(3):
            result = session.execute("print(len(context), context[4999]['id'])")
            assert result.stdout == "5000 4999\n"
        context_dir = session_dir(fake, session)
        assert not (context_dir / "context.json").exists()  # removed once loaded

    context_uploads = [
        c
        for c in fake.calls_to("POST", r"/files/bulk-upload$")
        if "context" in c.body["files[0].path"]
    ]
    assert len(context_uploads) == 1
    assert len(context_uploads[0].body["files[0].file"]) > 1_000_000
    inputs = fake.calls_to("POST", r"/command/[^/]+/input$")
    assert max(len(c.body["data"]) for c in inputs) < 10_000


def test_llm_query_is_answered_on_the_host(backend: DaytonaBackend) -> None:
    llm = RecordingLLM()
    with backend.open_session("org-a", llm) as session:
        single = session.execute("print(llm_query('what is 2+2'))")
        assert single.stdout == "answer to what is 2+2\n"
        batched = session.execute("print(llm_query_batched(['a', 'b', 'c']))")
        assert batched.stdout == "['answer to a', 'answer to b', 'answer to c']\n"
        assert session.llm_prompts_served == 4
    assert sorted(llm.prompts) == ["a", "b", "c", "what is 2+2"]


def test_search_is_answered_on_the_host_and_a_refusal_is_an_error_in_the_code(
    backend: DaytonaBackend,
) -> None:
    calls: list[tuple[str, object]] = []

    def tools(tool: str, args: object) -> object:
        calls.append((tool, args))
        if not isinstance(args, dict) or args.get("k") == 0:
            raise ToolError("k must be from 1 to 50, not 0")
        return [{"chunk_id": f"c{i}", "text": f"hit {i} for {args['query']}"} for i in range(2)]

    with backend.open_session("org-a", RecordingLLM(), tool_handler=tools) as session:
        hits = session.execute("hits = search('vault code', k=2)\nprint([h['text'] for h in hits])")
        assert hits.stdout == "['hit 0 for vault code', 'hit 1 for vault code']\n", hits
        refused = session.execute(
            "try:\n    search('vault', k=0)\nexcept RuntimeError as exc:\n    print(exc)"
        )
        assert refused.stdout == "search failed: k must be from 1 to 50, not 0\n", refused
    assert calls == [
        ("search", {"query": "vault code", "k": 2}),
        ("search", {"query": "vault", "k": 0}),
    ]


def test_no_secret_enters_the_sandbox(
    backend: DaytonaBackend, fake: FakeDaytona, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMCITY_LLM_API_KEY", HOST_SECRET)
    monkeypatch.setenv("OPENROUTER_API_KEY", HOST_SECRET)
    monkeypatch.setenv("DAYTONA_API_KEY", API_KEY)
    with backend.open_session("org-a", RecordingLLM()) as session:
        session.load_context(["some", "context"])
        seen = session.execute("import os; print(sorted(os.environ.items()))").stdout
        found = session.execute(
            "import subprocess\n"
            "print(subprocess.run(['grep', '-r', '-l', '-e', 'sk-host', '-e', 'test-daytona',"
            " '/home/daytona'], capture_output=True, text=True).stdout)"
        ).stdout
    assert HOST_SECRET not in seen and API_KEY not in seen
    assert not any(name.endswith("API_KEY") for name in re.findall(r"'(\w+)'", seen))
    assert found.strip() == ""
    assert HOST_SECRET not in fake.recorded_text()
    assert API_KEY not in fake.recorded_text()
    (create,) = fake.calls_to("POST", r"^/api/sandbox$")
    assert create.body["env"] == {}


def test_sessions_in_one_shared_sandbox_never_see_each_other(fake: FakeDaytona) -> None:
    with make_backend(fake, sandbox_mode="shared") as backend:
        a = backend.open_session("org-a", RecordingLLM())
        b = backend.open_session("org-b", RecordingLLM())
        assert a.sandbox_id == b.sandbox_id
        a.execute("secret_a = 'alpha'\nopen('notes.txt', 'w').write('alpha')")
        assert b.execute("print('secret_a' in globals())").stdout == "False\n"
        assert b.execute("import os; print(os.path.exists('notes.txt'))").stdout == "False\n"
        assert (session_dir(fake, a) / "notes.txt").read_text() == "alpha"

        a_dir = session_dir(fake, a)
        a.close()
        assert not a_dir.exists()
        assert fake.calls_to("DELETE", rf"/process/session/memcity-{a.session_id}$")
        assert b.execute("print('still here')").stdout == "still here\n"
        b.close()
    assert fake.running_processes() == []
    assert len(fake.live_sandboxes()) == 1  # the shared sandbox stays for reuse


def test_a_current_server_baked_into_the_snapshot_is_used_without_upload(
    fake: FakeDaytona,
) -> None:
    fake.add_snapshot_files("memcity-rlm-v1", {BAKED_SERVER_PATH: server_source()})
    with make_backend(fake) as backend, backend.open_session("org-a", RecordingLLM()) as session:
        assert session.execute("print(1 + 1)").stdout == "2\n"
    assert fake.calls_to("POST", r"/files/bulk-upload$") == []
    (start,) = fake.calls_to("POST", r"/process/session/[^/]+/exec$")
    assert BAKED_SERVER_PATH in start.body["command"]


def test_a_stale_baked_server_is_replaced_by_an_upload(fake: FakeDaytona) -> None:
    fake.add_snapshot_files("memcity-rlm-v1", {BAKED_SERVER_PATH: b"print('old version')\n"})
    with make_backend(fake) as backend, backend.open_session("org-a", RecordingLLM()) as session:
        assert session.execute("print(3)").stdout == "3\n"
    (start,) = fake.calls_to("POST", r"/process/session/[^/]+/exec$")
    assert BAKED_SERVER_PATH not in start.body["command"]
    assert fake.calls_to("POST", r"/files/bulk-upload$")


# ----- timeouts and failures -----


def test_soft_execution_timeout_keeps_the_session(backend: DaytonaBackend) -> None:
    with backend.open_session("org-a", RecordingLLM()) as session:
        session.execute("kept = 7")
        result = session.execute("import time\ntime.sleep(30)", timeout_s=1.0)
        assert result.timed_out
        assert session.execute("print(kept)").stdout == "7\n"


def test_runaway_execution_is_killed_and_the_session_ends(
    backend: DaytonaBackend, fake: FakeDaytona
) -> None:
    session = backend.open_session("org-a", RecordingLLM())
    stubborn = (
        "import time\n"
        "while True:\n"
        "    try:\n"
        "        time.sleep(100)\n"
        "    except BaseException:\n"
        "        pass\n"
    )
    result = session.execute(stubborn, timeout_s=1.0)
    assert result.timed_out and "killed" in (result.error or "")
    assert not session.alive
    assert fake.calls_to("DELETE", rf"/process/session/memcity-{session.session_id}$")
    assert fake.running_processes() == []
    with pytest.raises(SandboxError):
        session.execute("print(1)")
    session.close()
    # the sandbox is still fine for the next session
    with backend.open_session("org-a", RecordingLLM()) as fresh:
        assert fresh.execute("print('ok')").stdout == "ok\n"


def test_toolbox_5xx_is_retried(backend: DaytonaBackend, fake: FakeDaytona) -> None:
    fake.inject(r"POST /toolbox/.*/input$", status=502, times=2)
    fake.inject(r"GET /toolbox/.*/logs$", status=500, times=2)
    with backend.open_session("org-a", RecordingLLM()) as session:
        assert session.execute("print('through')").stdout == "through\n"


@pytest.mark.parametrize("status", [408, 409, 429])
def test_toolbox_408_409_429_are_retried(
    backend: DaytonaBackend, fake: FakeDaytona, status: int
) -> None:
    with backend.open_session("org-a", RecordingLLM()) as session:
        fake.inject(r"POST /toolbox/.*/input$", status=status, times=2)
        assert session.execute("print('through')").stdout == "through\n"
    assert fake.injections[-1].hits == 2


def test_a_rejected_request_is_not_retried(fake: FakeDaytona) -> None:
    fake.inject(r"POST /api/sandbox$", status=400, times=100)
    with pytest.raises(SandboxError, match=r"could not find or create the sandbox: ") as info:
        make_sandboxes(fake).acquire("org-a")
    assert "attempts" not in str(info.value)
    assert len(fake.calls_to("POST", r"^/api/sandbox$")) == 1


def test_persistent_5xx_ends_in_a_clear_error(backend: DaytonaBackend, fake: FakeDaytona) -> None:
    session = backend.open_session("org-a", RecordingLLM())
    fake.inject(r"GET /toolbox/.*/logs$", status=500, times=1000)
    with pytest.raises(SandboxError, match=r"read the REPL process output after 3 attempts"):
        session.execute("print('never seen')")
    fake.injections.clear()
    session.close()
    assert fake.running_processes() == []


def test_a_daytona_that_stops_answering_fails_the_call_by_its_deadline(
    backend: DaytonaBackend, fake: FakeDaytona, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every Daytona request has a deadline: a toolbox that stops answering ends the call with
    a clear error instead of holding it (here with a 1 s deadline and a 30 s stall)."""
    import memcity_pipeline.sandbox.daytona as daytona_backend

    monkeypatch.setattr(daytona_backend, "REQUEST_TIMEOUT_S", 1.0)
    session = backend.open_session("org-a", RecordingLLM())
    fake.inject(r"GET /toolbox/.*/logs$", status=None, times=1000, delay_s=30)
    started = time.monotonic()
    with pytest.raises(SandboxError, match=r"read the REPL process output"):
        session.execute("print('never seen')")
    assert time.monotonic() - started < 20  # one stall would be 30 s: it did not wait for it
    fake.injections.clear()
    session.close()


def test_a_sandbox_whose_first_use_fails_is_deleted(fake: FakeDaytona) -> None:
    fake.inject(r"POST /toolbox/.*/process/execute$", status=500, times=1000)
    with make_backend(fake) as backend, pytest.raises(SandboxError, match="after 3 attempts"):
        backend.open_session("org-a", RecordingLLM())
    assert len(fake.sandboxes) == 1
    assert fake.live_sandboxes() == []


def test_a_reused_sandbox_is_kept_when_a_session_fails(fake: FakeDaytona) -> None:
    with make_backend(fake) as backend, backend.open_session("org-a", RecordingLLM()):
        pass
    fake.inject(r"POST /toolbox/.*/process/session$", status=500, times=1000)
    with make_backend(fake) as backend, pytest.raises(SandboxError, match="start the REPL"):
        backend.open_session("org-a", RecordingLLM())
    assert len(fake.live_sandboxes()) == 1


def test_the_resource_builds_the_backend_and_a_missing_api_key_is_an_error(
    fake: FakeDaytona, monkeypatch: pytest.MonkeyPatch
) -> None:
    resource = DaytonaSandboxResource(
        api_key="",
        api_url=fake.api_url,
        target="us",
        sandbox_mode="per_org",
        snapshot="memcity-rlm-v1",
        auto_stop_minutes=30,
        auto_archive_minutes=1440,
        cpu=2,
        memory_gib=4,
        disk_gib=8,
        network_block_all=True,
        exec_timeout_s=12.0,
        max_llm_concurrency=3,
    )
    backend = resource.build_backend()
    assert isinstance(backend, DaytonaBackend)
    assert backend.sandboxes.sandbox_mode == "per_org" and backend.exec_timeout_s == 12.0
    with pytest.raises(SandboxError, match="DAYTONA_API_KEY"):
        backend.open_session("org-a", RecordingLLM())
    assert fake.sandboxes == {}


def test_close_ends_open_sessions(fake: FakeDaytona) -> None:
    backend = make_backend(fake)
    sessions = [backend.open_session("org-a", RecordingLLM()) for _ in range(2)]
    assert len(fake.running_processes()) == 2
    backend.close()
    assert fake.running_processes() == []
    assert all(not s.alive for s in sessions)


def test_create_snapshot_through_the_backend_uses_its_resources(fake: FakeDaytona) -> None:
    make_backend(fake, cpu=4, memory_gib=8, disk_gib=10).create_snapshot()
    (call,) = fake.calls_to("POST", r"^/api/snapshots$")
    assert (call.body["cpu"], call.body["memory"], call.body["disk"]) == (4, 8, 10)
    assert json.dumps(call.body).count("memcity-rlm-v1") == 1


def test_the_sandbox_resource_runs_daytona_sessions(fake: FakeDaytona) -> None:
    resource = DaytonaSandboxResource(
        api_key=API_KEY, api_url=fake.api_url, target="us", exec_timeout_s=20
    )
    try:
        with resource.open_session("org-a", RecordingLLM()) as session:
            assert session.execute("print(llm_query('ping'))").stdout == "answer to ping\n"
    finally:
        resource.close()
    (create,) = fake.calls_to("POST", r"^/api/sandbox$")
    assert create.body["labels"]["mode"] == "shared"
    assert create.body["networkBlockAll"] is True


# ----- memcity daytona create-snapshot -----


def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """`memcity <args>` as a user types it: exit code, stdout, stderr."""
    from typer.testing import CliRunner

    from memcity_pipeline.cli import app

    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def test_the_create_snapshot_command_sends_its_cpu_memory_and_disk(fake: FakeDaytona) -> None:
    env = {"DAYTONA_API_KEY": API_KEY, "DAYTONA_API_URL": fake.api_url}
    code, _, stderr = run_cli(
        "daytona",
        "create-snapshot",
        "--name",
        "big-rlm",
        "--cpu",
        "4",
        "--memory",
        "8",
        "--disk",
        "16",
        env=env,
    )
    assert code == 0, stderr
    (call,) = fake.calls_to("POST", r"^/api/snapshots$")
    assert call.body["name"] == "big-rlm"
    assert (call.body["cpu"], call.body["memory"], call.body["disk"]) == (4, 8, 16)
    assert "snapshot big-rlm is ready" in stderr

    code, _, stderr = run_cli("daytona", "create-snapshot", "--name", "default-rlm", env=env)
    assert code == 0, stderr
    default = fake.calls_to("POST", r"^/api/snapshots$")[-1]
    assert (default.body["cpu"], default.body["memory"], default.body["disk"]) == (2, 4, 8)


def test_the_create_snapshot_command_refused_by_daytona_is_one_line_and_exit_1(
    fake: FakeDaytona,
) -> None:
    fake.inject(r"POST /api/snapshots$", status=409)
    env = {"DAYTONA_API_KEY": API_KEY, "DAYTONA_API_URL": fake.api_url}
    code, stdout, stderr = run_cli("daytona", "create-snapshot", env=env)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 1 and stdout == "" and len(lines) == 1, stderr
    assert lines[0].startswith("error: Could not create Daytona snapshot 'memcity-rlm-v1'")
    assert "Traceback" not in stderr


def test_the_create_snapshot_command_without_a_key_sends_nothing(fake: FakeDaytona) -> None:
    code, _, stderr = run_cli("daytona", "create-snapshot", env={"DAYTONA_API_URL": fake.api_url})
    assert code == 2 and "DAYTONA_API_KEY is not set" in stderr
    assert fake.calls_to("POST", r"^/api/snapshots$") == []


# ----- what the sandbox sends is bounded on the host -----


CHANNEL = "import os, json\nfd = search.__self__.channel.fd\n"


def test_a_line_over_the_protocol_limit_ends_the_session_with_a_clear_error(
    backend: DaytonaBackend, fake: FakeDaytona
) -> None:
    session = backend.open_session("org-a", RecordingLLM())
    with pytest.raises(SandboxError, match="sent a line over 16,777,216 bytes"):
        session.execute(
            CHANNEL + "os.write(fd, b'{' + b'x' * (17 << 20))\nimport time\ntime.sleep(30)"
        )
    assert not session.alive
    session.close()
    assert fake.running_processes() == []
    with backend.open_session("org-a", RecordingLLM()) as fresh:
        assert fresh.execute("print('ok')").stdout == "ok\n"


def test_output_over_the_session_limit_ends_the_session_with_a_clear_error(
    fake: FakeDaytona,
) -> None:
    # the API returns a command's whole log on every poll: the host stops at max_log_chars
    with make_backend(fake, max_log_chars=1 << 20) as backend:
        session = backend.open_session("org-a", RecordingLLM())
        session.execute("print('small outputs travel')")
        with pytest.raises(SandboxError, match="wrote over 1,048,576 characters of output"):
            session.execute(
                CHANNEL + "for _ in range(64):\n    os.write(fd, b'noise ' * 10_000 + b'\\n')\n"
                "import time\ntime.sleep(30)"
            )
        session.close()
        assert fake.running_processes() == []


def test_calls_past_the_bound_are_refused_in_the_code(backend: DaytonaBackend) -> None:
    with backend.open_session("org-a", RecordingLLM()) as session:
        result = session.execute(
            f"try:\n    llm_query_batched(['p'] * {MAX_PENDING_CALLS + 1})\n"
            "except RuntimeError as exc:\n    print(exc)\n"
            "print(llm_query_batched(['a']))"
        )
        assert result.stdout.startswith(
            f"llm_query failed: a batch of {MAX_PENDING_CALLS + 1} prompts is over the limit"
        ), result
        assert result.stdout.endswith("['answer to a']\n")
