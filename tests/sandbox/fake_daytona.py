"""A fake Daytona API server for tests: real HTTP on 127.0.0.1, real processes for commands.

It implements the endpoints that the `daytona` SDK (0.226) calls for what the Daytona sandbox
backend and the snapshot builder do:

- control plane under ``<base>/api``: create, get, list (by labels), start, stop, delete
  sandboxes; create and get snapshots;
- toolbox under ``<base>/toolbox/<sandbox id>``: bulk file upload, create/delete folders and
  files, ``/process/execute``, sessions, session commands (sync and ``runAsync``), command
  logs and command input.

Each sandbox has its own temporary directory that stands for its filesystem: absolute paths in
file requests map below it, and in commands the prefixes ``/home/daytona``, ``/opt/memcity``
and ``/usr/local/bin`` (the tools a snapshot installs) are rewritten to it. Commands really run (``bash -c``) as local processes with only the
sandbox's environment (never the host's), so a REPL server started through a session command
speaks its protocol end to end: stdin comes from command input, stdout and stderr are served as
logs. Like the real daemon, input is echoed into the logs unless ``suppressInputEcho`` is set.

Failure injection: :meth:`FakeDaytona.inject` (an HTTP status and/or a delay on matching
requests, a given number of times), ``create_state`` ("creating" keeps new sandboxes creating
forever), ``start_delay_s``. Every request is recorded in :attr:`FakeDaytona.calls`.
"""

import contextlib
import email.parser
import email.policy
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

