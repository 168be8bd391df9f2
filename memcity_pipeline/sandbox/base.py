"""The sandbox interface, and the host side of the REPL protocol that every backend reuses.

A :class:`SandboxBackend` hands out :class:`SandboxSession` objects: one persistent REPL session
per RLM query. Code runs in a REPL server inside the sandbox: ``memcity_pipeline/sandbox/servers/repl_server.py``
for the ``python`` runtime, ``repl_server.js`` (Bun, else Node.js) for the ``bun`` runtime; both
speak the protocol of ``REPL_PROTOCOL.md``. :class:`ReplClient` drives that server over any pair of
line transports (a local process's pipes, a Daytona session's input and logs) and answers the
server's ``llm_request`` messages on the host with an :data:`LLMHandler`, and its
``tool_request`` messages (``search``) with a :data:`ToolHandler`, so no secret ever enters the
sandbox. A tool call is an untrusted request: whatever it asks, the host answers it with a
result or an error message for the sandboxed code (a :class:`ToolError`'s message as it is,
of anything else only its type), never by failing itself. :class:`ReplSession` is a complete
session on top of a client; backends add how the process is started, how a context file
travels, and how the process is killed.

Timeouts have two tiers. The server interrupts Python code at ``timeout_s`` (the session lives
on, ``ExecResult.timed_out`` is true). If the server does not answer ``kill_grace_s`` later, the
host kills the sandbox process: ``timed_out`` is true, and the session is dead, so later calls
raise :class:`SandboxError`; open a new session (and load the context again) to go on.

This module stays whole: the backend interface and the host side of the REPL protocol are one
contract (the message pump, brokered `llm_query` batches and the timeout tiers are read
together).
"""

import contextlib
import itertools
import json
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

log = logging.getLogger(__name__)

LLMHandler = Callable[[list[str], str | None], list[str]]
"""Host-side LLM access: ``(prompts, model) -> answers`` (one answer per prompt)."""

ToolHandler = Callable[[str, Any], Any]
"""Host-side tools: ``(tool name, arguments as the sandbox sent them) -> a JSON-serialisable
result``; raises :class:`ToolError` to refuse a call with a message for the sandboxed code."""

REPL_SERVER_PATH = Path(__file__).resolve().parent / "servers" / "repl_server.py"
JS_REPL_SERVER_PATH = REPL_SERVER_PATH.with_name("repl_server.js")
RUNTIMES = ("python", "bun")
"""REPL runtimes: ``python`` (repl_server.py) and ``bun`` (repl_server.js under Bun or Node.js)."""
SERVER_MESSAGE_TYPES = frozenset(
    {"ready", "result", "var", "llm_request", "tool_request", "error", "bye"}
)
DEFAULT_MAX_OUTPUT_CHARS = 100_000
_EOF = object()


@dataclass
class ExecResult:
    """What one code execution produced."""

    stdout: str
    stderr: str
    error: str | None
    timed_out: bool
    duration_s: float
    final: dict | None = None


class SandboxError(Exception):
    """The sandbox died or the protocol broke; the message says why."""


class ToolError(Exception):
    """A tool call the host refuses (bad arguments, nothing to search); its message goes back to
    the sandboxed code as it is."""


