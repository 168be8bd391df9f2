"""Daytona sandbox backend: RLM REPL sessions in Daytona cloud sandboxes.

One sandbox serves every org (``sandbox_mode="shared"``) or one per org (``"per_org"``); either
way it is found again by its labels, created from the snapshot when missing, started when
stopped, and waited for while it creates or starts. A sandbox this process just created is
deleted again when its creation or its first use fails, so a failure never leaves a running
sandbox that nobody will reuse.

Each REPL session runs in its own directory ``/home/daytona/sessions/<session_id>`` as its own
process: the REPL server started as an asynchronous Daytona session command (``python3`` on
``repl_server.py``; for the ``bun`` runtime ``bun`` on ``repl_server.js``, or ``node`` when the
image has no Bun). The host writes
protocol lines with ``send_session_command_input`` and reads the server's lines by polling the
command's logs. ``llm_query`` requests are answered on the host, so no secret enters the
sandbox: the sandbox gets no environment variables, and the command line carries only paths.
Control-plane and toolbox calls follow the shared retry policy of ``memcity_pipeline.retry``:
a Daytona error with HTTP 408, 409, 429 or 5xx, or a dropped connection, is retried with
exponential backoff and full jitter (honouring Retry-After); any other Daytona error (404, 400,
a client-side timeout) is not. Either way a final failure raises ``SandboxError`` naming the
operation. Every call has a deadline: each API request :data:`REQUEST_TIMEOUT_S` (the SDK's own
client sets none for reading an answer), an upload :data:`UPLOAD_TIMEOUT_S`, creating and
starting a sandbox their own, so a Daytona that stops answering fails the call instead of
holding it.

What a session sends is bounded on the host as for every backend (``sandbox.base``); in
addition, since the Daytona API returns a command's whole log on each poll, a session whose
output passes :data:`MAX_LOG_CHARS` is ended with a clear error, and only the tail of its stderr
is kept.

CPU, memory and disk belong to the snapshot (the API takes no resources on a create from a
snapshot), so :meth:`DaytonaBackend.create_snapshot` applies them. Sessions that share a
sandbox run as the same OS user: separate processes and directories keep their variables and
files apart, but code that goes looking could list ``/home/daytona/sessions``; ``per_org`` mode
puts each org in its own sandbox.

This module stays whole: finding or creating sandboxes by label, session processes over the
toolbox API, server uploads and cleanup on failure share one client, one lock and one retry
policy.
"""

import json
import logging
import os
import re
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from daytona import (
    CreateSandboxFromSnapshotParams,
    Daytona,
    DaytonaConfig,
    DaytonaError,
    DaytonaNotFoundError,
    DaytonaTimeoutError,
    ListSandboxesQuery,
    Sandbox,
    SessionExecuteRequest,
)