API_KEY = "test-daytona-key"
COMMAND_PATH_PREFIXES = ("/home/daytona", "/opt/memcity", "/usr/local/bin")
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class Call:
    """One recorded request."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    headers: dict[str, str]


@dataclass
class Injection:
    """A failure to inject on requests whose ``METHOD path`` matches ``pattern``."""

    pattern: re.Pattern[str]
    status: int | None
    times: int
    delay_s: float
    hits: int = 0


@dataclass
class FakeCommand:
    """A command run in a session: a local process and its accumulated output."""

    id: str
    command: str
    proc: subprocess.Popen[bytes]
    echo_input: bool
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    output: bytearray = field(default_factory=bytearray)
    lock: threading.Lock = field(default_factory=threading.Lock)
    readers: list[threading.Thread] = field(default_factory=list)

    def exit_code(self) -> int | None:
        """The exit code once the process has ended and its output has been read."""
        code = self.proc.poll()
        if code is None or any(t.is_alive() for t in self.readers):
            return None
        return code


@dataclass
class FakeSandbox:
    """A sandbox: its metadata, its filesystem directory and its sessions."""

    id: str
    create_body: dict[str, Any]
    root: Path
    state: str
    labels: dict[str, str]
    env: dict[str, str]
    state_until: float | None = None
    next_state: str | None = None
    sessions: dict[str, dict[str, FakeCommand]] = field(default_factory=dict)

    def current_state(self) -> str:
        """The state, after any timed transition (creating -> started, starting -> started)."""
        if self.next_state and self.state_until is not None and time.time() >= self.state_until:
            self.state, self.next_state, self.state_until = self.next_state, None, None
        return self.state

    def host_path(self, path: str) -> Path:
        """Where a sandbox path lives on the host (relative paths start in /home/daytona)."""
        if not path.startswith("/"):
            path = "/home/daytona/" + path
        resolved = os.path.normpath(path)
        return self.root / resolved.lstrip("/")

    def host_command(self, command: str) -> str:
        """The command with sandbox path prefixes rewritten to this sandbox's directory."""
        alternatives = "|".join(re.escape(p) for p in COMMAND_PATH_PREFIXES)
        return re.sub(
            rf"(?<![\w/.])({alternatives})(?=/|\b)", lambda m: f"{self.root}{m[1]}", command
        )


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class FakeDaytona:
    """The fake server. Use as a context manager, or call :meth:`start` and :meth:`stop`."""

    def __init__(self, root: Path, api_key: str = API_KEY) -> None:
        self.root = root
        self.api_key = api_key
        self.calls: list[Call] = []
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.snapshot_files: dict[str, dict[str, bytes | Path]] = {}
        self.injections: list[Injection] = []
        self.create_state = "started"
        self.create_delay_s = 0.0
        self.start_delay_s = 0.0
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ----- lifecycle -----

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def api_url(self) -> str:
        """What to pass as ``api_url`` (``DaytonaConfig`` / ``DAYTONA_API_URL``)."""
        return f"{self.base_url}/api"

    def start(self) -> "FakeDaytona":
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and kill every process still running in any sandbox."""
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for sandbox in self.sandboxes.values():
                self._kill_all(sandbox)

    def __enter__(self) -> "FakeDaytona":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- test controls and queries -----

    def inject(
        self, pattern: str, *, status: int | None = 500, times: int = 1, delay_s: float = 0.0
    ) -> None:
        """Fail (``status``) and/or delay the next ``times`` requests matching ``METHOD path``.

        ``pattern`` is a regex searched in e.g. ``"POST /api/sandbox"``.
        """
        self.injections.append(Injection(re.compile(pattern), status, times, delay_s))

    def add_snapshot_files(self, snapshot: str, files: dict[str, bytes | Path]) -> None:
        """Files that sandboxes created from ``snapshot`` start with (as if baked into it).

        A ``Path`` value becomes a symlink to that host file (e.g. an interpreter binary).
        """
        self.snapshot_files[snapshot] = files

    def set_state(self, sandbox_id: str, state: str) -> None:
        """Force a sandbox state (e.g. "stopped"); stopping kills its processes."""
        with self._lock:
            sandbox = self.sandboxes[sandbox_id]
            sandbox.state, sandbox.next_state, sandbox.state_until = state, None, None
            if state != "started":
                self._kill_all(sandbox)

    def live_sandboxes(self) -> list[FakeSandbox]:
        """Sandboxes not destroyed."""
        with self._lock:
            return [s for s in self.sandboxes.values() if s.current_state() != "destroyed"]

    def calls_to(self, method: str, pattern: str) -> list[Call]:
        """Recorded calls with this method whose path matches ``pattern`` (regex, searched)."""
        return [c for c in self.calls if c.method == method and re.search(pattern, c.path)]

    def running_processes(self) -> list[FakeCommand]:
        """Session commands whose process is still running, in any sandbox."""
        with self._lock:
            return [
                cmd
                for sandbox in self.sandboxes.values()
                for commands in sandbox.sessions.values()
                for cmd in commands.values()
                if cmd.proc.poll() is None
            ]

    def recorded_text(self) -> str:
        """Every request body, query and header recorded, as one text (to search for secrets)."""
        parts = []
        for call in self.calls:
            parts.append(json.dumps(call.query))
            parts.append(json.dumps(call.body, default=repr))
            parts.append(
                json.dumps({k: v for k, v in call.headers.items() if k != "authorization"})
            )
        return "\n".join(parts)

    # ----- sandbox model -----

    def _dto(self, sandbox: FakeSandbox) -> dict[str, Any]:
        body = sandbox.create_body
        return {
            "id": sandbox.id,
            "organizationId": "org-fake",
            "name": body.get("name") or sandbox.id,
            "snapshot": body.get("snapshot"),
            "user": body.get("user") or "daytona",
            "env": sandbox.env,
            "labels": sandbox.labels,
            "public": bool(body.get("public", False)),
            "networkBlockAll": bool(body.get("networkBlockAll", False)),
            "kvm": False,
            "target": body.get("target") or "us",
            "cpu": body.get("cpu") or 1,
            "gpu": 0,
            "memory": body.get("memory") or 1,
            "disk": body.get("disk") or 3,
            "state": sandbox.current_state(),
            "desiredState": "started",
            "autoStopInterval": body.get("autoStopInterval", 15),
            "autoArchiveInterval": body.get("autoArchiveInterval", 10080),
            "autoDeleteInterval": body.get("autoDeleteInterval", -1),
            "createdAt": _now(),
            "updatedAt": _now(),
            "toolboxProxyUrl": f"{self.base_url}/toolbox",
        }

    def _kill_all(self, sandbox: FakeSandbox) -> None:
        for commands in sandbox.sessions.values():
            for cmd in commands.values():
                _kill(cmd.proc)
        sandbox.sessions.clear()

    # ----- HTTP plumbing -----

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _serve(self) -> None:
                fake._serve(self)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        return Handler

    def _serve(self, req: BaseHTTPRequestHandler) -> None:
        parsed = urlparse(req.path)
        length = int(req.headers.get("Content-Length") or 0)
        raw = req.rfile.read(length) if length else b""
        ctype = req.headers.get("Content-Type") or ""
        body: Any = None
        if raw and ctype.startswith("application/json"):
            body = json.loads(raw)
        elif raw and ctype.startswith("multipart/form-data"):
            body = _parse_multipart(ctype, raw)
        headers = {k.lower(): v for k, v in req.headers.items()}
        call = Call(req.command, parsed.path, parse_qs(parsed.query), body, headers)
        with self._lock:
            self.calls.append(call)
            injection = self._matching_injection(f"{req.command} {parsed.path}")
        if injection and injection.delay_s:
            time.sleep(injection.delay_s)
        if injection and injection.status:
            return _send_json(req, injection.status, _error(injection.status, "injected failure"))
        if parsed.path.startswith("/socket.io"):
            return _send_json(req, 404, _error(404, "no event gateway"))
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return _send_json(req, 401, _error(401, "Unauthorized"))
        try:
            status, payload = self._route(call)
        except _HttpError as exc:
            status, payload = exc.status, _error(exc.status, exc.message)
        _send_json(req, status, payload)

    def _matching_injection(self, target: str) -> Injection | None:
        for injection in self.injections:
            if injection.hits < injection.times and injection.pattern.search(target):
                injection.hits += 1
                return injection
        return None

    def _route(self, call: Call) -> tuple[int, Any]:
        path, method = call.path, call.method
        if path.startswith("/api/"):
            return self._route_api(method, path[len("/api") :], call)
        match = re.match(r"^/toolbox/([^/]+)(/.*)$", path)
        if match:
            sandbox = self._sandbox(match[1])
            if sandbox.current_state() != "started":
                raise _HttpError(409, f"sandbox {sandbox.id} is {sandbox.state}, not started")
            return self._route_toolbox(sandbox, method, match[2], call)
        raise _HttpError(404, f"no route {method} {path}")

    # ----- control plane -----

    def _route_api(self, method: str, path: str, call: Call) -> tuple[int, Any]:
        if method == "POST" and path == "/sandbox":
            return self._create_sandbox(call.body or {})
        if method == "GET" and path == "/sandbox":
            return 200, self._list_sandboxes(call.query)
        match = re.match(r"^/sandbox/([^/]+)(/[a-z-]+)?$", path)
        if match:
            sandbox = self._sandbox(match[1])
            action = match[2] or ""
            if method == "GET" and not action:
                return 200, self._dto(sandbox)
            if method == "DELETE" and not action:
                return 200, self._delete_sandbox(sandbox)
            if method == "POST" and action == "/start":
                return 200, self._start_sandbox(sandbox)
            if method == "POST" and action == "/stop":
                self.set_state(sandbox.id, "stopped")
                return 200, self._dto(sandbox)
            if method == "GET" and action == "/toolbox-proxy-url":
                return 200, {"url": f"{self.base_url}/toolbox"}
        if method == "POST" and path == "/snapshots":
            return 200, self._create_snapshot(call.body or {})
        match = re.match(r"^/snapshots/([^/]+)$", path)
        if method == "GET" and match:
            snapshot = self.snapshots.get(match[1]) or next(
                (s for s in self.snapshots.values() if s["name"] == match[1]), None
            )
            if snapshot is None:
                raise _HttpError(404, f"snapshot {match[1]} not found")
            return 200, snapshot
        raise _HttpError(404, f"no route {method} /api{path}")

    def _sandbox(self, sandbox_id: str) -> FakeSandbox:
        with self._lock:
            sandbox = self.sandboxes.get(sandbox_id)
            if sandbox is None or sandbox.current_state() == "destroyed":
                raise _HttpError(404, f"sandbox {sandbox_id} not found")
            return sandbox

    def _create_sandbox(self, body: dict[str, Any]) -> tuple[int, Any]:
        if self.create_delay_s:
            time.sleep(self.create_delay_s)
        sandbox_id = str(uuid.uuid4())
        root = self.root / sandbox_id
        (root / "home" / "daytona").mkdir(parents=True)
        for remote, content in self.snapshot_files.get(body.get("snapshot") or "", {}).items():
            target = root / remote.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                target.symlink_to(content)
            else:
                target.write_bytes(content)
        sandbox = FakeSandbox(
            id=sandbox_id,
            create_body=body,
            root=root,
            state="creating",
            labels=dict(body.get("labels") or {}),
            env=dict(body.get("env") or {}),
        )
        if self.create_state == "started":
            sandbox.state = "started"
        with self._lock:
            self.sandboxes[sandbox_id] = sandbox
        return 200, self._dto(sandbox)

    def _list_sandboxes(self, query: dict[str, list[str]]) -> dict[str, Any]:
        wanted = json.loads(query["labels"][0]) if "labels" in query else {}
        with self._lock:
            items = [
                self._dto(s)
                for s in self.sandboxes.values()
                if s.current_state() != "destroyed"
                and all(s.labels.get(k) == v for k, v in wanted.items())
            ]
        return {"items": items, "nextCursor": None}

    def _start_sandbox(self, sandbox: FakeSandbox) -> dict[str, Any]:
        with self._lock:
            if sandbox.current_state() != "started":
                sandbox.state = "starting"
                sandbox.next_state = "started"
                sandbox.state_until = time.time() + self.start_delay_s
            return self._dto(sandbox)

    def _delete_sandbox(self, sandbox: FakeSandbox) -> dict[str, Any]:
        with self._lock:
            self._kill_all(sandbox)
            sandbox.state, sandbox.next_state, sandbox.state_until = "destroyed", None, None
            shutil.rmtree(sandbox.root, ignore_errors=True)
            return self._dto(sandbox)

    def _create_snapshot(self, body: dict[str, Any]) -> dict[str, Any]:
        snapshot_id = str(uuid.uuid4())
        build = body.get("buildInfo")
        snapshot = {
            "id": snapshot_id,
            "organizationId": "org-fake",
            "general": False,
            "name": body["name"],
            "imageName": body.get("imageName"),
            "state": "active",
            "size": 1.0,
            "entrypoint": body.get("entrypoint"),
            "cpu": body.get("cpu") or 1,
            "gpu": 0,
            "mem": body.get("memory") or 1,
            "disk": body.get("disk") or 3,
            "errorReason": None,
            "createdAt": _now(),
            "updatedAt": _now(),
            "lastUsedAt": None,
            "sourceSandboxId": None,
            "buildInfo": (
                {**build, "createdAt": _now(), "updatedAt": _now(), "snapshotRef": snapshot_id}
                if build
                else None
            ),
        }
        with self._lock:
            self.snapshots[snapshot_id] = snapshot
        return snapshot

    # ----- toolbox -----

    def _route_toolbox(
        self, sandbox: FakeSandbox, method: str, path: str, call: Call
    ) -> tuple[int, Any]:
        query = {k: v[0] for k, v in call.query.items()}
        if method == "POST" and path == "/files/bulk-upload":
            return 200, self._upload(sandbox, call.body or {})
        if method == "POST" and path == "/files/folder":
            sandbox.host_path(query["path"]).mkdir(parents=True, exist_ok=True)
            return 201, None
        if method == "DELETE" and path == "/files":
            target = sandbox.host_path(query["path"])
            if not target.exists():
                raise _HttpError(404, f"{query['path']} not found")
            if target.is_dir():
                if query.get("recursive") != "true":
                    raise _HttpError(400, "directory delete needs recursive=true")
                shutil.rmtree(target)
            else:
                target.unlink()
            return 204, None
        if method == "POST" and path == "/process/execute":
            return 200, self._execute(sandbox, call.body or {})
        if path == "/process/session" and method == "POST":
            session_id = (call.body or {})["sessionId"]
            with self._lock:
                if session_id in sandbox.sessions:
                    raise _HttpError(409, f"session {session_id} already exists")
                sandbox.sessions[session_id] = {}
            return 201, None
        match = re.match(
            r"^/process/session/([^/]+)(?:/(exec|command/([^/]+)(/logs|/input)?))?$", path
        )
        if not match:
            raise _HttpError(404, f"no toolbox route {method} {path}")
        session_id, action, command_id, sub = match[1], match[2], match[3], match[4]
        commands = sandbox.sessions.get(session_id)
        if commands is None:
            raise _HttpError(404, f"session {session_id} not found")
        if action is None and method == "DELETE":
            with self._lock:
                for cmd in commands.values():
                    _kill(cmd.proc)
                del sandbox.sessions[session_id]
            return 204, None
        if action is None and method == "GET":
            return 200, {
                "sessionId": session_id,
                "commands": [_command_dto(c) for c in commands.values()],
            }
        if action == "exec" and method == "POST":
            return self._session_exec(sandbox, commands, call.body or {})
        cmd = commands.get(command_id or "")
        if cmd is None:
            raise _HttpError(404, f"command {command_id} not found")
        if sub is None and method == "GET":
            return 200, _command_dto(cmd)
        if sub == "/logs" and method == "GET":
            with cmd.lock:
                return 200, {
                    "output": cmd.output.decode("utf-8", "replace"),
                    "stdout": cmd.stdout.decode("utf-8", "replace"),
                    "stderr": cmd.stderr.decode("utf-8", "replace"),
                }
        if sub == "/input" and method == "POST":
            return self._send_input(cmd, (call.body or {})["data"])
        raise _HttpError(404, f"no toolbox route {method} {path}")

    def _upload(self, sandbox: FakeSandbox, form: dict[str, Any]) -> list[dict[str, Any]]:
        index = 0
        while f"files[{index}].path" in form:
            target = sandbox.host_path(form[f"files[{index}].path"])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(form[f"files[{index}].file"])
            index += 1
        return []

    def _spawn(
        self, sandbox: FakeSandbox, command: str, cwd: str | None
    ) -> subprocess.Popen[bytes]:
        env = {**sandbox.env, "PATH": SANDBOX_PATH, "HOME": str(sandbox.host_path("/home/daytona"))}
        return subprocess.Popen(
            ["bash", "-c", sandbox.host_command(command)],
            cwd=sandbox.host_path(cwd or "/home/daytona"),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def _execute(self, sandbox: FakeSandbox, body: dict[str, Any]) -> dict[str, Any]:
        proc = self._spawn(sandbox, body["command"], body.get("cwd"))
        try:
            out, err = proc.communicate(timeout=body.get("timeout") or 10)
        except subprocess.TimeoutExpired:
            _kill(proc)
            out, err = proc.communicate()
        return {"exitCode": proc.returncode, "result": (out + err).decode("utf-8", "replace")}

    def _session_exec(
        self, sandbox: FakeSandbox, commands: dict[str, FakeCommand], body: dict[str, Any]
    ) -> tuple[int, Any]:
        proc = self._spawn(sandbox, body["command"], None)
        cmd = FakeCommand(
            id=str(uuid.uuid4()),
            command=body["command"],
            proc=proc,
            echo_input=not body.get("suppressInputEcho", False),
        )
        for stream, buffer in ((proc.stdout, cmd.stdout), (proc.stderr, cmd.stderr)):
            reader = threading.Thread(target=_pump, args=(stream, buffer, cmd), daemon=True)
            reader.start()
            cmd.readers.append(reader)
        with self._lock:
            commands[cmd.id] = cmd
        if body.get("runAsync") or body.get("async"):
            return 202, {"cmdId": cmd.id}
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
        for reader in cmd.readers:
            reader.join()
        with cmd.lock:
            return 200, {
                "cmdId": cmd.id,
                "exitCode": proc.returncode,
                "output": cmd.output.decode("utf-8", "replace"),
                "stdout": cmd.stdout.decode("utf-8", "replace"),
                "stderr": cmd.stderr.decode("utf-8", "replace"),
            }

    def _send_input(self, cmd: FakeCommand, data: str) -> tuple[int, Any]:
        if cmd.proc.poll() is not None or cmd.proc.stdin is None:
            raise _HttpError(410, f"command {cmd.id} has ended")
        if cmd.echo_input:
            with cmd.lock:
                cmd.stdout.extend(data.encode())
                cmd.output.extend(data.encode())
        try:
            cmd.proc.stdin.write(data.encode())
            cmd.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise _HttpError(410, f"command {cmd.id} has ended") from exc
        return 204, None


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> dict[str, Any]:
    return {"statusCode": status, "message": message, "path": "", "timestamp": _now()}


def _send_json(req: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
    data = b"" if status == 204 else json.dumps(payload).encode()
    req.send_response(status)
    if status != 204:
        req.send_header("Content-Type", "application/json")
    req.send_header("Content-Length", str(len(data)))
    req.end_headers()
    req.wfile.write(data)


def _parse_multipart(content_type: str, raw: bytes) -> dict[str, Any]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
    )
    form: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        form[str(name)] = payload if part.get_filename() else payload.decode()
    return form


def _pump(stream: Any, buffer: bytearray, cmd: FakeCommand) -> None:
    for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
        with cmd.lock:
            buffer.extend(chunk)
            cmd.output.extend(chunk)


def _command_dto(cmd: FakeCommand) -> dict[str, Any]:
    return {"id": cmd.id, "command": cmd.command, "exitCode": cmd.exit_code()}


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
