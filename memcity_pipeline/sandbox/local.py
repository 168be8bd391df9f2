"""The local sandbox: one isolated OS process per session, started with bubblewrap (`bwrap`).

Each session runs a REPL server in its own process: ``sandbox/servers/repl_server.py`` under the host's
Python for the ``python`` runtime, ``sandbox/servers/repl_server.js`` for the ``bun`` runtime under a
JavaScript interpreter (:func:`find_js_interpreter`: the configured one, else ``bun`` on PATH,
else the project's ``node_modules`` Bun, else ``node`` >= 20 on PATH). Either way:

- **Filesystem.** A fresh root with only ``/usr``, ``/lib``, ``/lib64``, ``/bin`` and the Python
  runtime's prefix bound read-only, the server script read-only at ``/opt/memcity``, private
  ``/proc``, ``/dev`` and a size-capped tmpfs ``/tmp``, and the session's own directory
  (``<sessions_root>/<session_id>``, removed on close) bound read-write as the working directory
  and ``HOME`` (``/home/sandbox``). Nothing else of the host is visible: not the lake, not the
  repository, not the configuration, not other sessions.
- **Namespaces.** Own PID, network (loopback only, nothing listening), IPC and UTS namespaces; as
  a normal user also a user namespace. When the host runs as root, the code runs as an
  unprivileged per-session uid (``setpriv``), so process-count limits apply and no capability
  is left.
- **Environment.** Cleared; only ``PATH``, ``HOME``, ``LANG`` and ``MALLOC_ARENA_MAX``. No key.
- **Limits.** ``setrlimit`` on CPU seconds, address space, open files, process count, file
  size, no core dumps (JavaScript engines reserve virtual memory up front, so their address
  space limit is ``memory_mb`` plus :data:`JS_ADDRESS_SPACE_HEADROOM_MB`; Node.js's heap is
  also capped at ``memory_mb`` with ``--max-old-space-size``); its own session and process group; a wall-clock timeout per execution
  (soft in the server, then a hard kill of the process group and the session uid's processes).

**What the process sends is bounded on the host** (see ``sandbox.base``): its stdout is read a
line at a time, never more than ``MAX_LINE_BYTES`` of a line, and of its stderr only the last
:data:`STDERR_TAIL_LINES` lines (cut at :data:`STDERR_LINE_BYTES`) are kept.

**Fail closed.** Where ``bwrap`` cannot run (missing, no user namespaces, a seccomp profile
that forbids them), opening a session raises a one-line :class:`SandboxError` saying how to fix
it (:func:`isolation_refusal`): no LLM-written code runs. Only an explicit ``isolation="none"``
(``MEMCITY_SANDBOX_ISOLATION=none``) starts the same server **without** the filesystem, PID and
network isolation: only the limits, the scrubbed environment, its own working directory and, as
root, its own uid. That is logged as a loud warning once per backend and shown by
``LocalSandboxBackend.isolated``.

This module stays whole: the bwrap command line, the resource limits, interpreter discovery and
the opt-out without namespaces are one isolation story, reviewed together.
"""

import contextlib
import functools
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from memcity_pipeline.sandbox.base import (
    DEFAULT_MAX_OUTPUT_CHARS,
    JS_REPL_SERVER_PATH,
    REPL_SERVER_PATH,
    LLMHandler,
    ReplClient,
    ReplSession,
    SandboxBackend,
    SandboxError,
    ToolHandler,
    check_runtime,
    read_lines,
)

log = logging.getLogger(__name__)

Isolation = Literal["bwrap", "none"]
ISOLATIONS: tuple[Isolation, ...] = ("bwrap", "none")
DEFAULT_BWRAP = "/usr/bin/bwrap"
SANDBOX_HOME = "/home/sandbox"
SANDBOX_SERVER = "/opt/memcity/repl_server.py"
SANDBOX_JS_SERVER = "/opt/memcity/repl_server.js"
SANDBOX_BIN = "/opt/memcity/bin"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_BUNS = (
    PROJECT_ROOT / "node_modules" / ".bin" / "bun",
    PROJECT_ROOT / "node_modules" / "@oven" / "bun-linux-x64" / "bin" / "bun",
)
MIN_NODE_MAJOR = 20
JS_ADDRESS_SPACE_HEADROOM_MB = 1024
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
UID_BASE = 200_000
UID_SPAN = 50_000
_SIGNAL_MEANING = {
    signal.SIGXCPU: "CPU time limit reached",
    signal.SIGKILL: "killed",
    signal.SIGSEGV: "crashed",
    signal.SIGXFSZ: "file size limit reached",
}

