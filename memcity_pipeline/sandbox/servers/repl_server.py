"""A persistent Python REPL that speaks newline-delimited JSON on stdin/stdout (protocol 1).

Standalone and standard-library only (Python >= 3.11); run it inside a sandbox as
``python3 -I -u repl_server.py``. One namespace lives for the whole process.

Protocol (full text: ``REPL_PROTOCOL.md`` beside this file). One JSON object per line.

host -> server (stdin)::

    {"type": "load_context", "id": .., "path": "ctx.json", "format": "json" | "text"}
    {"type": "load_context", "id": .., "data": <any JSON value>}
    {"type": "exec_prelude", "id": .., "code": "..."}        # names it defines are scaffold
    {"type": "exec", "id": .., "code": "...", "timeout_s": 30, "max_output_chars": 100000}
    {"type": "get_var", "id": .., "name": "x"}
    {"type": "llm_result", "id": <llm_request id>, "results": ["..."]}   # or "error": "..."
    {"type": "tool_result", "id": <tool_request id>, "result": <any JSON>}  # or "error": "..."
    {"type": "shutdown", "id": ..}

server -> host (stdout)::

    {"type": "ready", "protocol": 1, "python": "3.12.1", "pid": 7}
    {"type": "result", "id": .., "stdout": "", "stderr": "", "error": null, "timed_out": false,
     "final": null, "duration_s": 0.001, "info": {}}
    {"type": "var", "id": .., "name": "x", "value": "42", "value_type": "int", "error": null}
    {"type": "llm_request", "id": "3.llm.1", "exec_id": 3, "prompts": ["..."], "model": null}
    {"type": "tool_request", "id": "3.tool.2", "exec_id": 3, "tool": "search",
     "args": {"query": "...", "k": 10}}
    {"type": "error", "id": .., "error": "unknown message type 'foo'"}
    {"type": "bye", "id": ..}

In the namespace: ``context``, ``llm_query(prompt, model=None) -> str``,
``llm_query_batched(prompts, model=None) -> list[str]``, ``search(query, k=10) -> list`` (a
tool answered by the host, which checks the arguments; one that is not a JSON value is refused
here), ``SHOW_VARS() -> str``. Setting the
variable ``__final__`` reports it as ``final`` in that execution's result (the hook for
``FINAL`` / ``FINAL_VAR`` defined by a prelude). ``timeout_s`` is soft (``SIGALRM`` raises
``TimeoutError`` in the code, the session lives); the host enforces a hard limit by killing.
A request over ``MAX_LINE_BYTES`` (the host's limit on a line) is refused here, in the code; a
final answer or a variable's text is cut to ``MAX_FINAL_CHARS``.

This script stays whole: it is copied into sandboxes as one standalone file (standard library
only), so it cannot import siblings.
"""

import io
import json
import linecache
import os
import queue
import signal
import sys
import threading
import time
import traceback
import types
from typing import Any

PROTOCOL_VERSION = 1
DEFAULT_MAX_OUTPUT_CHARS = 100_000
MAX_LINE_BYTES = 16 << 20  # the host's limit on one line: a longer request is refused here
MAX_FINAL_CHARS = 1_000_000  # a final answer or a variable's text is cut to this
HOST_TYPES = {
    "load_context",
    "exec_prelude",
    "exec",
    "get_var",
    "llm_result",
    "tool_result",
    "shutdown",
}
REPLY_TYPES = {"llm_result", "tool_result"}


class ExecTimeout(BaseException):
    """Raised inside user code when its soft wall-clock limit passes (not an `Exception`)."""


