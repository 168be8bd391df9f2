"""The bun runtime: the JavaScript REPL server (Bun, else Node.js), in the local sandbox and in
Daytona, RLM queries on it end to end, and the fallback to python."""

import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memcity_pipeline.api import rlm_query
from memcity_pipeline.resources.sandbox import LocalSandboxResource, SandboxResource
from memcity_pipeline.rlm.config import RLMResult
from memcity_pipeline.rlm.engine import JS_PRELUDE
from memcity_pipeline.rlm.sessions import read_sessions
from memcity_pipeline.sandbox.base import JS_REPL_SERVER_PATH, SandboxError
from memcity_pipeline.sandbox.daytona import DaytonaBackend, RetryPolicy
from memcity_pipeline.sandbox.local import (
    PROJECT_BUNS,
    LocalSandboxBackend,
    LocalSandboxSession,
    find_js_interpreter,
)
from memcity_pipeline.sandbox.snapshot import BAKED_JS_SERVER_PATH, server_source, snapshot_image
from memcity_pipeline.settings import get_settings
from tests.fixtures_sandbox import BWRAP, RecordingLLM
from tests.rlm.test_rlm import ROOT, make_client
from tests.sandbox.fake_daytona import API_KEY, FakeDaytona
from tests.scripted_llm_server import Fault, ScriptedLLMServer

SECRET = "sk-or-v1-js-secret-must-not-leak-0123456789"


def _bun() -> str | None:
    found = shutil.which("bun") or next((str(p) for p in PROJECT_BUNS if p.exists()), None)
    return os.path.realpath(found) if found else None


def _node() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
    return node if int(version.lstrip("v").split(".")[0] or 0) >= 20 else None


INTERPRETERS = {"bun": _bun(), "node": _node()}
JS = [
    pytest.param(name, marks=pytest.mark.skipif(path is None, reason=f"no {name} here"), id=name)
    for name, path in INTERPRETERS.items()
]
needs_bwrap = pytest.mark.skipif(not Path(BWRAP).exists(), reason="bubblewrap is not installed")


@pytest.fixture(params=JS)
def interpreter(request: pytest.FixtureRequest) -> str:
    """The path of a JavaScript interpreter (Bun, then Node.js)."""
    path = INTERPRETERS[request.param]
    assert path is not None
    return path


@pytest.fixture
def js_backend(
    interpreter: str, sandbox_backend_factory: Callable[..., LocalSandboxBackend]
) -> LocalSandboxBackend:
    """An isolated local backend whose bun runtime uses `interpreter`."""
    return sandbox_backend_factory(js_interpreter=interpreter)


@pytest.fixture
def js_session(
    js_backend: LocalSandboxBackend, recording_llm: RecordingLLM
) -> Iterator[LocalSandboxSession]:
    with js_backend.open_session(
        "org_a", recording_llm, prelude=JS_PRELUDE, runtime="bun"
    ) as session:
        yield session


# -- the protocol, straight to the server ------------------------------------------------------