from memcity_pipeline.retry import (
    RetriesExhausted,
    Retryable,
    RetryPolicy,
    classify_failure,
    retry_call,
)
from memcity_pipeline.sandbox.base import (
    MAX_LINE_BYTES,
    ChannelOverflow,
    LineTooLong,
    LLMHandler,
    ReplClient,
    ReplSession,
    SandboxBackend,
    SandboxError,
    ToolHandler,
    check_runtime,
)
from memcity_pipeline.sandbox.snapshot import (
    BAKED_PATHS,
    DEFAULT_SNAPSHOT,
    create_snapshot,
    server_digest,
    server_source,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

APP_LABEL = "memcity-rlm"
SESSIONS_ROOT = "/home/daytona/sessions"
UPLOADED_SERVER_DIR = "/home/daytona/.memcity"
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
_WAIT_STATES = {
    "creating",
    "starting",
    "restoring",
    "pending_build",
    "building_snapshot",
    "pulling_snapshot",
    "resuming",
}
_STOPPED_STATES = {"stopped", "archived", "paused"}
_BROKEN_STATES = {"error", "build_failed"}
_GONE_STATES = {"destroyed", "destroying"}


DEFAULT_RETRY = RetryPolicy(attempts=4, base_delay_s=0.5, max_delay_s=8.0)
"""The backend's retry policy unless it is given one."""

REQUEST_TIMEOUT_S = 30.0
"""The deadline of one Daytona API request (sessions, commands, logs, files, listings)."""
UPLOAD_TIMEOUT_S = 120.0
"""The deadline of one file upload (a REPL server, a session's context)."""

MAX_LOG_CHARS = 64 << 20
"""The most output (the protocol channel, stdout) a REPL process may write over its life; past
it the session ends. The Daytona API returns a command's whole log on every poll, so this bounds
what one poll brings to the host (plus what the code wrote since the poll before)."""
STDERR_TAIL_CHARS = 100_000
"""Characters of a REPL process's stderr the host keeps (for error messages)."""


def classify_daytona_failure(exc: BaseException) -> Retryable | None:
    """The shared classification of a Daytona error (408, 409, 429, 5xx or a dropped connection
    are worth retrying); None for a Daytona error that is not, and for any other exception."""
    return classify_failure(exc) if isinstance(exc, DaytonaError) else None


def _retried(fn: Callable[[], T], what: str, policy: RetryPolicy) -> T:
    """Run ``fn`` under ``policy``, retrying transient Daytona errors (raises RetriesExhausted
    or the first error that is not transient)."""
    return retry_call(
        fn, policy, what=f"Daytona: {what}", classify=classify_daytona_failure, logger=log
    ).value


def call_with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy) -> T:
    """Run ``fn``; retry transient Daytona errors; raise ``SandboxError`` saying ``what`` failed."""
    try:
        return _retried(fn, what, policy)
    except RetriesExhausted as exc:
        status = getattr(exc.last, "status_code", None)
        code = f"HTTP {status}" if status else "connection failed"
        raise SandboxError(
            f"Daytona: could not {what} after {exc.attempts} attempts "
            f"(the API kept failing, {code}): {exc.last}"
        ) from exc.last
    except DaytonaError as exc:
        raise SandboxError(f"Daytona: could not {what}: {exc}") from exc


def _state(sandbox: Sandbox) -> str:
    """The sandbox state as a plain lowercase string ("started", "stopped", ...)."""
    state = sandbox.state
    return str(getattr(state, "value", state) or "unknown")