class CappedText(io.TextIOBase):
    """A text sink that keeps the first `limit` characters and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = 0
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:
            room = self.limit - self.kept
            if room > 0:
                piece = text[:room]
                self.parts.append(piece)
                self.kept += len(piece)
            self.dropped += max(0, len(text) - max(room, 0))
        return len(text)

    def getvalue(self) -> str:
        """The kept text, with a note when something was cut."""
        text = "".join(self.parts)
        if self.dropped:
            text += f"\n[... {self.dropped} more characters truncated ...]\n"
        return text


class Channel:
    """The protocol channel: a private copy of stdout, written one whole line at a time."""

    def __init__(self) -> None:
        self.fd = os.dup(1)
        # Stray fd-level writes of user code (os.system, C extensions) go to stderr instead.
        os.dup2(2, 1)
        self.lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        """Write one message; SIGALRM is held off so a line is never cut by a timeout."""
        self.send_line(self.encode(message))

    @staticmethod
    def encode(message: dict[str, Any]) -> bytes:
        """One message as the line that carries it."""
        return (json.dumps(message, default=str, ensure_ascii=False) + "\n").encode()

    def send_line(self, data: bytes) -> None:
        """Write one encoded line whole (see `send`)."""
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            with self.lock:
                view = memoryview(data)
                while view:
                    written = os.write(self.fd, view)
                    view = view[written:]
        finally:
            if in_main:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


class Server:
    """The REPL: one namespace, a stdin reader thread, and the command loop."""

    def __init__(self) -> None:
        self.channel = Channel()
        self.commands: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.pending: dict[str, dict[str, Any]] = {}
        self.pending_lock = threading.Lock()
        self.llm_counter = 0
        self.cell = 0
        self.current_exec: Any = None
        self.stdin_closed = False
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        self.namespace.update(
            context=None,
            llm_query=self.llm_query,
            llm_query_batched=self.llm_query_batched,
            search=self.search,
            SHOW_VARS=self.show_vars,
        )
        self.scaffold = set(self.namespace)

    # -- reading ---------------------------------------------------------------------------

    def read_stdin(self) -> None:
        """Reader thread: answers go to waiting llm calls, everything else to the queue."""
        stream = sys.stdin.buffer
        for raw in stream:
            line = raw.strip()
            if not line:
                continue
            try:
                message = json.loads(line)
            except ValueError as exc:
                self.channel.send({"type": "error", "id": None, "error": f"bad JSON: {exc}"})
                continue
            if not isinstance(message, dict):
                self.channel.send({"type": "error", "id": None, "error": "not a JSON object"})
                continue
            if message.get("type") in REPLY_TYPES:
                self.deliver_reply(message)
            else:
                self.commands.put(message)
        self.stdin_closed = True
        with self.pending_lock:
            for slot in self.pending.values():
                slot["error"] = "the host closed the channel"
                slot["event"].set()
        self.commands.put(None)

    def deliver_reply(self, message: dict[str, Any]) -> None:
        """Hand an `llm_result` / `tool_result` to the call waiting for it (unknown ids are
        dropped)."""
        with self.pending_lock:
            slot = self.pending.get(str(message.get("id")))
        if slot is None:
            return
        slot["message"] = message
        slot["event"].set()

    # -- scaffold functions ----------------------------------------------------------------

    def request_host(self, kind: str, fields: dict[str, Any], what: str) -> dict[str, Any]:
        """Send one `<kind>_request` and block until its reply; RuntimeError("<what> failed:
        ...") when the host answers with an error or is gone."""
        if self.stdin_closed:
            raise RuntimeError(f"{what} failed: the host closed the channel")
        with self.pending_lock:
            self.llm_counter += 1
            request_id = f"{self.current_exec}.{kind}.{self.llm_counter}"
            slot: dict[str, Any] = {"event": threading.Event()}
            self.pending[request_id] = slot
        try:
            line = self.channel.encode(
                {
                    "type": f"{kind}_request",
                    "id": request_id,
                    "exec_id": self.current_exec,
                    **fields,
                }
            )
            if len(line) > MAX_LINE_BYTES:
                raise RuntimeError(
                    f"{what} failed: the request is {len(line) / (1 << 20):.1f} MiB; at most "
                    f"{MAX_LINE_BYTES >> 20} MiB travel in one call (send less at once)"
                )
            self.channel.send_line(line)
            slot["event"].wait()
        finally:
            with self.pending_lock:
                self.pending.pop(request_id, None)
        message = slot.get("message") or {}
        error = slot.get("error") or message.get("error")
        if error:
            raise RuntimeError(f"{what} failed: {error}")
        return message

    def ask_host(self, prompts: list[str], model: str | None) -> list[str]:
        """Send one `llm_request` and block until its `llm_result`."""
        message = self.request_host("llm", {"prompts": prompts, "model": model}, "llm_query")
        results = message.get("results")
        if not isinstance(results, list) or len(results) != len(prompts):
            raise RuntimeError("llm_query failed: the host sent a malformed answer")
        return [str(r) for r in results]

    def llm_query(self, prompt: str, model: str | None = None) -> str:
        """Ask a sub-LLM one prompt; returns its answer text."""
        return self.ask_host([str(prompt)], model)[0]

    def llm_query_batched(self, prompts: list[str], model: str | None = None) -> list[str]:
        """Ask a sub-LLM many prompts at once (the host runs them concurrently)."""
        prompts = [str(p) for p in prompts]
        if not prompts:
            return []
        return self.ask_host(prompts, model)

    def search(self, query: Any, k: Any = 10) -> Any:
        """Search the query's knowledge base or memories on the host: the `k` best hits, each
        a dict (the host checks the arguments and decides what is searched)."""
        for name, value in (("query", query), ("k", k)):
            if not isinstance(value, (str, int, float, bool, list, dict, type(None))):
                # sent as JSON, it would arrive as its str(): refuse it here
                kind = "a string" if name == "query" else "an integer"
                raise RuntimeError(
                    f"search failed: {name} must be {kind}, not {type(value).__name__}"
                )
        message = self.request_host(
            "tool", {"tool": "search", "args": {"query": query, "k": k}}, "search"
        )
        return message.get("result")

    def show_vars(self) -> str:
        """The variables created by code so far, with their types."""
        found = {
            name: type(value).__name__
            for name, value in self.namespace.items()
            if not name.startswith("_")
            and name not in self.scaffold
            and not isinstance(value, types.ModuleType)
        }
        if not found:
            return "No variables created yet."
        return f"Available variables: {found}"

    # -- execution -------------------------------------------------------------------------

    def run_code(self, code: str, timeout_s: float | None, limit: int) -> dict[str, Any]:
        """Run code in the namespace; capture output, errors and a soft timeout."""
        self.cell += 1
        filename = f"<cell-{self.cell}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        out, err = CappedText(limit), CappedText(limit)
        error: str | None = None
        timed_out = False
        started = time.perf_counter()
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            compiled = compile(code, filename, "exec")
            if timeout_s:
                signal.setitimer(signal.ITIMER_REAL, float(timeout_s))
            try:
                exec(compiled, self.namespace)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except ExecTimeout:
            timed_out = True
            error = f"TimeoutError: execution exceeded {timeout_s} s and was interrupted"
        except SyntaxError:
            error = "".join(traceback.format_exc(limit=0))
        except BaseException as exc:  # user code may raise anything
            error = format_user_error(exc)
        finally:
            sys.stdout, sys.stderr = saved
        result = {
            "stdout": out.getvalue(),
            "stderr": err.getvalue(),
            "error": truncate(error, limit) if error else None,
            "timed_out": timed_out,
            "final": self.take_final(),
            "duration_s": round(time.perf_counter() - started, 6),
        }
        return result

    def take_final(self) -> dict[str, Any] | None:
        """Pop `__final__` if the code set it, as a JSON-safe dict."""
        if "__final__" not in self.namespace:
            return None
        value = self.namespace.pop("__final__")
        if isinstance(value, dict):
            final = json.loads(json.dumps(value, default=str))
            if isinstance(final.get("value"), str):
                final["value"] = truncate(final["value"], MAX_FINAL_CHARS)
            return final
        return {"value": truncate(str(value), MAX_FINAL_CHARS)}

    def load_context(self, message: dict[str, Any]) -> dict[str, Any]:
        """Set `context` from a file in the working directory or from inline data."""
        started = time.perf_counter()
        if "data" in message:
            value = message["data"]
        else:
            text_format = message.get("format", "json") == "text"
            with open(message["path"], encoding="utf-8") as handle:
                value = handle.read() if text_format else json.load(handle)
        self.namespace["context"] = value
        info = {"type": type(value).__name__, "chars": context_chars(value)}
        if isinstance(value, list | dict | str):
            info["length"] = len(value)
        return {
            "stdout": "",
            "stderr": "",
            "error": None,
            "timed_out": False,
            "final": None,
            "duration_s": round(time.perf_counter() - started, 6),
            "info": info,
        }

    def get_var(self, name: str) -> dict[str, Any]:
        """The string form of one variable."""
        if name not in self.namespace:
            return {
                "name": name,
                "value": None,
                "value_type": None,
                "error": f"no variable {name!r}",
            }
        value = self.namespace[name]
        try:
            text = str(value)
        except Exception as exc:
            return {"name": name, "value": None, "value_type": type(value).__name__,
                    "error": f"str() failed: {exc!r}"}  # fmt: skip
        return {
            "name": name,
            "value": truncate(text, MAX_FINAL_CHARS),
            "value_type": type(value).__name__,
            "error": None,
        }

    # -- loop ------------------------------------------------------------------------------

    def handle(self, message: dict[str, Any]) -> bool:
        """Answer one host message; False when the server should stop."""
        kind = message.get("type")
        request_id = message.get("id")
        try:
            if kind == "exec" or kind == "exec_prelude":
                self.current_exec = request_id
                self.llm_counter = 0
                limit = int(message.get("max_output_chars") or DEFAULT_MAX_OUTPUT_CHARS)
                timeout_s = message.get("timeout_s") if kind == "exec" else None
                result = self.run_code(str(message["code"]), timeout_s, limit)
                if kind == "exec_prelude":
                    self.scaffold.update(self.namespace)
                self.channel.send({"type": "result", "id": request_id, "info": {}, **result})
            elif kind == "load_context":
                self.channel.send(
                    {"type": "result", "id": request_id, **self.load_context(message)}
                )
            elif kind == "get_var":
                self.channel.send(
                    {"type": "var", "id": request_id, **self.get_var(message["name"])}
                )
            elif kind == "shutdown":
                self.channel.send({"type": "bye", "id": request_id})
                return False
            else:
                self.channel.send(
                    {"type": "error", "id": request_id, "error": f"unknown message type {kind!r}"}
                )
        except Exception as exc:  # a bad request must not end the server
            self.channel.send(
                {"type": "error", "id": request_id, "error": f"{type(exc).__name__}: {exc}"}
            )
        return True

    def serve(self) -> None:
        """Announce readiness, then answer messages until shutdown or EOF."""
        signal.signal(signal.SIGALRM, raise_timeout)
        threading.Thread(target=self.read_stdin, name="repl-stdin", daemon=True).start()
        self.channel.send(
            {
                "type": "ready",
                "protocol": PROTOCOL_VERSION,
                "python": ".".join(map(str, sys.version_info[:3])),
                "pid": os.getpid(),
            }
        )
        while True:
            message = self.commands.get()
            if message is None or not self.handle(message):
                return


def raise_timeout(signum: int, frame: Any) -> None:
    """SIGALRM handler: interrupt the running user code."""
    raise ExecTimeout()


def format_user_error(exc: BaseException) -> str:
    """A traceback of user frames only (the server's own frame is skipped)."""
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell-"):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def truncate(text: str, limit: int) -> str:
    """Cut long text with a note."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} more characters truncated ...]\n"


def context_chars(value: Any) -> int:
    """Rough size of a context in characters (strings inside lists/dicts summed)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(context_chars(v) for v in value)
    if isinstance(value, dict):
        return sum(len(str(k)) + context_chars(v) for k, v in value.items())
    return len(str(value)) if value is not None else 0


def main() -> None:
    """Entry point."""
    Server().serve()


if __name__ == "__main__":
    main()
