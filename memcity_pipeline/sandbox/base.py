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

**Whatever the sandbox sends is bounded on the host.** Code in the sandbox can reach the
server's channel and write any line, so the host trusts nothing it reads:

- A line is read at most :data:`MAX_LINE_BYTES` long; a longer one ends the session with a
  :class:`SandboxError` saying so (honest servers cut outputs and final answers and refuse to
  send larger requests, so only code writing to the channel itself gets there).
- Messages read and not yet handled wait in an inbox of at most :data:`MAX_INBOX_BYTES`; past
  it the reader stops reading (the server's writes then block in the sandbox).
- Sub-call prompts and tool calls accepted and not yet answered (queued, running, or answered
  but not yet written back) are at most :data:`MAX_PENDING_CALLS` per session, their requests
  at most :data:`MAX_PENDING_BYTES`. A request beyond either bound (a batch of more prompts
  than the bound included) is **refused** at once: its answer is an error the code receives
  (``llm_query failed: too many calls are waiting for the host ...``) and the session goes on.
  A server that keeps sending requests while not reading the refusals (over
  :data:`MAX_UNWRITTEN_REFUSALS` refusals unwritten) is ended with a clear error.
- Everything is written to the server by one writer thread per session, in order, so neither
  the thread that waits for a reply nor a call's thread ever blocks on a server that stops
  reading its input; the request's deadline still applies.
- ``stdout``, ``stderr`` and ``error`` of a result are cut to the session's
  ``max_output_chars`` and a final answer (and a variable read with :meth:`get_variable`) to
  :data:`MAX_FINAL_CHARS` on the host too, whatever the server sent.

**Clean shutdown.** Closing a session stops serving its calls (requests that arrive are
dropped, queued calls cancelled), ends the server, and waits up to :data:`CLOSE_WAIT_S` for
the tool calls still running. Tool calls run on normal (non-daemon) threads: a search runs
native code (ONNX Runtime, numpy, bm25s), which must never be running while the interpreter
finalizes, so even one still running past the wait holds the process's exit until it returns.
Sub-calls (LLM requests) run on daemon threads and are abandoned at close: they end by their
own time limit and never hold the process.

This module stays whole: the backend interface and the host side of the REPL protocol are one
contract (the message pump, brokered `llm_query` batches and the timeout tiers are read
together).
"""

import contextlib
import functools
import itertools
import json
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

log = logging.getLogger(__name__)

LLMHandler = Callable[[list[str], str | None], list[str]]
"""Host-side LLM access: ``(prompts, model) -> answers`` (one answer per prompt)."""

ToolHandler = Callable[[str, Any], Any]
"""Host-side tools: ``(tool name, arguments as the sandbox sent them) -> a JSON-serialisable
result``; raises :class:`ToolError` to refuse a call with a message for the sandboxed code. It
runs on a normal (non-daemon) thread and must return in bounded time (a search does): the
process waits for it at exit."""

REPL_SERVER_PATH = Path(__file__).resolve().parent / "servers" / "repl_server.py"
JS_REPL_SERVER_PATH = REPL_SERVER_PATH.with_name("repl_server.js")
RUNTIMES = ("python", "bun")
"""REPL runtimes: ``python`` (repl_server.py) and ``bun`` (repl_server.js under Bun or Node.js)."""
SERVER_MESSAGE_TYPES = frozenset(
    {"ready", "result", "var", "llm_request", "tool_request", "error", "bye"}
)
DEFAULT_MAX_OUTPUT_CHARS = 100_000
MAX_OUTPUT_CHARS = 1_000_000
"""The largest `max_output_chars` a session takes: a result line must stay under
:data:`MAX_LINE_BYTES` (three outputs and a final answer, up to 6 bytes a character escaped)."""
MAX_LINE_BYTES = 16 << 20
"""The longest line (one protocol message) the host reads from a REPL server; a longer one ends
the session. The servers refuse to send a request over it (both define the same number)."""
MAX_INBOX_BYTES = 16 << 20
"""Server messages read and not yet handled, in bytes (one line of :data:`MAX_LINE_BYTES` is
always taken); past it the reader waits, and the server's writes block in the sandbox."""
MAX_PENDING_CALLS = 256
"""Sub-call prompts and tool calls of one session accepted and not yet answered back; a request
that would go past it is refused with an error for the code (64 times the default concurrency:
honest code that fans out, a JavaScript ``Promise.all`` of searches, stays under it)."""
MAX_PENDING_BYTES = 32 << 20
"""The total size of the requests counted in :data:`MAX_PENDING_CALLS` (their lines, in bytes):
two of the largest requests a server may send."""
MAX_UNWRITTEN_REFUSALS = 10_000
"""Refusals waiting to be written to a server that does not read them (a few MB at most); past
it the session ends. A burst of requests sent without awaiting (a JavaScript ``Promise.all`` of
thousands of searches) is answered with refusals before the server reads them."""
MAX_FINAL_CHARS = 1_000_000
"""A final answer (and a variable read by `get_variable`) is cut to this many characters."""
MAX_NAME_CHARS = 200
"""The longest tool or model name a request may carry."""
CLOSE_WAIT_S = 30.0
"""How long closing a session waits for its tool calls still running (a search takes well under
a second; the first one loads the embedder)."""
TRUNCATION_NOTE_CHARS = 100
"""Room left past a cut for the server's own note (``[... N more characters truncated ...]``)."""
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


class ChannelOverflow(SandboxError):
    """A REPL server sent more than the host takes (raised by a transport's reader; the
    session ends with its message)."""


class LineTooLong(ChannelOverflow):
    """A REPL server sent a line over :data:`MAX_LINE_BYTES` (raised by a transport's reader)."""

    def __init__(self, limit: int = MAX_LINE_BYTES) -> None:
        super().__init__(
            f"the REPL server sent a line over {limit:,} bytes (the protocol's limit); "
            "the session is closed"
        )


def read_lines(stream: IO[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """The lines of a byte stream, each at most `limit` bytes (newline excluded); a longer line
    raises :class:`LineTooLong` once `limit` + 1 bytes of it were read, never more."""
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            raise LineTooLong(limit)
        yield line


def cut_text(value: Any, limit: int) -> str:
    """`value` as text, cut to `limit` characters with a note (room is left for a note the
    server added itself: see :data:`TRUNCATION_NOTE_CHARS`)."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    if len(text) <= limit + TRUNCATION_NOTE_CHARS:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} more characters truncated ...]\n"


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


class CallPool:
    """The host calls of one session: at most `max_workers` at a time, the others queued.

    Each task runs on a thread started for it (a worker goes on with the next queued task of
    its own kind), a daemon thread or not as submitted: a sub-call (an LLM request nobody may
    wait for any more) must never hold the process, while a tool call (native code: ONNX
    Runtime, numpy, bm25s) must never run while the interpreter finalizes, which joins normal
    threads first. `shutdown(wait_s)` cancels the queued tasks and waits up to `wait_s` for the
    running non-daemon ones. The queue's length is its caller's to bound
    (:data:`MAX_PENDING_CALLS`).
    """

    def __init__(self, max_workers: int, name: str) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self.name = name
        self._queue: deque[tuple[Future, Callable[[], Any], bool]] = deque()
        self._cond = threading.Condition()
        self._running = 0
        self._running_normal = 0  # non-daemon tasks running
        self._started = 0
        self._shut = False

    def submit(self, fn: Callable[..., Any], *args: Any, daemon: bool = True) -> Future:
        """Run `fn(*args)` on a (daemon, or not) thread; its outcome in the returned future."""
        future: Future = Future()
        task = (future, functools.partial(fn, *args), daemon)
        with self._cond:
            if self._shut:
                raise RuntimeError(f"{self.name}: the pool is shut down")
            if self._running < self.max_workers:
                self._running += 1
                self._start(task)
            else:
                self._queue.append(task)
        return future

    def _start(self, task: tuple[Future, Callable[[], Any], bool]) -> None:
        """Start a thread for `task` (a slot is already counted for it; lock held)."""
        self._started += 1
        if not task[2]:
            self._running_normal += 1
        thread = threading.Thread(
            target=self._work, args=(task,), name=f"{self.name}_{self._started}", daemon=task[2]
        )
        try:
            thread.start()
        except RuntimeError as exc:  # no new thread at interpreter shutdown
            self._running -= 1
            if not task[2]:
                self._running_normal -= 1
            task[0].set_exception(exc)

    def _work(self, task: tuple[Future, Callable[[], Any], bool]) -> None:
        daemon = threading.current_thread().daemon
        while True:
            future, call, _ = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as exc:  # the future carries it to its reader
                    future.set_exception(exc)
            del future, call
            with self._cond:
                after = self._queue.popleft() if self._queue and not self._shut else None
                if after is not None and after[2] == daemon:
                    task = after  # same kind: this thread takes it
                    continue
                # this thread ends: its slot passes to `after` (on a thread of its kind) or frees
                if not daemon:
                    self._running_normal -= 1
                if after is not None:
                    self._start(after)
                else:
                    self._running -= 1
                self._cond.notify_all()
                return

    def shutdown(self, wait_s: float = 0.0) -> int:
        """Cancel the queued tasks (`submit` refuses new ones); wait up to `wait_s` for the
        running non-daemon tasks (daemon ones end on their own, unawaited). Returns how many
        non-daemon tasks still run."""
        with self._cond:
            self._shut = True
            queued, self._queue = list(self._queue), deque()
        for future, _, _ in queued:
            future.cancel()
        deadline = time.monotonic() + wait_s
        with self._cond:
            while self._running_normal and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return self._running_normal


def tool_error_text(exc: BaseException) -> str:
    """The message a failed tool call sends back: a ToolError's own; of any other failure only
    its type (its text, which may name host paths, stays in the host's log)."""
    if isinstance(exc, ToolError):
        return str(exc)
    return f"an error on the host ({type(exc).__name__})"


class _Batch:
    """Answers of one `llm_request`, filled in by pool threads; `nbytes` is its request's size."""

    def __init__(self, request_id: str, size: int, nbytes: int) -> None:
        self.request_id = request_id
        self.answers: list[str | None] = [None] * size
        self.errors: list[str] = []
        self.left = size
        self.nbytes = nbytes
        self.lock = threading.Lock()


class _Inbox:
    """Messages read from the server and not yet handled, at most `max_bytes` of them (by the
    size of their lines; one message is always taken): `put` waits for room. `close()` drops
    what is left and makes every `get` answer end-of-stream."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: deque[tuple[Any, int]] = deque()
        self._bytes = 0
        self._closed = False
        self._cond = threading.Condition()

    def put(self, message: Any, size: int = 0) -> None:
        """Add a message of `size` bytes, waiting while the inbox is full (never for `_EOF`)."""
        with self._cond:
            while (
                message is not _EOF
                and not self._closed
                and self._items
                and self._bytes + size > self.max_bytes
            ):
                self._cond.wait()
            if self._closed:
                return
            self._items.append((message, size))
            self._bytes += size
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> tuple[Any, int]:
        """The next message and its size; `queue.Empty` after `timeout` seconds without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._closed:
                    return _EOF, 0
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise queue.Empty
                self._cond.wait(left)
            message, size = self._items.popleft()
            self._bytes -= size
            self._cond.notify_all()
            return message, size

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()


class ReplClient:
    """Host side of the REPL protocol over a line transport.

    `send_line(line)` writes one line (without newline handling: the client adds ``"\\n"``) to
    the server's stdin (it may block: only the client's writer thread calls it); `lines` yields
    the server's stdout lines (blocking), each at most :data:`MAX_LINE_BYTES` (a transport raises
    :class:`LineTooLong` for a longer one, see :func:`read_lines`, and any
    :class:`ChannelOverflow` when the server sent more than it takes), and ends when the server
    is gone. `kill()` stops the server process hard; `death_reason()` explains why the server ended
    (exit status, stderr tail). Batched prompts are answered concurrently, at most
    `max_llm_concurrency` handler calls at a time; tool calls (`tool_handler`) share that bound.
    What the server sends is bounded as the module docstring says.
    """

    def __init__(
        self,
        send_line: Callable[[str], None],
        lines: Iterable[str | bytes],
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
        self.calls_refused = 0
        self.server_info: dict[str, Any] = {}
        self._send_line = send_line
        self._kill = kill
        self._death_reason = death_reason
        self._inbox = _Inbox(MAX_INBOX_BYTES)
        self._outbox: deque[tuple[str, Callable[[], None] | None] | None] = deque()
        self._out_cond = threading.Condition()
        self._refusals_unwritten = 0
        self._pending_lock = threading.Lock()
        self._pending_calls = 0
        self._pending_bytes = 0
        self._closing = False
        self._request_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._dead: str | None = None
        self._pool = CallPool(max_llm_concurrency, f"{name}-calls")
        self._reader = threading.Thread(
            target=self._pump, args=(lines,), name=f"{name}-reader", daemon=True
        )
        self._writer = threading.Thread(target=self._write, name=f"{name}-writer", daemon=True)
        self._reader.start()
        self._writer.start()

    # -- transport ------------------------------------------------------------------------

    def _pump(self, lines: Iterable[str | bytes]) -> None:
        """Reader thread: keep the server's protocol messages, drop everything else; a line
        over :data:`MAX_LINE_BYTES` ends the session."""
        try:
            for line in lines:
                if len(line) > MAX_LINE_BYTES + 2:  # a transport that does not check
                    raise LineTooLong()
                message = _parse_server_line(line)
                if message is not None:
                    self._inbox.put(message, len(line))
        except ChannelOverflow as exc:
            self._end(f"{self.name}: {exc}")
        except Exception as exc:  # a broken transport ends the session
            log.debug("%s: transport read failed: %s", self.name, exc)
        self._inbox.put(_EOF)

    def _post(
        self,
        message: dict[str, Any],
        on_written: Callable[[], None] | None = None,
        *,
        refusal: bool = False,
    ) -> None:
        """Queue one message for the writer thread (dropped once the session is dead)."""
        line = json.dumps(message, ensure_ascii=False) + "\n"
        with self._out_cond:
            if self._dead is not None:
                return
            if refusal:
                if self._refusals_unwritten >= MAX_UNWRITTEN_REFUSALS:
                    flooding = True
                else:
                    flooding = False
                    self._refusals_unwritten += 1
                    on_written = self._refusal_written
            if not refusal or not flooding:
                self._outbox.append((line, on_written))
                self._out_cond.notify()
                return
        self._end(
            f"{self.name}: the sandboxed code kept sending requests without reading the answers "
            f"(over {MAX_UNWRITTEN_REFUSALS:,} refused requests unread); the session is closed"
        )

    def _refusal_written(self) -> None:
        with self._out_cond:
            self._refusals_unwritten -= 1

    def _write(self) -> None:
        """Writer thread: send the queued messages in order until the session is dead."""
        while True:
            with self._out_cond:
                while not self._outbox:
                    self._out_cond.wait()
                item = self._outbox.popleft()
            if item is None:
                return
            line, on_written = item
            try:
                self._send_line(line)
            except Exception as exc:  # any transport failure means the same
                self._end(f"{self.name}: cannot write to the REPL server: {exc}")
                return
            if on_written is not None:
                on_written()

    def _end(self, reason: str) -> None:
        """End the session for `reason`: mark it dead and kill the server."""
        self._mark_dead(reason)
        self.kill()

    @property
    def alive(self) -> bool:
        """False once the server died, was killed or shut down."""
        return self._dead is None

    @property
    def closing(self) -> bool:
        """True once `close()` began: no call is served any more (queued ones were dropped)."""
        return self._closing

    def _mark_dead(self, reason: str) -> str:
        with self._out_cond:
            if self._dead is None:
                self._dead = reason
                self._outbox.clear()
                self._outbox.append(None)  # the writer stops
                self._out_cond.notify()
        return self._dead

    def _reason(self, fallback: str) -> str:
        detail = ""
        if self._death_reason is not None:
            try:
                detail = self._death_reason()
            except Exception as exc:
                detail = f"(no detail: {exc})"
        return f"{fallback}: {detail}" if detail else fallback

    # -- bounds on calls ------------------------------------------------------------------

    def _admit(self, calls: int, nbytes: int) -> str | None:
        """Count a request's `calls` (of `nbytes`) as pending, or say why it is refused."""
        with self._pending_lock:
            if calls > MAX_PENDING_CALLS:
                return (
                    f"a batch of {calls:,} prompts is over the limit of {MAX_PENDING_CALLS} "
                    "calls waiting for the host; send smaller batches"
                )
            if (
                self._pending_calls + calls > MAX_PENDING_CALLS
                or self._pending_bytes + nbytes > MAX_PENDING_BYTES
            ):
                return (
                    f"too many calls are waiting for the host (at most {MAX_PENDING_CALLS} "
                    f"sub-call prompts and tool calls, {MAX_PENDING_BYTES >> 20} MiB of "
                    "requests, per session); wait for answers before sending more"
                )
            self._pending_calls += calls
            self._pending_bytes += nbytes
            return None

    def _release(self, calls: int, nbytes: int) -> None:
        with self._pending_lock:
            self._pending_calls -= calls
            self._pending_bytes -= nbytes

    # -- LLM bridge -----------------------------------------------------------------------

    def _serve_llm_request(self, message: dict[str, Any], nbytes: int) -> None:
        """Fan the prompts of one `llm_request` out to the pool (or refuse it at once)."""
        if self._closing:
            return
        request_id = str(message.get("id"))[:MAX_NAME_CHARS]
        prompts = message.get("prompts")
        model = message.get("model")
        if not isinstance(prompts, list) or not prompts:
            self._refuse("llm_result", request_id, "llm_request without prompts")
            return
        if model is not None and (not isinstance(model, str) or len(model) > MAX_NAME_CHARS):
            self._refuse("llm_result", request_id, "the model must be a name (a short string)")
            return
        refused = self._admit(len(prompts), nbytes)
        if refused is not None:
            self._refuse("llm_result", request_id, refused)
            return
        batch = _Batch(request_id, len(prompts), nbytes)
        for index, prompt in enumerate(prompts):
            try:
                future = self._pool.submit(self._ask_one, str(prompt), model)
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
        with self._pending_lock:
            self.llm_prompts_served += len(batch.answers)
        message: dict[str, Any] = {"type": "llm_result", "id": batch.request_id}
        if batch.errors:
            message["error"] = "; ".join(batch.errors[:3])
        else:
            message["results"] = batch.answers
        calls = len(batch.answers)
        self._post(message, lambda: self._release(calls, batch.nbytes))

    # -- tool bridge ----------------------------------------------------------------------

    def _serve_tool_request(self, message: dict[str, Any], nbytes: int) -> None:
        """Answer one `tool_request` on the pool (a normal thread, see :class:`CallPool`): a
        `tool_result` with the result or an error; or refuse it at once."""
        if self._closing:
            return
        request_id = str(message.get("id"))[:MAX_NAME_CHARS]
        tool = message.get("tool")
        if not isinstance(tool, str) or not tool or len(tool) > MAX_NAME_CHARS:
            self._refuse("tool_result", request_id, "tool_request without a tool name")
            return
        refused = self._admit(1, nbytes)
        if refused is not None:
            self._refuse("tool_result", request_id, refused)
            return
        args = message.get("args")
        try:
            future = self._pool.submit(self._run_tool, tool, args, daemon=False)
        except RuntimeError:  # the session is closing: nobody will read the answer
            return
        future.add_done_callback(lambda f: self._tool_done(request_id, tool, nbytes, f))

    def _run_tool(self, tool: str, args: Any) -> Any:
        if self.tool_handler is None:
            raise ToolError("not available in this sandbox session")
        result = self.tool_handler(tool, args)
        json.dumps(result)  # a result that cannot travel is the host's error, said here
        return result

    def _tool_done(self, request_id: str, tool: str, nbytes: int, future: Future) -> None:
        if future.cancelled():
            return
        with self._pending_lock:
            self.tool_calls_served += 1
        exc = future.exception()
        message: dict[str, Any] = {"type": "tool_result", "id": request_id}
        if exc is None:
            message["result"] = future.result()
        else:
            if not isinstance(exc, ToolError):
                log.warning("%s: tool %s failed on the host", self.name, tool, exc_info=exc)
            message["error"] = tool_error_text(exc)
        self._post(message, lambda: self._release(1, nbytes))

    def _refuse(self, kind: str, request_id: str, error: str) -> None:
        """Answer a request with an error at once (counted in `calls_refused`)."""
        with self._pending_lock:
            self.calls_refused += 1
        self._post({"type": kind, "id": request_id, "error": error}, refusal=True)

    # -- requests -------------------------------------------------------------------------

    def wait_ready(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait for the server's `ready` line; SandboxError if it dies or stays silent."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                message, _ = self._inbox.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                self.kill()
                raise SandboxError(
                    self._mark_dead(self._reason(f"{self.name}: no ready after {timeout_s} s"))
                ) from None
            if message is _EOF:
                raise SandboxError(
                    self._dead
                    or self._mark_dead(self._reason(f"{self.name}: the REPL server did not start"))
                )
            if message.get("type") == "ready":
                self.server_info = message
                return message

    def request(
        self, message: dict[str, Any], expect: str, timeout_s: float | None = None
    ) -> dict[str, Any] | None:
        """Send one request, answer LLM and tool calls meanwhile, return the reply (None on
        timeout).

        On timeout the server is killed and the client is dead.
        """
        with self._request_lock:
            if self._dead is not None:
                raise SandboxError(self._dead)
            request_id = next(self._ids)
            self._post({**message, "id": request_id})
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
                    reply, nbytes = self._inbox.get(timeout=wait)
                except queue.Empty:
                    continue
                if reply is _EOF:
                    raise SandboxError(
                        self._dead  # ended by the host, which said why
                        or self._mark_dead(self._reason(f"{self.name}: the REPL server died"))
                    )
                kind = reply.get("type")
                if kind == "llm_request":
                    self._serve_llm_request(reply, nbytes)
                elif kind == "tool_request":
                    self._serve_tool_request(reply, nbytes)
                elif kind == expect and reply.get("id") == request_id:
                    return reply
                elif kind == "error" and reply.get("id") in (request_id, None):
                    raise SandboxError(
                        f"{self.name}: the REPL server rejected {message.get('type')}: "
                        f"{cut_text(reply.get('error'), 2000)}"
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
        """Run code; soft limit `timeout_s` in the server, hard kill `kill_grace_s` later.

        The result's outputs are cut to `max_output_chars` (at most :data:`MAX_OUTPUT_CHARS`)
        and a final answer to :data:`MAX_FINAL_CHARS`, whatever the server sent.
        """
        max_output_chars = min(max_output_chars, MAX_OUTPUT_CHARS)
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
        error = reply.get("error")
        return ExecResult(
            stdout=cut_text(reply.get("stdout"), max_output_chars),
            stderr=cut_text(reply.get("stderr"), max_output_chars),
            error=None if error is None else cut_text(error, max_output_chars),
            timed_out=bool(reply.get("timed_out")),
            duration_s=duration,
            final=_bounded_final(reply.get("final")),
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
        info = reply.get("info")
        return info if isinstance(info, dict) else {}

    def get_variable(self, name: str, timeout_s: float | None = 60.0) -> str:
        """`str()` of a namespace variable (cut to :data:`MAX_FINAL_CHARS`); KeyError if it does
        not exist."""
        reply = self.request({"type": "get_var", "name": name}, "var", timeout_s)
        if reply is None:
            self._mark_dead(f"{self.name}: reading a variable timed out")
            raise SandboxError(f"{self.name}: reading {name!r} took over {timeout_s} s")
        if reply.get("error"):
            raise KeyError(f"{name}: {cut_text(reply['error'], 2000)}")
        return cut_text(reply.get("value"), MAX_FINAL_CHARS)

    def kill(self) -> None:
        """Stop the server hard (if the transport can) and mark the client dead."""
        self._mark_dead(f"{self.name}: the REPL server was killed")
        if self._kill is not None:
            try:
                self._kill()
            except Exception as exc:
                log.warning("%s: kill failed: %s", self.name, exc)

    def close(self, timeout_s: float = 2.0, wait_s: float = CLOSE_WAIT_S) -> None:
        """Stop serving calls, ask the server to exit, end what is left of it (`kill`), and wait
        up to `wait_s` for the tool calls still running (sub-calls are abandoned, on daemon
        threads)."""
        self._pool.shutdown()  # queued calls are cancelled, new ones refused
        self._closing = True
        if self._dead is None:
            with contextlib.suppress(SandboxError):
                self.request({"type": "shutdown"}, "bye", timeout_s)
            self._mark_dead(f"{self.name}: the session is closed")
        if self._kill is not None:  # what the code left running sends no more requests
            try:
                self._kill()
            except Exception as exc:
                log.warning("%s: kill failed: %s", self.name, exc)
        still_running = self._pool.shutdown(wait_s)
        if still_running:
            log.warning(
                "%s: %d tool call(s) still running %.0f s after the session closed; the "
                "process waits for them at exit",
                self.name,
                still_running,
                wait_s,
            )
        self._inbox.close()


def _bounded_final(final: Any) -> dict | None:
    """The `final` of a result as the host keeps it: a dict whose `value` is cut to
    :data:`MAX_FINAL_CHARS` (anything else becomes `{"value": str(x)}`, as the servers do)."""
    if final is None:
        return None
    if not isinstance(final, dict):
        final = {"value": final}
    bounded = dict(final)
    if "value" in bounded:
        bounded["value"] = cut_text(bounded["value"], MAX_FINAL_CHARS)
    return bounded


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