_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()
_uids_in_use: set[int] = set()
_uids_lock = threading.Lock()


def _spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen:
    """Start a process from one long-lived thread.

    ``bwrap --die-with-parent`` ties the sandbox to the thread that forked it; a worker thread
    that ends would take the sandbox with it, so every sandbox is forked by this thread.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(1, thread_name_prefix="sandbox-spawner")
    return _spawner.submit(subprocess.Popen, argv, **kwargs).result()


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _reserve_uid() -> int:
    """A free unprivileged uid for one session (root hosts only)."""
    with _uids_lock:
        while True:
            uid = UID_BASE + random.randrange(UID_SPAN)
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


def _release_uid(uid: int | None) -> None:
    if uid is None:
        return
    with _uids_lock:
        _uids_in_use.discard(uid)


def _tasks_of_uid(uid: int) -> int:
    """How many tasks (threads) the uid runs now: RLIMIT_NPROC counts them all."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)]:
            total += int(fields.get("Threads", "1").strip() or 1)
    return total


def _readable_by_anyone(path: Path) -> bool:
    """True if an unprivileged user can reach and execute `path`."""
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        return all(os.stat(p).st_mode & stat.S_IXOTH for p in path.parents)
    except OSError:
        return False


def default_python() -> Path:
    """The host's base interpreter (not the virtualenv): the REPL server needs only stdlib."""
    real = Path(os.path.realpath(sys.executable))
    if real.exists():
        return real
    return Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"