class SessionCommandChannel:
    """A line channel to a process started as an asynchronous Daytona session command.

    Writing sends command input; reading polls the command's logs (the daemon returns the whole
    output so far; we keep an offset), quickly after a write or fresh output, then backing off
    to ``poll_max_s``, and to ``idle_poll_s`` once nothing has come for a while. What it keeps
    is bounded: a line over ``max_line_chars`` raises :class:`LineTooLong`, output over
    ``max_log_chars`` :class:`ChannelOverflow` (the session ends), and only the last
    :data:`STDERR_TAIL_CHARS` of stderr are kept.
    """

    def __init__(
        self,
        sandbox: Sandbox,
        session_id: str,
        command: str,
        *,
        retry: RetryPolicy,
        poll_min_s: float = 0.02,
        poll_max_s: float = 0.25,
        idle_poll_s: float = 1.0,
        max_line_chars: int = MAX_LINE_BYTES,
        max_log_chars: int = MAX_LOG_CHARS,
    ) -> None:
        self.sandbox = sandbox
        self.session_id = session_id
        self.retry = retry
        self.max_line_chars = max_line_chars
        self.max_log_chars = max_log_chars
        self.poll_min_s = poll_min_s
        self.poll_max_s = poll_max_s
        self.idle_poll_s = idle_poll_s
        self._offset = 0
        self._pending = ""
        self._stderr = ""
        self._ended = False
        self._killed = False
        self._overflowed = False  # its logs are over the limit: never fetched again
        self._failure: str | None = None
        self._wake = threading.Event()
        self._delay = poll_min_s
        self._last_activity = time.monotonic()
        self._last_status_check = 0.0
        self._lock = threading.Lock()
        self.command_id = self._start(command)

    def _start(self, command: str) -> str:
        """Create the Daytona session and start the command in it; retried as one unit."""
        request = SessionExecuteRequest(command=command, run_async=True, suppress_input_echo=True)

        def attempt() -> str:
            try:
                self.sandbox.process.create_session(
                    self.session_id, request_timeout=REQUEST_TIMEOUT_S
                )
                return self.sandbox.process.execute_session_command(
                    self.session_id, request, timeout=int(REQUEST_TIMEOUT_S)
                ).cmd_id
            except DaytonaError:
                self._delete_session_quietly()
                raise

        return call_with_retries(attempt, "start the REPL process", self.retry)

    def write(self, text: str) -> None:
        """Send ``text`` to the process's stdin."""
        if self._ended:
            raise SandboxError("the REPL process in the Daytona sandbox has ended")
        call_with_retries(
            lambda: self.sandbox.process.send_session_command_input(
                self.session_id, self.command_id, text, request_timeout=REQUEST_TIMEOUT_S
            ),
            "send input to the REPL process",
            self.retry,
        )
        self._delay = self.poll_min_s
        self._last_activity = time.monotonic()
        self._wake.set()  # a reply is due soon: stop a long idle wait now

    def read_line(self, timeout_s: float | None = None) -> str | None:
        """The next stdout line (with its newline), "" once output has ended, None on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                newline = self._pending.find("\n")
                if newline >= 0:
                    line = self._pending[: newline + 1]
                    self._pending = self._pending[newline + 1 :]
                    return line
                if len(self._pending) > self.max_line_chars:
                    raise LineTooLong(self.max_line_chars)
                if self._ended:
                    line, self._pending = self._pending, ""
                    return line
                if self._poll():
                    continue
            if deadline is not None and time.monotonic() >= deadline:
                return None
            pause = (
                self._delay if deadline is None else min(self._delay, deadline - time.monotonic())
            )
            if self._wake.wait(max(pause, 0.0)):
                self._wake.clear()
                continue
            idle = time.monotonic() - self._last_activity > 5.0
            self._delay = min(self._delay * 1.5, self.idle_poll_s if idle else self.poll_max_s)

    def _poll(self) -> bool:
        """Fetch new output; notice when the process has ended. True if anything changed."""
        try:
            exited = False
            if time.monotonic() - self._last_status_check > 1.0:
                self._last_status_check = time.monotonic()
                command = call_with_retries(
                    lambda: self.sandbox.process.get_session_command(
                        self.session_id, self.command_id, request_timeout=REQUEST_TIMEOUT_S
                    ),
                    "check the REPL process",
                    self.retry,
                )
                exited = command.exit_code is not None
            logs = call_with_retries(
                lambda: self.sandbox.process.get_session_command_logs(
                    self.session_id, self.command_id, request_timeout=REQUEST_TIMEOUT_S
                ),
                "read the REPL process output",
                self.retry,
            )
        except SandboxError as exc:
            if self._killed:
                self._ended = True
                return True
            self._failure = str(exc)
            raise
        stdout = logs.stdout or ""
        self._stderr = (logs.stderr or "")[-STDERR_TAIL_CHARS:]
        if len(stdout) > self.max_log_chars:
            self._overflowed = True
            raise ChannelOverflow(
                f"the REPL process wrote over {self.max_log_chars:,} characters of output "
                "(the limit of a session); the session is closed"
            )
        fresh = stdout[self._offset :]
        self._offset = len(stdout)
        self._pending += fresh
        del stdout, logs
        if fresh:
            self._delay = self.poll_min_s
            self._last_activity = time.monotonic()
        if exited:
            self._ended = True
        return bool(fresh) or exited

    @property
    def stderr(self) -> str:
        """Everything the process wrote to stderr (as of the last poll)."""
        return self._stderr

    @property
    def ended(self) -> bool:
        """Whether the process is known to have ended."""
        return self._ended

    def lines(self) -> Iterator[str]:
        """The process's stdout, line by line, until it ends (blocking)."""
        while True:
            line = self.read_line()
            if not line:
                return
            yield line

    def describe_end(self) -> str:
        """Why the process ended, for error messages: exit code and the tail of its stderr."""
        parts = [self._failure] if self._failure else []
        if self._overflowed:
            return "its output went over the limit"
        try:
            command = self.sandbox.process.get_session_command(
                self.session_id, self.command_id, request_timeout=REQUEST_TIMEOUT_S
            )
            if command.exit_code is not None:
                parts.append(f"exit code {command.exit_code}")
            logs = self.sandbox.process.get_session_command_logs(
                self.session_id, self.command_id, request_timeout=REQUEST_TIMEOUT_S
            )
            self._stderr = (logs.stderr or self._stderr)[-STDERR_TAIL_CHARS:]
        except DaytonaError:
            parts.append("the Daytona session is gone")
        tail = self._stderr.strip()[-800:]
        if tail:
            parts.append(f"stderr: {tail}")
        return "; ".join(parts)

    def kill(self) -> None:
        """End the process by deleting its Daytona session (idempotent)."""
        if self._killed:
            return
        self._killed = True
        self._ended = True
        self._wake.set()
        self._delete_session_quietly()

    def _delete_session_quietly(self) -> None:
        """Delete the Daytona session, retrying transient failures; log (not raise) a failure."""
        try:
            _retried(
                lambda: self.sandbox.process.delete_session(
                    self.session_id, request_timeout=REQUEST_TIMEOUT_S
                ),
                f"delete session {self.session_id}",
                self.retry,
            )
        except DaytonaNotFoundError:
            return
        except (DaytonaError, RetriesExhausted) as exc:
            failure = exc.last if isinstance(exc, RetriesExhausted) else exc
            log.warning("Daytona: could not delete session %s: %s", self.session_id, failure)