class Server:
    """repl_server.js as a plain child process (no sandbox), for protocol tests."""

    def __init__(self, interpreter: str, cwd: Path) -> None:
        self.process = subprocess.Popen(
            [interpreter, str(JS_REPL_SERVER_PATH)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=cwd,
            env={"PATH": "/usr/bin:/bin"},
        )
        self.ready = self.receive()

    def send(self, message: dict[str, Any] | str) -> None:
        assert self.process.stdin is not None
        text = message if isinstance(message, str) else json.dumps(message)
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def server(interpreter: str, tmp_path: Path) -> Iterator[Server]:
    s = Server(interpreter, tmp_path)
    yield s
    s.close()


def _error_reply(server: Server) -> dict[str, Any]:
    reply = server.receive()
    assert reply["type"] == "error"
    return reply


def test_protocol_requests_errors_context_and_shutdown(server: Server, tmp_path: Path) -> None:
    assert server.ready["type"] == "ready" and server.ready["protocol"] == 1
    assert server.ready["runtime"].split()[0] in ("bun", "node")
    server.send("not json")
    assert _error_reply(server)["id"] is None
    server.send({"type": "frobnicate", "id": 1})
    assert _error_reply(server) == {
        "type": "error",
        "id": 1,
        "error": 'unknown message type "frobnicate"',
    }
    server.send({"type": "exec", "id": 2})
    assert "code" in _error_reply(server)["error"]

    (tmp_path / "ctx.json").write_text(json.dumps(["alpha", "beta gamma"]))
    server.send({"type": "load_context", "id": 3, "path": "ctx.json"})
    loaded = server.receive()
    assert (loaded["type"], loaded["id"]) == ("result", 3)
    assert loaded["info"] == {"type": "list", "length": 2, "chars": 15}
    server.send({"type": "load_context", "id": 4, "data": {"k": "v"}})
    assert server.receive()["info"]["type"] == "dict"

    server.send({"type": "exec", "id": 5, "code": "const n = Object.keys(context).length"})
    assert server.receive()["error"] is None
    server.send({"type": "get_var", "id": 6, "name": "n"})
    assert server.receive() == {
        "type": "var",
        "id": 6,
        "name": "n",
        "value": "1",
        "value_type": "number",
        "error": None,
    }
    server.send({"type": "get_var", "id": 7, "name": "missing"})
    assert server.receive()["error"] == "no variable 'missing'"

    # an llm_request carries the exec id; answers unblock the awaiting code
    server.send(
        {"type": "exec", "id": 8, "code": "const a = await llm_query('q', 'm')\nconsole.log(a)"}
    )
    request = server.receive()
    assert request["type"] == "llm_request" and request["exec_id"] == 8
    assert (request["prompts"], request["model"]) == (["q"], "m")
    server.send({"type": "llm_result", "id": request["id"], "results": ["answer"]})
    assert server.receive()["stdout"] == "answer\n"
    server.send({"type": "exec", "id": 9, "code": "await llm_query('q')"})
    request = server.receive()
    server.send({"type": "llm_result", "id": request["id"], "error": "upstream down"})
    assert "llm_query failed: upstream down" in server.receive()["error"]

    server.send({"type": "shutdown", "id": 10})
    assert server.receive() == {"type": "bye", "id": 10}
    assert server.process.wait(timeout=10) == 0


def test_eof_ends_the_server(server: Server) -> None:
    assert server.process.stdin is not None
    server.process.stdin.close()
    assert server.process.wait(timeout=10) == 0


# -- the REPL in the local sandbox ---------------------------------------------------------------


@pytest.mark.bwrap
@needs_bwrap
def test_state_persists_and_console_is_captured_per_execution(js_session) -> None:
    first = js_session.execute(
        "const x = 40\nlet items = ['a', 'b']\nfunction bump() { x += 1 }\n"
        "class Box { constructor(v) { this.v = v } }\nconsole.log('one', items)\nconsole.error('warn')"
    )
    assert (first.stdout, first.stderr, first.error) == ("one [ 'a', 'b' ]\n", "warn\n", None)
    second = js_session.execute("bump()\nconst x2 = x + 1\nconsole.log(x, x2, new Box(3).v)")
    assert (second.stdout, second.stderr) == ("41 42 3\n", "")
    # a later cell may declare the same const again, and top-level await keeps names too
    third = js_session.execute("const x = 7\nconst got = await Promise.resolve(x * 6)")
    assert third.error is None
    assert js_session.get_variable("got") == "42"
    assert js_session.get_variable("items") == '["a","b"]'
    shown = js_session.execute("console.log(SHOW_VARS())").stdout
    assert "'x': 'number'" in shown and "'bump': 'function'" in shown and "'Box': 'class'" in shown
    assert "FINAL" not in shown and "llm_query" not in shown
    with pytest.raises(KeyError):
        js_session.get_variable("nope")


@pytest.mark.bwrap
@needs_bwrap
def test_errors_keep_the_session(js_session) -> None:
    js_session.execute("const total = 7")
    failed = js_session.execute("function f() {\n  return null.x\n}\nf()")
    assert "TypeError" in failed.error and "<cell-" in failed.error
    assert "repl_server" not in failed.error and "node:" not in failed.error
    assert "SyntaxError" in js_session.execute("const broken = (;").error
    assert "Uncaught 'plain'" in js_session.execute("throw 'plain'").error
    assert js_session.execute("console.log(total)").stdout == "7\n"


@pytest.mark.bwrap
@needs_bwrap
def test_final_and_final_var_report_once(js_session) -> None:
    assert js_session.execute("FINAL('done')").final == {"kind": "value", "value": "done"}
    js_session.execute("const answer = {city: 'brambleway', n: 2}")
    result = js_session.execute("FINAL_VAR('answer')")
    assert result.final == {"kind": "var", "name": "answer", "value": '{"city":"brambleway","n":2}'}
    assert js_session.execute("console.log(1)").final is None
    assert "no variable 'ghost'" in js_session.execute("FINAL_VAR('ghost')").error


@pytest.mark.bwrap
@needs_bwrap
def test_huge_output_is_truncated_with_a_note(js_session) -> None:
    result = js_session.execute("console.log('y'.repeat(1000000))")
    assert len(result.stdout) < 200_000 and "more characters truncated" in result.stdout


@pytest.mark.bwrap
@needs_bwrap
def test_llm_query_batched_is_one_concurrent_request(
    interpreter: str, sandbox_backend_factory: Callable[..., LocalSandboxBackend]
) -> None:
    llm = RecordingLLM(delay_s=0.3)
    backend = sandbox_backend_factory(js_interpreter=interpreter, max_llm_concurrency=3)
    with backend.open_session("org_a", llm, runtime="bun") as s:
        result = s.execute(
            "const out = await llm_query_batched([...Array(9).keys()].map(i => `q${i}`))\n"
            "const one = await llm_query('single', 'sub')\nconsole.log(out.length, out[8], one)"
        )
        assert result.stdout == "9 echo:q8 echo:single\n"
        assert s.llm_prompts_served == 10
    assert llm.max_in_flight == 3
    assert (["single"], "sub") in llm.calls


@pytest.mark.bwrap
@needs_bwrap
def test_search_is_a_promise_answered_by_the_host(
    js_backend: LocalSandboxBackend, recording_llm: RecordingLLM
) -> None:
    from tests.sandbox.test_local import Tools

    with js_backend.open_session("org_a", recording_llm, runtime="bun", tool_handler=Tools()) as s:
        result = s.execute(
            "const found = await search('tides', 3)\n"
            "console.log(JSON.stringify(found), JSON.stringify(await search('moon')))\n"
            "for (const q of ['refuse', 'crash', 'odd']) {\n"
            "  try { await search(q) } catch (e) { console.log(e.message) }\n"
            "}\n"
            "try { await search(10n) } catch (e) { console.log(e.message) }\n"
            "console.log(SHOW_VARS().includes('search'))"
        )
        assert result.error is None, result.error
        assert result.stdout.splitlines() == [
            '[{"query":"tides","k":3}] [{"query":"moon","k":10}]',
            "search failed: query refused: say why",
            "search failed: an error on the host (KeyError)",
            "search failed: an error on the host (TypeError)",
            "search failed: its arguments are not JSON data",
            "false",
        ]
        assert s.tool_calls_served == 5


@pytest.mark.bwrap
@needs_bwrap
def test_context_loads_once_as_a_file(js_session) -> None:
    context = [{"id": i, "text": f"{i}: " + "lorem ipsum " * 80} for i in range(5000)]
    js_session.load_context(context)
    assert js_session.context_info["length"] == 5000
    assert not any(js_session.workdir.iterdir())
    result = js_session.execute("console.log(context.length, context[4999].id)")
    assert result.stdout == "5000 4999\n"


# -- timeouts, in tiers -------------------------------------------------------------------------


@pytest.mark.bwrap
@needs_bwrap
def test_endless_loops_are_interrupted_and_the_session_lives(js_session) -> None:
    js_session.execute("const kept = 'yes'")
    for code in (
        "while (true) {}",
        "await null\nwhile (true) {}",
        "await new Promise(() => {})",
        "Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0)",
    ):
        result = js_session.execute(code, timeout_s=1.0)
        assert result.timed_out and "TimeoutError" in result.error, code
        assert js_session.alive
    assert js_session.execute("console.log(kept)").stdout == "yes\n"


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (host view)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.bwrap
@needs_bwrap
def test_a_server_that_stops_answering_is_killed_by_the_host(
    js_backend: LocalSandboxBackend, recording_llm: RecordingLLM
) -> None:
    s = js_backend.open_session("org_a", recording_llm, runtime="bun")
    for pid in _descendants(s.process.pid):
        os.kill(pid, signal.SIGSTOP)  # a hung interpreter: no tier inside it can act
    result = s.execute("console.log(1)", timeout_s=1.0)
    assert result.timed_out and "killed" in result.error
    assert s.process.poll() is not None
    with pytest.raises(SandboxError, match="closed"):
        s.execute("console.log(2)")
    s.close()
    with js_backend.open_session("org_a", recording_llm, runtime="bun") as fresh:
        assert fresh.execute("console.log('fine')").stdout == "fine\n"


@pytest.mark.bwrap
@needs_bwrap
def test_cpu_time_limit_ends_the_session_with_a_clear_error(
    interpreter: str,
    sandbox_backend_factory: Callable[..., LocalSandboxBackend],
    recording_llm: RecordingLLM,
) -> None:
    backend = sandbox_backend_factory(js_interpreter=interpreter, cpu_seconds=1)
    with (
        backend.open_session("org_a", recording_llm, runtime="bun") as s,
        pytest.raises(SandboxError, match="CPU time limit"),
    ):
        s.execute("while (true) {}", timeout_s=30)


# -- hostile code --------------------------------------------------------------------------------


HOSTILE = {
    "process": "process.env",
    "require fs": "require('fs').readFileSync('/etc/passwd', 'utf8')",
    "require child_process": "require('child_process').execSync('id')",
    "import": "await import('fs')",
    "import with a comment": "await import /* x */ ('child_process')",
    "constructor escape": "this.constructor.constructor('return process')().env",
    "function of a scaffold": "llm_query.constructor('return process')().env",
    "async function constructor": "(async () => {}).constructor('return process')()",
    "eval": "eval('process.env')",
    "caught error constructor": "try { null.x } catch (e) { e.constructor.constructor('return process')() }",
    "console constructor": "console.log.constructor('return process')()",
    "shadow realm": "new ShadowRealm().evaluate('JSON.stringify(process.env)')",
    "bun": "Bun.env",
    "globalThis process": "globalThis.process.env",
    "fetch": "await fetch('http://127.0.0.1:9/')",
    "websocket": "new WebSocket('ws://127.0.0.1:9/')",
    "wasm": "new WebAssembly.Module(new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0]))",
    "timers": "setTimeout(() => {}, 1)",
    "host files": "Deno.readTextFileSync('/etc/passwd')",
}


@pytest.mark.bwrap
@needs_bwrap
@pytest.mark.parametrize("code", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_code_fails_inside_the_vm(
    code: str,
    js_backend: LocalSandboxBackend,
    recording_llm: RecordingLLM,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEMCITY_LLM_API_KEY", SECRET)
    monkeypatch.setenv("DAYTONA_API_KEY", SECRET)
    with js_backend.open_session("org_a", recording_llm, runtime="bun") as s:
        result = s.execute(f"const got = {code}\nconsole.log(JSON.stringify(got))")
        assert result.error is not None, result.stdout
        assert re_any(
            result.error, "ReferenceError", "EvalError", "SyntaxError", "TypeError", "CompileError"
        )
        assert SECRET not in result.stdout + result.stderr + result.error
        assert s.execute("console.log('still here')").stdout == "still here\n"


def re_any(text: str, *words: str) -> bool:
    return any(word in text for word in words)


@pytest.mark.bwrap
@needs_bwrap
def test_the_sandbox_process_holds_no_secret_and_the_vm_no_host_object(
    js_backend: LocalSandboxBackend, recording_llm: RecordingLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMCITY_LLM_API_KEY", SECRET)
    with js_backend.open_session("org_a", recording_llm, runtime="bun") as s:
        names = s.execute(
            "console.log(Object.getOwnPropertyNames(globalThis).filter(n => /^[a-z]/.test(n)).join())"
        ).stdout
        for pid in _descendants(s.process.pid):  # the boundary: what the interpreter itself has
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            assert SECRET not in environ and "MEMCITY" not in environ
            assert "HOME=/home/sandbox" in environ or environ == ""
    for forbidden in ("process", "require", "module", "fetch", "setTimeout", "queueMicrotask"):
        assert forbidden not in names.strip().split(","), forbidden


@pytest.mark.bwrap
@needs_bwrap
def test_a_memory_bomb_is_contained(
    interpreter: str,
    sandbox_backend_factory: Callable[..., LocalSandboxBackend],
    recording_llm: RecordingLLM,
) -> None:
    backend = sandbox_backend_factory(js_interpreter=interpreter, memory_mb=256)
    s = backend.open_session("org_a", recording_llm, runtime="bun")
    bomb = "const hog = []\nwhile (true) hog.push('x'.repeat(1 << 20) + hog.length)"
    try:
        result = s.execute(bomb, timeout_s=15)
        assert result.error is not None  # an out-of-memory error or a timeout, session alive
    except SandboxError as exc:  # or the interpreter died at its heap limit
        assert "died" in str(exc)
    finally:
        s.close()
    with backend.open_session("org_a", recording_llm, runtime="bun") as fresh:
        assert fresh.execute("console.log(6 * 7)").stdout == "42\n"


def test_a_missing_interpreter_is_a_clear_error(
    sandbox_backend_factory: Callable[..., LocalSandboxBackend], recording_llm: RecordingLLM
) -> None:
    backend = sandbox_backend_factory(isolation="none", js_interpreter="/nonexistent/bun")
    with pytest.raises(SandboxError, match="JavaScript interpreter is unusable"):
        backend.open_session("org_a", recording_llm, runtime="bun")
    with pytest.raises(ValueError, match="runtime must be one of"):
        backend.open_session("org_a", recording_llm, runtime="ruby")
    with pytest.raises(SandboxError, match="configured JavaScript interpreter"):
        find_js_interpreter("/nonexistent/node")


def test_without_bwrap_the_js_session_keeps_the_limits(
    interpreter: str,
    sandbox_backend_factory: Callable[..., LocalSandboxBackend],
    recording_llm: RecordingLLM,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEMCITY_LLM_API_KEY", SECRET)
    backend = sandbox_backend_factory(isolation="none", js_interpreter=interpreter)
    with backend.open_session("org_a", recording_llm, runtime="bun") as s:
        assert s.execute("console.log(typeof process)").stdout == "undefined\n"
        assert s.execute("while (true) {}", timeout_s=1).timed_out
        assert s.execute("console.log(2)").stdout == "2\n"
        environ = Path(f"/proc/{s.process.pid}/environ").read_bytes().decode(errors="replace")
        assert SECRET not in environ


def test_without_bwrap_an_interpreter_the_sandbox_user_cannot_reach_gives_way_to_node(
    tmp_path: Path,
    sandbox_backend_factory: Callable[..., LocalSandboxBackend],
    recording_llm: RecordingLLM,
) -> None:
    # Bun inside a checkout private to root: the sandbox user cannot execute it.
    if os.geteuid() != 0:
        pytest.skip("only a root host drops sessions to an unprivileged user")
    node = shutil.which("node")
    assert node is not None
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    wrapper = private / "js"
    wrapper.write_text(f'#!/bin/sh\nexec {node} "$@"\n')
    wrapper.chmod(0o755)
    backend = sandbox_backend_factory(isolation="none", js_interpreter=str(wrapper))
    with backend.open_session("org_a", recording_llm, runtime="bun") as s:
        assert s.execute("console.log(6 * 7)").stdout == "42\n"
        assert os.path.realpath(f"/proc/{s.process.pid}/exe") == os.path.realpath(node)


# -- rlm_query on the bun runtime ----------------------------------------------------------------


def repl(code: str) -> str:
    return f"Next step.\n```repl\n{code}\n```"


class Script:
    """Root replies in order; sub-calls answered (slowly) by a function of the prompt."""

    def __init__(self, *root: str, sub_delay_s: float = 0.0) -> None:
        self.root = list(root)
        self.sub_delay_s = sub_delay_s
        self.root_prompts: list[list[dict[str, Any]]] = []
        self.lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> Any:
        if request["model"] == ROOT:
            with self.lock:
                self.root_prompts.append(request["messages"])
                return self.root.pop(0) if self.root else "I have no more to say."
        prompt = str(request["messages"][-1]["content"])
        return Fault(status=200, delay_s=self.sub_delay_s, content=f"<{prompt.upper()}>")


def ask(server: ScriptedLLMServer, sandbox: SandboxResource, **config: Any) -> RLMResult:
    return rlm_query(
        "acme",
        "What do the notes say?",
        "custom",
        custom_context=["red fox", "blue owl", "green frog", "grey wolf"],
        rlm_config={"runtime": "bun", **config},
        llm=make_client(server),
        sandbox=sandbox.get_backend(),
    )


def make_sandbox(memcity_home: Path, **options: Any) -> SandboxResource:
    settings: dict[str, Any] = {
        "sessions_root": str(memcity_home / "sandboxes"),
        "isolation": "bwrap" if Path(BWRAP).exists() else "none",
        "exec_timeout_s": 20.0,
        "cpu_seconds": 60,
        "memory_mb": 1024,
        "max_llm_concurrency": 8,
    }
    return LocalSandboxResource(**{**settings, **options})


def session_row() -> dict[str, Any]:
    return read_sessions(get_settings().lake_dir).row(0, named=True)


def test_a_query_on_the_bun_runtime_ends_with_final_var(
    interpreter: str, scripted_llm: ScriptedLLMServer, memcity_home: Path
) -> None:
    script = Script(
        repl("const n = context.length\nconsole.log(n, context[0])"),
        repl(
            "const parts = await llm_query_batched(context.map(c => `describe ${c}`))\n"
            "const summary = `${n} notes: ` + parts.join(' ')\nFINAL_VAR('summary')"
        ),
        sub_delay_s=0.3,
    )
    scripted_llm.responder = script
    sandbox = make_sandbox(memcity_home, bun=interpreter)
    try:
        result = ask(scripted_llm, sandbox)
    finally:
        sandbox.close()
    assert result.status == "completed", result
    assert result.answer == (
        "4 notes: <DESCRIBE RED FOX> <DESCRIBE BLUE OWL> <DESCRIBE GREEN FROG> <DESCRIBE GREY WOLF>"
    )
    assert (result.runtime, result.runtime_used) == ("bun", "bun")
    assert result.iterations == 2 and result.total_sub_calls == 4
    assert result.prompt_tokens > 0 and result.warning is None
    assert scripted_llm.max_in_flight >= 2  # the batch ran concurrently
    assert "JavaScript REPL" in str(script.root_prompts[0][0]["content"])
    assert "4 red fox" in str(script.root_prompts[1])  # the console output came back
    row = session_row()
    assert (row["runtime"], row["runtime_used"], row["runtime_fallback_reason"]) == (
        "bun",
        "bun",
        None,
    )
    assert row["status"] == "completed" and row["sub_calls"] == 4


def test_final_with_a_value_and_an_error_turn(
    interpreter: str, scripted_llm: ScriptedLLMServer, memcity_home: Path
) -> None:
    scripted_llm.responder = Script(
        repl("const words = context.map(c => c.split(' ')[1])\nwords.nope()"),
        repl("FINAL(`animals: ${words.join(', ')}`)"),
    )
    sandbox = make_sandbox(memcity_home, bun=interpreter)
    try:
        result = ask(scripted_llm, sandbox)
    finally:
        sandbox.close()
    assert result.status == "completed" and result.runtime_used == "bun"
    assert result.answer == "animals: fox, owl, frog, wolf"


def test_a_missing_interpreter_falls_back_to_python(
    scripted_llm: ScriptedLLMServer, memcity_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scripted_llm.responder = Script(repl("FINAL(f'py {len(context)}')"))
    sandbox = make_sandbox(memcity_home, bun="/nonexistent/bun")
    try:
        result = ask(scripted_llm, sandbox)
    finally:
        sandbox.close()
    assert result.status == "completed" and result.answer == "py 4"
    assert (result.runtime, result.runtime_used) == ("bun", "python")
    assert "ran on python" in (result.warning or "")
    assert "running it again on python" in caplog.text
    row = session_row()
    assert (row["runtime"], row["runtime_used"]) == ("bun", "python")
    assert "/nonexistent/bun" in row["runtime_fallback_reason"]


def test_a_missing_interpreter_without_fallback_fails_cleanly(
    scripted_llm: ScriptedLLMServer, memcity_home: Path
) -> None:
    sandbox = make_sandbox(memcity_home, bun="/nonexistent/bun")
    try:
        result = ask(scripted_llm, sandbox, runtime_fallback_to_python=False)
    finally:
        sandbox.close()
    assert result.status == "failed"
    assert "JavaScript interpreter" in result.error and "runtime_fallback_to_python" in result.error
    assert scripted_llm.call_count == 0
    row = session_row()
    assert row["status"] == "failed" and row["runtime"] == "bun"


def test_a_js_server_that_dies_mid_query_is_retried_on_python(
    interpreter: str, scripted_llm: ScriptedLLMServer, memcity_home: Path
) -> None:
    scripted_llm.responder = Script(
        repl("while (true) {}"),  # burns the 1 s CPU limit: the JS server dies
        repl("FINAL('python finished')"),
    )
    sandbox = make_sandbox(memcity_home, bun=interpreter, cpu_seconds=1)
    try:
        result = ask(scripted_llm, sandbox)
    finally:
        sandbox.close()
    assert result.status == "completed" and result.answer == "python finished"
    assert result.runtime_used == "python"
    assert scripted_llm.call_count == 2  # both attempts' root calls are counted and costed
    assert "CPU time limit" in session_row()["runtime_fallback_reason"]


# -- Daytona ---------------------------------------------------------------------------------------


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeDaytona]:
    with FakeDaytona(tmp_path / "daytona") as server:
        yield server


def daytona_backend(fake: FakeDaytona) -> DaytonaBackend:
    return DaytonaBackend(
        api_key=API_KEY,
        api_url=fake.api_url,
        target="us",
        sandbox_mode="per_org",
        exec_timeout_s=30.0,
        kill_grace_s=2.0,
        create_timeout_s=10.0,
        start_timeout_s=10.0,
        ready_timeout_s=20.0,
        retry=RetryPolicy(attempts=3, base_delay_s=0.05),
    )


@pytest.mark.skipif(INTERPRETERS["node"] is None, reason="no node >= 20 on PATH")
def test_daytona_js_session_runs_node_without_bun_and_uploads_the_server(fake: FakeDaytona) -> None:
    with daytona_backend(fake) as backend:
        llm = RecordingLLM()
        with backend.open_session("org-a", llm, prelude=JS_PRELUDE, runtime="bun") as session:
            assert session.client.server_info["runtime"].startswith("node ")
            session.load_context(["one", "two"])
            assert session.execute("const n = context.length").error is None
            result = session.execute(
                "const a = await llm_query_batched(['p', 'q'])\nconsole.log(n, a)"
            )
            assert result.stdout == "2 [ 'echo:p', 'echo:q' ]\n"
            assert session.execute("FINAL_VAR('n')").final == {
                "kind": "var",
                "name": "n",
                "value": "2",
            }
            assert session.execute("while (true) {}", timeout_s=1).timed_out
            assert session.execute("console.log(typeof process)").stdout == "undefined\n"
    uploads = [c.body["files[0].path"] for c in fake.calls_to("POST", r"/files/bulk-upload$")]
    assert any(p.endswith(".js") and "repl_server-" in p for p in uploads)
    (start,) = fake.calls_to("POST", r"/process/session/[^/]+/exec$")
    assert "env -i" in start.body["command"] and "repl_server" in start.body["command"]
    assert fake.running_processes() == []


@pytest.mark.skipif(INTERPRETERS["bun"] is None, reason="no bun here")
def test_daytona_js_session_prefers_bun_and_a_baked_server(fake: FakeDaytona) -> None:
    fake.add_snapshot_files(
        "memcity-rlm-v1",
        {
            BAKED_JS_SERVER_PATH: server_source("bun"),
            "/usr/local/bin/bun": Path(INTERPRETERS["bun"] or ""),
        },
    )
    with (
        daytona_backend(fake) as backend,
        backend.open_session("org-a", RecordingLLM(), runtime="bun") as session,
    ):
        assert session.client.server_info["runtime"].startswith("bun ")
        assert session.execute("console.log(1 + 1)").stdout == "2\n"
    assert fake.calls_to("POST", r"/files/bulk-upload$") == []
    (start,) = fake.calls_to("POST", r"/process/session/[^/]+/exec$")
    assert BAKED_JS_SERVER_PATH in start.body["command"]


def test_the_snapshot_bakes_bun_and_the_js_server() -> None:
    image = snapshot_image()
    dockerfile = image.dockerfile() if callable(image.dockerfile) else image.dockerfile
    assert "npm install -g bun@" in dockerfile
    assert f"base64 -d > {BAKED_JS_SERVER_PATH}" in dockerfile