@functools.cache
def _python_is_recent(python: str) -> bool:
    """True if `python` runs and is >= 3.11."""
    try:
        done = subprocess.run(
            [python, "-I", "-c", "import sys; print(sys.version_info >= (3, 11))"],
            capture_output=True,
            text=True,
            timeout=20,
            env={"PATH": SANDBOX_PATH},
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.stdout.strip() == "True"


@dataclass(frozen=True)
class JsInterpreter:
    """A JavaScript interpreter for the ``bun`` runtime: Bun, or Node.js >= 20."""

    path: Path  # the real binary (symlinks resolved)
    kind: Literal["bun", "node"]
    version: str

    def arguments(self, memory_mb: int) -> list[str]:
        """Interpreter options placed before the server script."""
        if self.kind == "node":
            return [f"--max-old-space-size={memory_mb}", "--disallow-code-generation-from-strings"]
        return ["--no-env-file", "--no-install"]

    def environment(self) -> dict[str, str]:
        """Variables added to the sandbox environment (none carries host data)."""
        if self.kind == "bun":
            return {"BUN_RUNTIME_TRANSPILER_CACHE_PATH": "0", "NO_COLOR": "1"}
        return {"NO_COLOR": "1"}


@functools.cache
def _identify_js(path: str) -> JsInterpreter | str:
    """The interpreter at `path`, or why it cannot serve (`--version` fails, Node.js too old)."""
    try:
        done = subprocess.run(
            [path, "--version"],
            capture_output=True,
            text=True,
            timeout=20,
            env={"PATH": SANDBOX_PATH},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{path} does not run: {exc}"
    version = done.stdout.strip()
    if done.returncode != 0 or not version:
        return f"{path} --version failed: {(done.stderr or done.stdout).strip()[-300:]}"
    real = Path(os.path.realpath(path))
    if version.startswith("v"):
        major = version[1:].split(".", 1)[0]
        if not major.isdigit() or int(major) < MIN_NODE_MAJOR:
            return f"{path} is Node.js {version}; the bun runtime needs Node.js >= {MIN_NODE_MAJOR}"
        return JsInterpreter(real, "node", version[1:])
    return JsInterpreter(real, "bun", version)


def find_js_interpreter(configured: str | None = None) -> JsInterpreter:
    """The interpreter of the ``bun`` runtime; SandboxError when there is none.

    Order: `configured` (only it, when given), ``bun`` on PATH, the project's
    ``node_modules`` Bun (``scripts/install.sh``), ``node`` on PATH.
    """
    if configured:
        found = shutil.which(configured) or configured
        identified = _identify_js(found) if Path(found).exists() else f"{configured} not found"
        if isinstance(identified, str):
            raise SandboxError(f"the configured JavaScript interpreter is unusable: {identified}")
        return identified
    candidates = [shutil.which("bun"), *(str(p) for p in PROJECT_BUNS), shutil.which("node")]
    problems = []
    for candidate in candidates:
        if candidate is None or not Path(candidate).exists():
            continue
        identified = _identify_js(candidate)
        if isinstance(identified, JsInterpreter):
            return identified
        problems.append(identified)
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise SandboxError(
        "no JavaScript interpreter for the bun runtime: install Bun (scripts/install.sh puts it "
        f"in node_modules) or Node.js >= {MIN_NODE_MAJOR}, or set the sandbox's bun option" + detail
    )


def _system_node(unreachable: JsInterpreter) -> JsInterpreter:
    """Node.js on the sandbox's PATH, for an interpreter the sandbox user cannot reach."""
    found = shutil.which("node", path=SANDBOX_PATH)
    node = _identify_js(found) if found else "no node on " + SANDBOX_PATH
    if isinstance(node, str) or not _readable_by_anyone(node.path):
        why = node if isinstance(node, str) else f"{node.path} is not reachable either"
        raise SandboxError(
            f"{unreachable.path} is not reachable by an unprivileged user ({why}); install Bun "
            "or Node.js system-wide or set the sandbox bun option"
        )
    log.warning(
        "%s is not reachable by the sandbox user; the bun runtime runs on Node.js %s",
        unreachable.path,
        node.version,
    )
    return node


@functools.cache
def _bwrap_supports_size(bwrap: str) -> bool:
    try:
        done = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--size" in done.stdout + done.stderr


@functools.cache
def bwrap_trial(bwrap: str, python: str) -> str | None:
    """Run the sandbox command once with a trivial program: None if it works, else why not."""
    if not Path(bwrap).exists():
        return f"{bwrap} not found (Debian: apt-get install bubblewrap)"
    uid = UID_BASE - 1 if _running_as_root() else None
    with _TrialDir() as workdir:
        argv = bwrap_argv(bwrap, Path(python), workdir, uid=uid, tmp_bytes=16 << 20)
        argv += ["-c", "import os; print('ok', os.getpid())"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env={})
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"a trial run of {bwrap} failed: {exc}"
    if done.returncode != 0 or not done.stdout.startswith("ok"):
        detail = done.stderr.strip()[-500:] or "no error output"
        return f"a trial run of {bwrap} exited {done.returncode}: {detail}"
    return None


def find_bwrap() -> str:
    """The bubblewrap binary: ``bwrap`` on PATH, else :data:`DEFAULT_BWRAP`."""
    return shutil.which("bwrap") or DEFAULT_BWRAP


def isolation_refusal(reason: str) -> str:
    """The one-line refusal to run code without isolation, with `reason` and the three fixes."""
    reason = " ".join(reason.split())
    return (
        f"bubblewrap cannot isolate sandboxed code here ({reason}): install bubblewrap with "
        "user namespaces enabled, use MEMCITY_SANDBOX=daytona, or set "
        "MEMCITY_SANDBOX_ISOLATION=none to run it without isolation"
    )


class _TrialDir:
    """A throwaway directory for the bwrap trial."""

    def __enter__(self) -> Path:
        import tempfile

        self.path = Path(tempfile.mkdtemp(prefix="memcity-bwrap-trial-"))
        return self.path

    def __exit__(self, *exc_info: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def bwrap_argv(
    bwrap: str,
    python: Path,
    workdir: Path,
    *,
    uid: int | None,
    tmp_bytes: int,
    server: Path | None = None,
    js: JsInterpreter | None = None,
    memory_mb: int = 2048,
) -> list[str]:
    """The full bwrap command line that runs `python -I -u <server>` in a sandbox.

    `uid` (root hosts only): the unprivileged uid the code runs as, via ``setpriv``.
    Without `server`, the caller appends the interpreter's arguments (the trial does).
    With `js`, the sandbox runs that interpreter (bound read-only at ``/opt/memcity/bin``) on
    the JavaScript `server` instead, and no Python is bound.
    """
    argv = [bwrap]
    if uid is None:
        argv += ["--unshare-all"]
    else:  # real root: no user namespace (it would map to root), drop to `uid` instead
        argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
        argv += ["--unshare-cgroup-try"]
    argv += ["--clearenv", "--die-with-parent", "--new-session"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for extra in ("/lib", "/lib64", "/bin"):
        argv += ["--ro-bind-try", extra, extra]
    runtime = None if js is not None else _runtime_root(python)
    if runtime is not None:
        argv += [*_parent_dirs(runtime), "--ro-bind", str(runtime), str(runtime)]
    sandbox_server = SANDBOX_SERVER if js is None else SANDBOX_JS_SERVER
    if server is not None:
        argv += [*_parent_dirs(Path(sandbox_server)), "--ro-bind", str(server), sandbox_server]
    if js is not None:
        binary = f"{SANDBOX_BIN}/{js.kind}"
        argv += [*_parent_dirs(Path(binary)), "--ro-bind", str(js.path), binary]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    if _bwrap_supports_size(bwrap):
        argv += ["--size", str(tmp_bytes)]
    argv += ["--tmpfs", "/tmp"]
    argv += _parent_dirs(Path(SANDBOX_HOME))
    argv += ["--bind", str(workdir), SANDBOX_HOME, "--chdir", SANDBOX_HOME]
    env = sandbox_env(SANDBOX_HOME)
    if js is not None:
        env.update(js.environment())
    for key, value in env.items():
        argv += ["--setenv", key, value]
    if uid is not None:
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--"]
        argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        argv += ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    else:
        argv += ["--"]
    if js is not None:
        return [*argv, f"{SANDBOX_BIN}/{js.kind}", *js.arguments(memory_mb), SANDBOX_JS_SERVER]
    argv += [str(python), "-I", "-u"]
    if server is not None:
        argv.append(SANDBOX_SERVER)
    return argv


def _parent_dirs(path: Path) -> list[str]:
    """bwrap arguments creating the ancestors of `path` traversable (bwrap's own are 0700)."""
    argv: list[str] = []
    for parent in reversed(path.parents[:-1]):
        argv += ["--perms", "0755", "--dir", str(parent)]
    return argv


def _runtime_root(python: Path) -> Path | None:
    """The directory to bind for the interpreter, or None when it lives under /usr."""
    if python.is_relative_to("/usr"):
        return None
    prefix = Path(sys.base_prefix).resolve()
    return prefix if python.is_relative_to(prefix) else python.parent.parent


def sandbox_env(home: str) -> dict[str, str]:
    """The whole environment of a sandbox process: nothing from the host."""
    return {
        "PATH": SANDBOX_PATH,
        "HOME": home,
        "LANG": "C.UTF-8",
        "MALLOC_ARENA_MAX": "2",
    }


def _limits_setter(limits: dict[int, int]) -> Callable[[], None]:
    """A `preexec_fn` that applies resource limits in the child before exec."""

    def apply() -> None:
        for which, value in limits.items():
            _, hard = resource.getrlimit(which)
            # CPU: the soft limit sends SIGXCPU (a clear reason), the hard one SIGKILL later.
            soft_hard = (value, value + 1) if which == resource.RLIMIT_CPU else (value, value)
            if hard != resource.RLIM_INFINITY:
                soft_hard = (min(soft_hard[0], hard), min(soft_hard[1], hard))
            resource.setrlimit(which, soft_hard)

    return apply


def _kill_uid(uid: int) -> None:
    """Kill every process of a session uid (root hosts): nothing the code forked survives."""
    kill = shutil.which("kill", path="/usr/bin:/bin")
    if kill is None:
        return
    try:
        subprocess.run(
            [kill, "-KILL", "-1"],
            user=uid,
            group=uid,
            extra_groups=[],
            env={"PATH": SANDBOX_PATH},
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not kill the processes of sandbox uid %s: %s", uid, exc)


class LocalSandboxSession(ReplSession):
    """A session in one local sandbox process; its directory is removed on close."""

    def __init__(
        self,
        client: ReplClient,
        process: subprocess.Popen,
        workdir: Path,
        *,
        uid: int | None,
        isolated: bool,
        stderr_tail: deque[str],
        on_release: Callable[[str], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(client, **kwargs)
        self.on_release = on_release
        self.process = process
        self.workdir = workdir
        self.uid = uid
        self.isolated = isolated
        self.stderr_tail = stderr_tail

    def load_context(self, context: str | list | dict) -> None:
        """Write the context into the session directory, load it from there, delete the file."""
        text = isinstance(context, str)
        name = ".context.txt" if text else ".context.json"
        path = self.workdir / name
        with open(path, "w", encoding="utf-8") as handle:
            if text:
                handle.write(context)
            else:
                json.dump(context, handle, ensure_ascii=False)
        if self.uid is not None:
            os.chown(path, self.uid, self.uid)
        try:
            self.context_info = self.client.load_context(path=name, text=text)
        finally:
            path.unlink(missing_ok=True)

    def _release(self) -> None:
        """Kill what is left of the process (group, uid) and remove the session directory."""
        kill_process_tree(self.process, self.uid)
        shutil.rmtree(self.workdir, ignore_errors=True)
        _release_uid(self.uid)
        if self.on_release is not None:
            self.on_release(self.session_id)


def kill_process_tree(process: subprocess.Popen, uid: int | None) -> None:
    """SIGKILL the process group (and, for a session uid, all its processes); reap."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    if uid is not None:
        _kill_uid(uid)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.warning("sandbox process %s did not exit after SIGKILL", process.pid)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _exit_reason(process: subprocess.Popen, stderr_tail: deque[str]) -> str:
    """Why the sandbox process ended, for error messages."""
    try:
        code = process.wait(timeout=2)
    except subprocess.TimeoutExpired:
        code = None
    parts = []
    if code is None:
        parts.append("process still running")
    else:
        sig = -code if code < 0 else (code - 128 if code > 128 else 0)
        if sig:
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
            meaning = _SIGNAL_MEANING.get(sig)
            parts.append(f"killed by {name}" + (f" ({meaning})" if meaning else ""))
        else:
            parts.append(f"exit status {code}")
    tail = "".join(stderr_tail).strip()
    if tail:
        parts.append("stderr: " + tail[-1500:])
    return "; ".join(parts)


STDERR_TAIL_LINES = 50
"""Lines of a sandbox process's stderr the host keeps (the rest is read and dropped)."""
STDERR_LINE_BYTES = 2000
"""The longest stderr line kept whole (a longer one is kept in pieces of this size)."""


def _drain(stream: IO[bytes], tail: deque[str]) -> None:
    """Keep the last lines of the server's stderr (diagnostics, stray writes): at most
    :data:`STDERR_TAIL_LINES` of :data:`STDERR_LINE_BYTES`, whatever the code writes."""
    for piece in iter(lambda: stream.readline(STDERR_LINE_BYTES), b""):
        tail.append(piece.decode("utf-8", "replace"))


class LocalSandboxBackend(SandboxBackend):
    """Sessions as local processes: isolated with bwrap, or (explicit opt-out) limits only.

    `isolation`: ``bwrap`` (the default: a trial run decides once; if bwrap cannot isolate,
    every `open_session` raises :func:`isolation_refusal`'s SandboxError) or ``none`` (never use
    bwrap; a loud warning). `bwrap`: its binary (default :func:`find_bwrap`). `js_interpreter`:
    the binary of the ``bun`` runtime (default: :func:`find_js_interpreter`'s search).
    """

    name = "local"

    def __init__(
        self,
        sessions_root: Path,
        *,
        cpu_seconds: int = 300,
        memory_mb: int = 2048,
        max_processes: int = 64,
        max_open_files: int = 256,
        max_file_mb: int = 512,
        tmp_mb: int = 256,
        exec_timeout_s: float = 120.0,
        kill_grace_s: float = 2.0,
        max_llm_concurrency: int = 4,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
        isolation: Isolation = "bwrap",
        bwrap: str | None = None,
        python: str | None = None,
        js_interpreter: str | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be bwrap or none, not {isolation!r}")
        self.sessions_root = Path(sessions_root).resolve()
        self.cpu_seconds = cpu_seconds
        self.memory_mb = memory_mb
        self.max_processes = max_processes
        self.max_open_files = max_open_files
        self.max_file_mb = max_file_mb
        self.tmp_mb = tmp_mb
        self.exec_timeout_s = exec_timeout_s
        self.kill_grace_s = kill_grace_s
        self.max_llm_concurrency = max_llm_concurrency
        self.max_output_chars = max_output_chars
        self.isolation = isolation
        self.bwrap = bwrap or find_bwrap()
        self.python = Path(python) if python else default_python()
        self.js_interpreter = js_interpreter
        self.start_timeout_s = start_timeout_s
        self.fallback_reason: str | None = None
        self._isolated: bool | None = None
        self._sessions: dict[str, LocalSandboxSession] = {}
        self._lock = threading.Lock()

    @property
    def isolated(self) -> bool:
        """True when sessions run inside bwrap, False when isolation is turned off.

        Decided once (a trial run of bwrap) and then fixed. Raises SandboxError (one line, see
        :func:`isolation_refusal`) when bwrap is required and cannot isolate: fail closed.
        """
        if self._isolated is None:
            self._isolated = self._decide_isolation()
        return self._isolated

    def _decide_isolation(self) -> bool:
        if self.isolation == "bwrap":
            reason = bwrap_trial(self.bwrap, str(self.python))
            if reason is not None:
                raise SandboxError(isolation_refusal(reason))
            return True
        self.fallback_reason = "isolation is turned off by configuration (isolation='none')"
        log.warning(
            "SANDBOX NOT ISOLATED: %s. Local sandbox sessions run with resource limits, a "
            "scrubbed environment and their own working directory only: they can read any "
            "host file readable by their user, see host processes, and open network "
            "connections. Install bubblewrap with working user namespaces and unset "
            "MEMCITY_SANDBOX_ISOLATION, or use MEMCITY_SANDBOX=daytona.",
            self.fallback_reason,
        )
        return False

    def open_session(
        self,
        org_id: str,
        llm_handler: LLMHandler,
        *,
        prelude: str | None = None,
        session_id: str | None = None,
        runtime: str = "python",
        tool_handler: ToolHandler | None = None,
    ) -> LocalSandboxSession:
        """Start one sandbox process for a new REPL session (`runtime` python or bun); its
        tool calls go to `tool_handler`."""
        session_id = session_id or uuid.uuid4().hex[:16]
        if not SESSION_ID_RE.match(session_id):
            raise ValueError(f"session_id must match {SESSION_ID_RE.pattern}: {session_id!r}")
        check_runtime(runtime)
        js = find_js_interpreter(self.js_interpreter) if runtime == "bun" else None
        isolated = self.isolated
        self.sessions_root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.sessions_root, 0o700)
        workdir = self.sessions_root / session_id
        try:
            workdir.mkdir(mode=0o700)
        except FileExistsError:
            raise ValueError(f"sandbox session {session_id!r} already exists") from None
        uid = _reserve_uid() if _running_as_root() else None
        try:
            session = self._start(
                org_id, session_id, workdir, uid, isolated, llm_handler, js, tool_handler
            )
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            _release_uid(uid)
            raise
        try:
            if prelude:
                session.run_prelude(prelude)
        except BaseException:
            session.close()
            raise
        with self._lock:
            self._sessions[session_id] = session
        return session

    def _limits(self, uid: int | None, js: JsInterpreter | None = None) -> dict[int, int]:
        nproc = self.max_processes
        if uid is None:  # the limit counts every task of our own uid, not only the sandbox's
            nproc += _tasks_of_uid(os.getuid())
        memory_mb = self.memory_mb
        if js is not None:  # V8 and JSC reserve virtual memory far beyond what they use
            memory_mb += JS_ADDRESS_SPACE_HEADROOM_MB
        return {
            resource.RLIMIT_CPU: self.cpu_seconds,
            resource.RLIMIT_AS: memory_mb << 20,
            resource.RLIMIT_NOFILE: self.max_open_files,
            resource.RLIMIT_NPROC: nproc,
            resource.RLIMIT_FSIZE: self.max_file_mb << 20,
            resource.RLIMIT_CORE: 0,
        }

    def _command(
        self, workdir: Path, uid: int | None, isolated: bool, js: JsInterpreter | None = None
    ) -> dict[str, Any]:
        """argv and Popen options for one session."""
        if isolated:
            argv = bwrap_argv(
                self.bwrap,
                self.python,
                workdir,
                uid=uid,
                tmp_bytes=self.tmp_mb << 20,
                server=REPL_SERVER_PATH if js is None else JS_REPL_SERVER_PATH,
                js=js,
                memory_mb=self.memory_mb,
            )
            return {"args": argv, "env": {}, "cwd": str(workdir)}
        if js is not None:
            return self._js_command(workdir, uid, js)
        python = self.python
        if uid is not None:
            os.chown(workdir, uid, uid)
            if not _readable_by_anyone(python):
                system = Path("/usr/bin/python3")
                if _readable_by_anyone(system) and _python_is_recent(str(system)):
                    python = system
                else:
                    raise SandboxError(
                        f"{python} is not reachable by an unprivileged user and no system "
                        "Python >= 3.11 exists; set the sandbox python option"
                    )
        source = REPL_SERVER_PATH.read_text(encoding="utf-8")
        options: dict[str, Any] = {
            "args": [str(python), "-I", "-u", "-c", source],
            "env": sandbox_env(str(workdir)),
            "cwd": str(workdir),
        }
        if uid is not None:
            options.update(user=uid, group=uid, extra_groups=[])
        return options

    def _js_command(self, workdir: Path, uid: int | None, js: JsInterpreter) -> dict[str, Any]:
        """argv and Popen options of a JavaScript session without bwrap.

        The server's source is passed with `-e`, so the checkout need not be readable by the
        sandbox user (`_start` has swapped an interpreter that user cannot reach).
        """
        if uid is not None:
            os.chown(workdir, uid, uid)
        source = JS_REPL_SERVER_PATH.read_text(encoding="utf-8")
        options: dict[str, Any] = {
            "args": [str(js.path), *js.arguments(self.memory_mb), "-e", source],
            "env": {**sandbox_env(str(workdir)), **js.environment()},
            "cwd": str(workdir),
        }
        if uid is not None:
            options.update(user=uid, group=uid, extra_groups=[])
        return options

    def _start(
        self,
        org_id: str,
        session_id: str,
        workdir: Path,
        uid: int | None,
        isolated: bool,
        llm_handler: LLMHandler,
        js: JsInterpreter | None = None,
        tool_handler: ToolHandler | None = None,
    ) -> LocalSandboxSession:
        if isolated and uid is not None:
            os.chown(workdir, uid, uid)
        if js is not None and not isolated and uid is not None and not _readable_by_anyone(js.path):
            js = _system_node(js)  # e.g. Bun inside a checkout private to root
        options = self._command(workdir, uid, isolated, js)
        process = _spawn(
            options.pop("args"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_limits_setter(self._limits(uid, js)),
            **options,
        )
        tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        threading.Thread(
            target=_drain,
            args=(process.stderr, tail),
            name=f"sandbox-{session_id}-stderr",
            daemon=True,
        ).start()

        def send_line(line: str) -> None:
            assert process.stdin is not None
            process.stdin.write(line.encode("utf-8"))
            process.stdin.flush()

        client = ReplClient(
            send_line,
            read_lines(process.stdout),  # type: ignore[arg-type]
            llm_handler,
            max_llm_concurrency=self.max_llm_concurrency,
            tool_handler=tool_handler,
            kill=lambda: kill_process_tree(process, uid),
            death_reason=lambda: _exit_reason(process, tail),
            name=f"sandbox {session_id}" + ("" if js is None else f" ({js.kind})"),
        )
        session = LocalSandboxSession(
            client,
            process,
            workdir,
            uid=uid,
            isolated=isolated,
            stderr_tail=tail,
            on_release=self._forget,
            session_id=session_id,
            org_id=org_id,
            exec_timeout_s=self.exec_timeout_s,
            kill_grace_s=self.kill_grace_s,
            max_output_chars=self.max_output_chars,
        )
        try:
            client.wait_ready(self.start_timeout_s)
        except BaseException:
            session.close()
            raise
        return session

    def _forget(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def close(self) -> None:
        """Close every session still open."""
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.close()