@dataclass
class _SandboxEntry:
    """A sandbox this backend uses, with what it learned about it."""

    sandbox: Sandbox
    fresh: bool
    server_paths: dict[str, str] = field(default_factory=dict)  # runtime -> server in the sandbox
    active_sessions: int = 0


class DaytonaSandboxes:
    """Finds, creates, starts and deletes the labelled sandboxes of one backend."""

    def __init__(
        self,
        client_factory: Callable[[], Daytona],
        *,
        sandbox_mode: str,
        snapshot: str,
        auto_stop_minutes: int,
        auto_archive_minutes: int,
        network_block_all: bool,
        create_timeout_s: float,
        start_timeout_s: float,
        retry: RetryPolicy,
    ) -> None:
        if sandbox_mode not in ("shared", "per_org"):
            raise ValueError(f"sandbox_mode must be 'shared' or 'per_org', not {sandbox_mode!r}")
        self._client_factory = client_factory
        self._client: Daytona | None = None
        self.sandbox_mode = sandbox_mode
        self.snapshot = snapshot
        self.auto_stop_minutes = auto_stop_minutes
        self.auto_archive_minutes = auto_archive_minutes
        self.network_block_all = network_block_all
        self.create_timeout_s = create_timeout_s
        self.start_timeout_s = start_timeout_s
        self.retry = retry
        self._entries: dict[str, _SandboxEntry] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    @property
    def client(self) -> Daytona:
        """The SDK client, made on first use."""
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._client_factory()
                except DaytonaError as exc:
                    raise SandboxError(f"Daytona client could not be configured: {exc}") from exc
            return self._client

    def labels(self, org_id: str) -> dict[str, str]:
        """The labels that identify the sandbox serving ``org_id``."""
        if self.sandbox_mode == "shared":
            return {"app": APP_LABEL, "mode": "shared"}
        return {"app": APP_LABEL, "mode": "per_org", "org_id": org_id}

    def acquire(self, org_id: str) -> _SandboxEntry:
        """A started sandbox for ``org_id`` (found by labels, started, or created)."""
        labels = self.labels(org_id)
        key = "|".join(f"{k}={v}" for k, v in sorted(labels.items()))
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            entry = self._entries.get(key)
            if entry is not None and self._still_started(entry):
                entry.active_sessions += 1
                return entry
            entry = call_with_retries(
                lambda: self._find_or_create(labels), "find or create the sandbox", self.retry
            )
            entry.active_sessions += 1
            self._entries[key] = entry
            return entry

    def release(self, entry: _SandboxEntry, *, failed: bool) -> None:
        """Done with a session on ``entry``; a failure on a sandbox nobody used yet deletes it."""
        with self._lock:
            entry.active_sessions -= 1
            discard = failed and entry.fresh and entry.active_sessions == 0
            if discard:
                self._entries = {k: e for k, e in self._entries.items() if e is not entry}
            elif not failed:
                entry.fresh = False
        if discard:
            log.warning("Daytona: deleting sandbox %s, whose first use failed", entry.sandbox.id)
            self.delete_quietly(entry.sandbox)

    def _still_started(self, entry: _SandboxEntry) -> bool:
        """Refresh a cached sandbox; start it again if it stopped meanwhile."""
        try:
            call_with_retries(
                lambda: entry.sandbox.refresh_data(REQUEST_TIMEOUT_S),
                "refresh the sandbox",
                self.retry,
            )
        except SandboxError as exc:
            if isinstance(exc.__cause__, DaytonaNotFoundError):
                return False
            raise
        if _state(entry.sandbox) in _GONE_STATES | _BROKEN_STATES:
            return False
        call_with_retries(
            lambda: self._ensure_started(entry.sandbox), "start the sandbox", self.retry
        )
        return True

    def _find_or_create(self, labels: dict[str, str]) -> _SandboxEntry:
        found = list(self.client.list(ListSandboxesQuery(labels=labels), REQUEST_TIMEOUT_S))
        usable = []
        for sandbox in found:
            state = _state(sandbox)
            if state in _BROKEN_STATES:
                log.warning("Daytona: deleting sandbox %s in state %s", sandbox.id, state)
                self.delete_quietly(sandbox)
            elif state not in _GONE_STATES:
                usable.append(sandbox)
        if usable:
            usable.sort(key=lambda s: _state(s) != "started")
            self._ensure_started(usable[0])
            return _SandboxEntry(sandbox=usable[0], fresh=False)
        return _SandboxEntry(sandbox=self._create(labels), fresh=True)

    def _create(self, labels: dict[str, str]) -> Sandbox:
        """Create a sandbox from the snapshot; on any failure delete what was created."""
        token = uuid.uuid4().hex
        params = CreateSandboxFromSnapshotParams(
            snapshot=self.snapshot,
            labels={**labels, "create_token": token},
            env_vars={},
            auto_stop_interval=self.auto_stop_minutes,
            auto_archive_interval=self.auto_archive_minutes,
            network_block_all=self.network_block_all,
        )
        try:
            return self.client.create(params, timeout=self.create_timeout_s)
        except DaytonaTimeoutError as exc:
            self._delete_created(token)
            raise SandboxError(
                f"Daytona sandbox from snapshot {self.snapshot!r} was not started within "
                f"{self.create_timeout_s:g} s; it has been deleted"
            ) from exc
        except DaytonaError:
            self._delete_created(token)
            raise

    def _delete_created(self, token: str) -> None:
        try:
            query = ListSandboxesQuery(labels={"create_token": token})
            leftovers = list(self.client.list(query, REQUEST_TIMEOUT_S))
        except DaytonaError as exc:
            log.warning("Daytona: could not look for a half-created sandbox: %s", exc)
            return
        for sandbox in leftovers:
            self.delete_quietly(sandbox)

    def _ensure_started(self, sandbox: Sandbox) -> None:
        """Bring a found sandbox to "started": wait while it starts, start it when stopped."""
        deadline = time.monotonic() + self.start_timeout_s
        while _state(sandbox) in {"stopping", "archiving", "pausing"}:
            if time.monotonic() > deadline:
                raise SandboxError(f"Daytona sandbox {sandbox.id} stayed {_state(sandbox)}")
            time.sleep(1.0)
            sandbox.refresh_data(REQUEST_TIMEOUT_S)
        state = _state(sandbox)
        try:
            if state in _WAIT_STATES:
                sandbox.wait_for_sandbox_start(timeout=self.start_timeout_s)
            elif state != "started":
                sandbox.start(timeout=self.start_timeout_s)
        except DaytonaTimeoutError as exc:
            raise SandboxError(
                f"Daytona sandbox {sandbox.id} did not start within {self.start_timeout_s:g} s"
            ) from exc

    def delete_quietly(self, sandbox: Sandbox) -> None:
        """Delete a sandbox, retrying transient failures; log (not raise) a final failure."""
        try:
            _retried(
                lambda: self.client.delete(sandbox), f"delete sandbox {sandbox.id}", self.retry
            )
        except DaytonaNotFoundError:
            return
        except (DaytonaError, RetriesExhausted) as exc:
            failure = exc.last if isinstance(exc, RetriesExhausted) else exc
            log.error("Daytona: could not delete sandbox %s: %s", sandbox.id, failure)