def check_runtime(runtime: str) -> str:
    """`runtime` if it is one of :data:`RUNTIMES`, else ValueError."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
    return runtime


class SandboxSession(ABC):
    """One persistent REPL session of one RLM query; use it as a context manager."""

    session_id: str
    org_id: str

    @abstractmethod
    def load_context(self, context: str | list | dict) -> None:
        """Load the context into the namespace as `context` (once per session)."""

    @abstractmethod
    def execute(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """Run code in the persistent namespace."""

    @abstractmethod
    def get_variable(self, name: str) -> str:
        """`str()` of a variable of the namespace; KeyError if there is none."""

    @abstractmethod
    def close(self) -> None:
        """End the session and free what it holds (idempotent)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SandboxBackend(ABC):
    """Hands out sandbox sessions for an org.

    `name` says which backend it is (``local``, ``daytona``: the session row's `backend`);
    `exec_timeout_s` is the wall clock of one code execution unless a call says otherwise.
    """

    name: str
    exec_timeout_s: float | None = 120.0

    @abstractmethod
    def open_session(
        self,
        org_id: str,
        llm_handler: LLMHandler,
        *,
        prelude: str | None = None,
        session_id: str | None = None,
        runtime: str = "python",
        tool_handler: ToolHandler | None = None,
    ) -> SandboxSession:
        """Start a REPL session for `org_id`; `prelude` runs once and defines scaffold names.

        `runtime` is ``python`` or ``bun`` (JavaScript); the prelude is code of that runtime.
        `tool_handler` answers the session's tool calls (``search``); without one, every tool
        call gets an error.
        """

    @abstractmethod
    def close(self) -> None:
        """Release everything the backend holds."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class DaemonPool:
    """At most `max_workers` tasks at a time on daemon threads, started as needed.

    Unlike a `ThreadPoolExecutor`, whose threads the interpreter joins at exit, a task still
    running (an LLM request nobody waits for any more) never holds the process; `shutdown()`
    drops the tasks not started yet. Idle workers are reused first (one release of `_idle` per
    idle worker, as in `ThreadPoolExecutor`).
    """

    def __init__(self, max_workers: int, name: str) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self.name = name
        self._tasks: queue.SimpleQueue[tuple[Future, Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._workers = 0
        self._shut = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run `fn(*args)` on a worker; its outcome in the returned future."""
        future: Future = Future()
        with self._lock:
            if self._shut:
                raise RuntimeError(f"{self.name}: the pool is shut down")
            self._tasks.put((future, lambda: fn(*args)))
            if not self._idle.acquire(blocking=False) and self._workers < self.max_workers:
                self._workers += 1
                threading.Thread(
                    target=self._work, name=f"{self.name}_{self._workers}", daemon=True
                ).start()
        return future

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            future, call = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as exc:  # the future carries it to its reader
                    future.set_exception(exc)
            del task, future, call
            self._idle.release()

    def shutdown(self) -> None:
        """Cancel the tasks not started; the running ones finish on their own (unawaited)."""
        with self._lock:
            self._shut = True
            workers = self._workers
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in range(workers):
            self._tasks.put(None)


def tool_error_text(exc: BaseException) -> str:
    """The message a failed tool call sends back: a ToolError's own; of any other failure only
    its type (its text, which may name host paths, stays in the host's log)."""
    if isinstance(exc, ToolError):
        return str(exc)
    return f"an error on the host ({type(exc).__name__})"


class _Batch:
    """Answers of one `llm_request`, filled in by pool threads."""

    def __init__(self, request_id: str, size: int) -> None:
        self.request_id = request_id
        self.answers: list[str | None] = [None] * size
        self.errors: list[str] = []
        self.left = size
        self.lock = threading.Lock()


class ReplClient:
    """Host side of the REPL protocol over a line transport.

    `send_line(line)` writes one line (without newline handling: the client adds ``"\\n"``) to
    the server's stdin; `lines` yields the server's stdout lines (blocking) and ends when the
    server is gone. `kill()` stops the server process hard; `death_reason()` explains why the
    server ended (exit status, stderr tail). Batched prompts are answered concurrently, at most
    `max_llm_concurrency` handler calls at a time; tool calls (`tool_handler`) share that bound.
    """

    def __init__(
        self,
        send_line: Callable[[str], None],
        lines: Iterable[str],
        llm_handler: LLMHandler,
        *,
        max_llm_concurrency: int = 4,
        kill: Callable[[], None] | None = None,
        death_reason: Callable[[], str] | None = None,
        name: str = "sandbox",
        tool_handler: ToolHandler | None = None,
    ) -> None:
        if max_llm_concurrency < 1:
            raise ValueError("max_llm_concurrency must be at least 1")
        self.name = name
        self.llm_handler = llm_handler
        self.tool_handler = tool_handler
        self.llm_prompts_served = 0
        self.tool_calls_served = 0
        self.server_info: dict[str, Any] = {}
        self._send_line = send_line
        self._kill = kill
        self._death_reason = death_reason
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._send_lock = threading.Lock()
        self._request_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._dead: str | None = None
        self._llm_pool = DaemonPool(max_llm_concurrency, f"{name}-llm")
        self._reader = threading.Thread(
            target=self._pump, args=(lines,), name=f"{name}-reader", daemon=True
        )
        self._reader.start()

    # -- transport ------------------------------------------------------------------------

    def _pump(self, lines: Iterable[str]) -> None:
        """Reader thread: keep the server's protocol messages, drop everything else."""
        try:
            for line in lines:
                message = _parse_server_line(line)
                if message is not None:
                    self._inbox.put(message)
        except Exception as exc:  # a broken transport ends the session
            log.debug("%s: transport read failed: %s", self.name, exc)
        self._inbox.put(_EOF)

    def _send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, ensure_ascii=False)
        try:
            with self._send_lock:
                self._send_line(line + "\n")
        except Exception as exc:  # any transport failure means the same
            raise SandboxError(f"{self.name}: cannot write to the REPL server: {exc}") from exc

    @property
    def alive(self) -> bool:
        """False once the server died, was killed or shut down."""
        return self._dead is None

    def _mark_dead(self, reason: str) -> str:
        if self._dead is None:
            self._dead = reason
        return self._dead

    def _reason(self, fallback: str) -> str:
        detail = ""
        if self._death_reason is not None:
            try:
                detail = self._death_reason()
            except Exception as exc:
                detail = f"(no detail: {exc})"
        return f"{fallback}: {detail}" if detail else fallback

    # -- LLM bridge -----------------------------------------------------------------------

    def _serve_llm_request(self, message: dict[str, Any]) -> None:
        """Fan the prompts of one `llm_request` out to the handler pool."""
        request_id = str(message.get("id"))
        prompts = message.get("prompts")
        model = message.get("model")
        if not isinstance(prompts, list) or not prompts:
            self._reply_llm(request_id, error="llm_request without prompts")
            return
        batch = _Batch(request_id, len(prompts))
        for index, prompt in enumerate(prompts):
            try:
                future = self._llm_pool.submit(self._ask_one, str(prompt), model)
            except RuntimeError:  # the session is closing: nobody will read the answer
                return
            future.add_done_callback(lambda f, i=index: self._collect(batch, i, f))

    def _ask_one(self, prompt: str, model: str | None) -> str:
        answers = self.llm_handler([prompt], model)
        if not isinstance(answers, list) or len(answers) != 1:
            raise ValueError("the LLM handler must return one answer per prompt")
        return str(answers[0])

    def _collect(self, batch: _Batch, index: int, future: Future) -> None:
        if future.cancelled():  # dropped when the session closed
            return
        exc = future.exception()
        with batch.lock:
            if exc is None:
                batch.answers[index] = future.result()
            else:
                batch.errors.append(f"prompt {index}: {type(exc).__name__}: {exc}")
            batch.left -= 1
            done = batch.left == 0
        if not done:
            return
        with self._send_lock:
            self.llm_prompts_served += len(batch.answers)
        if batch.errors:
            self._reply_llm(batch.request_id, error="; ".join(batch.errors[:3]))
        else:
            self._reply_llm(batch.request_id, results=batch.answers)

    # -- tool bridge ----------------------------------------------------------------------

    def _serve_tool_request(self, message: dict[str, Any]) -> None:
        """Answer one `tool_request` on the pool: a `tool_result` with the result or an error."""
        request_id = str(message.get("id"))
        tool = message.get("tool")
        if not isinstance(tool, str) or not tool:
            self._reply_tool(request_id, error="tool_request without a tool name")
            return
        args = message.get("args")
        try:
            future = self._llm_pool.submit(self._run_tool, tool, args)
        except RuntimeError:  # the session is closing: nobody will read the answer
            return
        future.add_done_callback(lambda f: self._tool_done(request_id, tool, f))

    def _run_tool(self, tool: str, args: Any) -> Any:
        if self.tool_handler is None:
            raise ToolError("not available in this sandbox session")
        result = self.tool_handler(tool, args)
        json.dumps(result)  # a result that cannot travel is the host's error, said here
        return result

    def _tool_done(self, request_id: str, tool: str, future: Future) -> None:
        if future.cancelled():
            return
        with self._send_lock:
            self.tool_calls_served += 1
        exc = future.exception()
        if exc is None:
            self._reply_tool(request_id, result=future.result())
            return
        if not isinstance(exc, ToolError):
            log.warning("%s: tool %s failed on the host", self.name, tool, exc_info=exc)
        self._reply_tool(request_id, error=tool_error_text(exc))

    def _reply_tool(self, request_id: str, result: Any = None, error: str | None = None) -> None:
        message: dict[str, Any] = {"type": "tool_result", "id": request_id}
        if error is not None:
            message["error"] = error
        else:
            message["result"] = result
        try:
            self._send(message)
        except SandboxError:
            log.debug("%s: answer to %s not delivered (server gone)", self.name, request_id)

    def _reply_llm(
        self, request_id: str, results: list | None = None, error: str | None = None
    ) -> None:
        message: dict[str, Any] = {"type": "llm_result", "id": request_id}
        if error is not None:
            message["error"] = error
        else:
            message["results"] = results
        try:
            self._send(message)
        except SandboxError:
            log.debug("%s: answer to %s not delivered (server gone)", self.name, request_id)

    # -- requests -------------------------------------------------------------------------

    def wait_ready(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait for the server's `ready` line; SandboxError if it dies or stays silent."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                message = self._inbox.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                self.kill()
                raise SandboxError(
                    self._mark_dead(self._reason(f"{self.name}: no ready after {timeout_s} s"))
                ) from None
            if message is _EOF:
                raise SandboxError(
                    self._mark_dead(self._reason(f"{self.name}: the REPL server did not start"))
                )
            if message.get("type") == "ready":
                self.server_info = message
                return message

    def request(
        self, message: dict[str, Any], expect: str, timeout_s: float | None = None
    ) -> dict[str, Any] | None:
        """Send one request, answer LLM calls meanwhile, return the reply (None on timeout).

        On timeout the server is killed and the client is dead.
        """
        with self._request_lock:
            if self._dead is not None:
                raise SandboxError(self._dead)
            request_id = next(self._ids)
            self._send({**message, "id": request_id})
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while True:
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    self._mark_dead(
                        f"{self.name}: {message.get('type')} took over {timeout_s} s; "
                        "the REPL server was killed and this session is closed"
                    )
                    self.kill()
                    return None
                try:
                    reply = self._inbox.get(timeout=wait)
                except queue.Empty:
                    continue
                if reply is _EOF:
                    raise SandboxError(
                        self._mark_dead(self._reason(f"{self.name}: the REPL server died"))
                    )
                kind = reply.get("type")
                if kind == "llm_request":
                    self._serve_llm_request(reply)
                elif kind == "tool_request":
                    self._serve_tool_request(reply)
                elif kind == expect and reply.get("id") == request_id:
                    return reply
                elif kind == "error" and reply.get("id") in (request_id, None):
                    raise SandboxError(
                        f"{self.name}: the REPL server rejected {message.get('type')}: "
                        f"{reply.get('error')}"
                    )

    def execute(
        self,
        code: str,
        timeout_s: float | None,
        *,
        kill_grace_s: float = 2.0,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
        prelude: bool = False,
    ) -> ExecResult:
        """Run code; soft limit `timeout_s` in the server, hard kill `kill_grace_s` later."""
        started = time.perf_counter()
        message: dict[str, Any] = {
            "type": "exec_prelude" if prelude else "exec",
            "code": code,
            "max_output_chars": max_output_chars,
        }
        if timeout_s:
            message["timeout_s"] = timeout_s
        hard = None if not timeout_s else timeout_s + kill_grace_s
        reply = self.request(message, "result", hard)
        duration = time.perf_counter() - started
        if reply is None:
            error = (
                f"TimeoutError: execution exceeded {timeout_s} s and did not stop; the sandbox "
                "process was killed and this session is closed"
            )
            self._mark_dead(f"{self.name}: session closed after a timed-out execution")
            return ExecResult("", "", error, True, duration, None)
        return ExecResult(
            stdout=reply.get("stdout") or "",
            stderr=reply.get("stderr") or "",
            error=reply.get("error"),
            timed_out=bool(reply.get("timed_out")),
            duration_s=duration,
            final=reply.get("final"),
        )

    def load_context(
        self,
        *,
        data: Any = None,
        path: str | None = None,
        text: bool = False,
        timeout_s: float | None = 300.0,
    ) -> dict[str, Any]:
        """Load `context` inline (`data`) or from `path` (relative to the server's cwd)."""
        message: dict[str, Any] = {"type": "load_context"}
        if path is not None:
            message.update(path=path, format="text" if text else "json")
        else:
            message["data"] = data
        reply = self.request(message, "result", timeout_s)
        if reply is None:
            self._mark_dead(f"{self.name}: loading the context timed out")
            raise SandboxError(f"{self.name}: loading the context took over {timeout_s} s")
        return reply.get("info") or {}

    def get_variable(self, name: str, timeout_s: float | None = 60.0) -> str:
        """`str()` of a namespace variable; KeyError if it does not exist."""
        reply = self.request({"type": "get_var", "name": name}, "var", timeout_s)
        if reply is None:
            self._mark_dead(f"{self.name}: reading a variable timed out")
            raise SandboxError(f"{self.name}: reading {name!r} took over {timeout_s} s")
        if reply.get("error"):
            raise KeyError(f"{name}: {reply['error']}")
        return str(reply.get("value"))

    def kill(self) -> None:
        """Stop the server hard (if the transport can) and mark the client dead."""
        self._mark_dead(f"{self.name}: the REPL server was killed")
        if self._kill is not None:
            try:
                self._kill()
            except Exception as exc:
                log.warning("%s: kill failed: %s", self.name, exc)

    def close(self, timeout_s: float = 2.0) -> None:
        """Ask the server to exit; kill it if it does not; stop the LLM pool (prompts still
        being answered are abandoned, on daemon threads)."""
        if self._dead is None:
            with contextlib.suppress(SandboxError):
                self.request({"type": "shutdown"}, "bye", timeout_s)
            self._mark_dead(f"{self.name}: the session is closed")
        self._llm_pool.shutdown()


def _parse_server_line(line: str | bytes) -> dict[str, Any] | None:
    """A server message, or None for anything else (echoed input, noise)."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if isinstance(message, dict) and message.get("type") in SERVER_MESSAGE_TYPES:
        return message
    return None


class ReplSession(SandboxSession):
    """A sandbox session driven through a :class:`ReplClient`.

    Backends subclass it to say how a context travels (`load_context`, default inline) and what
    to free at the end (`_release`, called once by `close`).
    """

    def __init__(
        self,
        client: ReplClient,
        *,
        session_id: str,
        org_id: str,
        exec_timeout_s: float | None = 120.0,
        kill_grace_s: float = 2.0,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.org_id = org_id
        self.exec_timeout_s = exec_timeout_s
        self.kill_grace_s = kill_grace_s
        self.max_output_chars = max_output_chars
        self.context_info: dict[str, Any] = {}
        self._closed = False

    def run_prelude(self, code: str) -> None:
        """Run scaffold code once; SandboxError if it fails (a bug on our side)."""
        result = self.client.execute(code, None, prelude=True)
        if result.error:
            raise SandboxError(f"{self.client.name}: the prelude failed:\n{result.error}")

    def load_context(self, context: str | list | dict) -> None:
        """Send the context inline in one protocol message."""
        self.context_info = self.client.load_context(data=context)

    def execute(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """Run code; `timeout_s` defaults to the session's `exec_timeout_s`."""
        if self._closed:
            raise SandboxError(f"{self.client.name}: the session is closed")
        return self.client.execute(
            code,
            timeout_s if timeout_s is not None else self.exec_timeout_s,
            kill_grace_s=self.kill_grace_s,
            max_output_chars=self.max_output_chars,
        )

    def get_variable(self, name: str) -> str:
        """`str()` of a namespace variable; KeyError if it does not exist."""
        return self.client.get_variable(name)

    @property
    def alive(self) -> bool:
        """True while the session can still run code."""
        return not self._closed and self.client.alive

    @property
    def llm_prompts_served(self) -> int:
        """How many sub-LLM prompts this session sent to the host so far."""
        return self.client.llm_prompts_served

    @property
    def tool_calls_served(self) -> int:
        """How many tool calls (``search``) this session sent to the host so far."""
        return self.client.tool_calls_served

    def close(self) -> None:
        """Shut the server down and release the sandbox resources (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.client.close()
        finally:
            self._release()

    def _release(self) -> None:
        """Free backend resources (process, directory, remote session). Default: nothing."""