def _check_session_id(session_id: str) -> str:
    """A session id is used in paths and commands: keep it to safe characters."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", session_id):
        raise ValueError(f"session id {session_id!r} must be letters, digits, '_', '.', '-'")
    return session_id


def repl_command(server_path: str, directory: str, runtime: str = "python") -> str:
    """The shell command that runs the REPL server in ``directory`` with a scrubbed environment.

    ``env -i`` drops whatever the sandbox daemon's shell has; only PATH and HOME are set (and,
    for Bun, switches of its own), and the only arguments are paths (no secret ever goes on a
    command line). The ``bun`` runtime runs ``bun`` when the image has it, else ``node``.
    """
    prefix = (
        f"cd {shlex.quote(directory)} && exec env -i PATH={SANDBOX_PATH} "
        f"HOME={shlex.quote(directory)}"
    )
    if runtime != "bun":
        return f"{prefix} python3 -I -u {shlex.quote(server_path)}"
    choose = (
        'if command -v bun >/dev/null 2>&1; then exec bun --no-env-file --no-install "$0"; '
        'else exec node "$0"; fi'
    )
    return (
        f"{prefix} BUN_RUNTIME_TRANSPILER_CACHE_PATH=0 NO_COLOR=1 "
        f"sh -c {shlex.quote(choose)} {shlex.quote(server_path)}"
    )


class DaytonaSession(ReplSession):
    """A REPL session in a Daytona sandbox: its own process and its own directory."""

    def __init__(
        self,
        client: ReplClient,
        *,
        backend: "DaytonaBackend",
        entry: _SandboxEntry,
        channel: SessionCommandChannel,
        directory: str,
        session_id: str,
        org_id: str,
        exec_timeout_s: float | None,
        kill_grace_s: float,
    ) -> None:
        super().__init__(
            client,
            session_id=session_id,
            org_id=org_id,
            exec_timeout_s=exec_timeout_s,
            kill_grace_s=kill_grace_s,
        )
        self.backend = backend
        self.entry = entry
        self.channel = channel
        self.directory = directory

    @property
    def sandbox_id(self) -> str:
        """The Daytona sandbox this session runs in."""
        return self.entry.sandbox.id

    def load_context(self, context: str | list | dict) -> None:
        """Upload the context as one file, load it, and delete the file again."""
        if not self.alive:
            raise SandboxError(f"{self.client.name}: the session is closed")
        text = isinstance(context, str)
        name = "context.txt" if text else "context.json"
        payload = (context if text else _json_dumps(context)).encode("utf-8")
        remote = f"{self.directory}/{name}"
        call_with_retries(
            lambda: self.entry.sandbox.fs.upload_file(payload, remote, int(UPLOAD_TIMEOUT_S)),
            "upload the context",
            self.backend.retry,
        )
        self.context_info = self.client.load_context(path=name, text=text)
        self.backend.remove_quietly(self.entry.sandbox, remote, recursive=False)

    def close(self) -> None:
        """End the session at once: deleting the Daytona session ends the process (idempotent).

        No graceful shutdown round trip: each one costs polling latency, and the process holds
        nothing that needs flushing.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.client.kill()
            self.client.close()
        finally:
            self._release()

    def _release(self) -> None:
        """Kill the process (delete the Daytona session), remove the directory, free the slot."""
        try:
            self.channel.kill()
            self.backend.remove_quietly(self.entry.sandbox, self.directory, recursive=True)
        finally:
            self.backend.session_closed(self)


def _json_dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class DaytonaBackend(SandboxBackend):
    """Sandbox backend on Daytona cloud sandboxes (see the module docstring)."""

    name = "daytona"

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_url: str | None = None,
        target: str | None = None,
        sandbox_mode: str = "shared",
        snapshot: str = DEFAULT_SNAPSHOT,
        auto_stop_minutes: int = 30,
        auto_archive_minutes: int = 1440,
        network_block_all: bool = True,
        cpu: int = 2,
        memory_gib: int = 4,
        disk_gib: int = 8,
        exec_timeout_s: float | None = 120.0,
        kill_grace_s: float = 5.0,
        max_llm_concurrency: int = 4,
        create_timeout_s: float = 180.0,
        start_timeout_s: float = 180.0,
        ready_timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        poll_min_s: float = 0.02,
        poll_max_s: float = 0.25,
        max_log_chars: int = MAX_LOG_CHARS,
        client: Daytona | None = None,
    ) -> None:
        self.api_key = api_key or None
        self.api_url = api_url or os.environ.get("DAYTONA_API_URL") or None
        self.target = target or None
        self.cpu, self.memory_gib, self.disk_gib = cpu, memory_gib, disk_gib
        self.exec_timeout_s = exec_timeout_s
        self.kill_grace_s = kill_grace_s
        self.max_llm_concurrency = max_llm_concurrency
        self.ready_timeout_s = ready_timeout_s
        self.retry = retry or DEFAULT_RETRY
        self.poll_min_s, self.poll_max_s = poll_min_s, poll_max_s
        self.max_log_chars = max_log_chars
        self.sandboxes = DaytonaSandboxes(
            (lambda: client) if client is not None else self._make_client,
            sandbox_mode=sandbox_mode,
            snapshot=snapshot,
            auto_stop_minutes=auto_stop_minutes,
            auto_archive_minutes=auto_archive_minutes,
            network_block_all=network_block_all,
            create_timeout_s=create_timeout_s,
            start_timeout_s=start_timeout_s,
            retry=self.retry,
        )
        self._sessions: dict[str, DaytonaSession] = {}
        self._server_lock = threading.Lock()
        self._lock = threading.Lock()

    def _make_client(self) -> Daytona:
        return Daytona(
            DaytonaConfig(api_key=self.api_key, api_url=self.api_url, target=self.target)
        )

    def create_snapshot(self, on_logs: Callable[[str], None] | None = None) -> None:
        """Build this backend's snapshot with its CPU, memory and disk settings."""
        create_snapshot(
            self.sandboxes.snapshot,
            daytona=self.sandboxes.client,
            cpu=self.cpu,
            memory_gib=self.memory_gib,
            disk_gib=self.disk_gib,
            on_logs=on_logs,
        )

    def open_session(
        self,
        org_id: str,
        llm_handler: LLMHandler,
        *,
        prelude: str | None = None,
        session_id: str | None = None,
        runtime: str = "python",
        tool_handler: ToolHandler | None = None,
    ) -> DaytonaSession:
        """Start a REPL session for ``org_id`` in its sandbox (created or started as needed);
        its tool calls go to ``tool_handler`` on the host."""
        session_id = _check_session_id(session_id or uuid.uuid4().hex)
        check_runtime(runtime)
        entry = self.sandboxes.acquire(org_id)
        directory = f"{SESSIONS_ROOT}/{session_id}"
        channel: SessionCommandChannel | None = None
        try:
            server_path = self._server_path(entry, runtime)
            call_with_retries(
                lambda: entry.sandbox.fs.create_folder(directory, "700", REQUEST_TIMEOUT_S),
                "create the session directory",
                self.retry,
            )
            channel = SessionCommandChannel(
                entry.sandbox,
                f"memcity-{session_id}",
                repl_command(server_path, directory, runtime),
                retry=self.retry,
                poll_min_s=self.poll_min_s,
                poll_max_s=self.poll_max_s,
                max_log_chars=self.max_log_chars,
            )
            client = ReplClient(
                channel.write,
                channel.lines(),
                llm_handler,
                max_llm_concurrency=self.max_llm_concurrency,
                tool_handler=tool_handler,
                kill=channel.kill,
                death_reason=channel.describe_end,
                name=f"daytona:{session_id}" + ("" if runtime == "python" else f" ({runtime})"),
            )
            client.wait_ready(self.ready_timeout_s)
            session = DaytonaSession(
                client,
                backend=self,
                entry=entry,
                channel=channel,
                directory=directory,
                session_id=session_id,
                org_id=org_id,
                exec_timeout_s=self.exec_timeout_s,
                kill_grace_s=self.kill_grace_s,
            )
            with self._lock:
                self._sessions[session_id] = session
            if prelude:
                session.run_prelude(prelude)
        except BaseException:
            if channel is not None:
                channel.kill()
            self.remove_quietly(entry.sandbox, directory, recursive=True)
            with self._lock:
                self._sessions.pop(session_id, None)
            self.sandboxes.release(entry, failed=True)
            raise
        return session

    def _server_path(self, entry: _SandboxEntry, runtime: str = "python") -> str:
        """Where the runtime's REPL server is in this sandbox: the snapshot's copy if current,
        else an upload."""
        with self._server_lock:
            if runtime in entry.server_paths:
                return entry.server_paths[runtime]
            sandbox = entry.sandbox
            digest = server_digest(runtime=runtime)
            baked_path = BAKED_PATHS[runtime]
            check = call_with_retries(
                lambda: sandbox.process.exec(f"sha256sum {baked_path}", timeout=30),
                "check the REPL server in the sandbox",
                self.retry,
            )
            baked = (check.result or "").split(" ", 1)[0].strip()
            if check.exit_code == 0 and baked == digest:
                entry.server_paths[runtime] = baked_path
                return baked_path
            suffix = ".js" if runtime == "bun" else ".py"
            path = f"{UPLOADED_SERVER_DIR}/repl_server-{digest[:16]}{suffix}"
            source = server_source(runtime)
            call_with_retries(
                lambda: sandbox.fs.create_folder(UPLOADED_SERVER_DIR, "755", REQUEST_TIMEOUT_S),
                "create the REPL server directory",
                self.retry,
            )
            call_with_retries(
                lambda: sandbox.fs.upload_file(source, path, int(UPLOAD_TIMEOUT_S)),
                "upload the REPL server",
                self.retry,
            )
            entry.server_paths[runtime] = path
            return path

    def remove_quietly(self, sandbox: Sandbox, path: str, *, recursive: bool) -> None:
        """Delete a file or directory in the sandbox; log (not raise) a failure."""
        try:
            call_with_retries(
                lambda: sandbox.fs.delete_file(path, recursive, REQUEST_TIMEOUT_S),
                f"remove {path}",
                self.retry,
            )
        except SandboxError as exc:
            if not isinstance(exc.__cause__, DaytonaNotFoundError):
                log.warning("%s", exc)

    def session_closed(self, session: DaytonaSession) -> None:
        """Called by a session when it has released its process and directory."""
        with self._lock:
            self._sessions.pop(session.session_id, None)
        self.sandboxes.release(session.entry, failed=False)

    def close(self) -> None:
        """Close every open session. Sandboxes stay for reuse (they auto-stop when idle)."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            try:
                session.close()
            except Exception as exc:
                log.warning("Daytona: closing session %s failed: %s", session.session_id, exc)
