"""Build the Daytona snapshot that RLM sandboxes start from (`memcity daytona create-snapshot`).

The image is Debian slim with Python 3.12, numpy, pandas and scipy, Bun (:data:`BUN_VERSION`,
installed with npm from Debian's Node.js, which stays as the fallback interpreter) for the
``bun`` runtime, and our REPL servers written to :data:`BAKED_SERVER_PATH` and
:data:`BAKED_JS_SERVER_PATH`. The servers' sources travel inside the Dockerfile (base64 in a
``RUN`` line) rather than as a build-context upload, so the build needs nothing but the
Dockerfile. Nothing secret goes into the image: no API key, no environment variable.
Sandboxes created from a snapshot take their CPU, memory and disk from it, so these are set here.
"""

import base64
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the SDK is imported when a snapshot is built (it takes about 1 s to import)
    from daytona import CreateSnapshotParams, Daytona, Image

DEFAULT_SNAPSHOT = "memcity-rlm-v1"
PYTHON_VERSION = "3.12"
PACKAGES = ("numpy", "pandas", "scipy")
BUN_VERSION = "1.4.5"
BAKED_SERVER_PATH = "/opt/memcity/repl_server.py"
BAKED_JS_SERVER_PATH = "/opt/memcity/repl_server.js"
SERVER_SOURCE = Path(__file__).resolve().parent / "servers" / "repl_server.py"
JS_SERVER_SOURCE = SERVER_SOURCE.with_name("repl_server.js")
BAKED_PATHS = {"python": BAKED_SERVER_PATH, "bun": BAKED_JS_SERVER_PATH}
# One Dockerfile line must stay well below Linux's 128 KiB limit for a single argument.
_MAX_INLINE_BYTES = 90_000


BUILD_TIMEOUT_S = 3600.0
"""The deadline of building and registering a snapshot (the SDK's default is none)."""


def server_source(runtime: str = "python") -> bytes:
    """The REPL server's source of `runtime` (python or bun), as the host has it."""
    return (JS_SERVER_SOURCE if runtime == "bun" else SERVER_SOURCE).read_bytes()


def server_digest(source: bytes | None = None, runtime: str = "python") -> str:
    """SHA-256 (hex) of a REPL server's source: tells whether a baked copy is current."""
    return hashlib.sha256(server_source(runtime) if source is None else source).hexdigest()


def _write_file_command(code: bytes, path: str) -> str:
    """A shell command that writes `code` to `path` (base64 inline, mode 0644)."""
    encoded = base64.b64encode(code).decode("ascii")
    if len(encoded) > _MAX_INLINE_BYTES:
        raise ValueError(f"REPL server source is too large to inline ({len(code)} bytes)")
    directory = path.rsplit("/", 1)[0]
    return f"mkdir -p {directory} && echo {encoded} | base64 -d > {path} && chmod 0644 {path}"


def snapshot_image(source: bytes | None = None, js_source: bytes | None = None) -> "Image":
    """The declarative image: Python 3.12 slim + packages + Bun + the REPL servers."""
    from daytona import Image

    code = server_source() if source is None else source
    js_code = server_source("bun") if js_source is None else js_source
    return (
        Image.debian_slim(PYTHON_VERSION)
        .pip_install(list(PACKAGES))
        .run_commands(
            "apt-get update && apt-get install -y --no-install-recommends nodejs npm"
            f" && npm install -g bun@{BUN_VERSION} && npm cache clean --force"
            " && rm -rf /var/lib/apt/lists/* && bun --version",
            _write_file_command(code, BAKED_SERVER_PATH),
            _write_file_command(js_code, BAKED_JS_SERVER_PATH),
        )
        .workdir("/home/daytona")
    )


class SnapshotError(RuntimeError):
    """The snapshot could not be built or registered; the message says why, on one line."""


def create_snapshot(
    name: str = DEFAULT_SNAPSHOT,
    *,
    daytona: "Daytona | None" = None,
    cpu: int = 2,
    memory_gib: int = 4,
    disk_gib: int = 8,
    on_logs: Callable[[str], None] | None = None,
) -> None:
    """Build and register the snapshot ``name`` with the given default sandbox resources.

    ``daytona`` defaults to a client configured from ``DAYTONA_API_KEY`` / ``DAYTONA_API_URL``.
    Raises :class:`SnapshotError` with the service's reason when the client cannot be made or
    the build or registration fails (for example, a snapshot of that name already exists).
    """
    from daytona import Daytona, DaytonaError

    params = snapshot_params(name, cpu=cpu, memory_gib=memory_gib, disk_gib=disk_gib)
    try:
        client = daytona if daytona is not None else Daytona()
        client.snapshot.create(params, on_logs=on_logs, timeout=BUILD_TIMEOUT_S)
    except DaytonaError as exc:
        reason = " ".join(str(exc).split())
        raise SnapshotError(f"Could not create Daytona snapshot {name!r}: {reason}") from exc


def snapshot_params(
    name: str = DEFAULT_SNAPSHOT, *, cpu: int = 2, memory_gib: int = 4, disk_gib: int = 8
) -> "CreateSnapshotParams":
    """The snapshot request: the image and the resources every sandbox made from it gets
    (``cpu`` vCPUs, ``memory_gib`` GiB of RAM, ``disk_gib`` GiB of disk; the spec's
    ``sandboxCpu``/``sandboxMemory``/``sandboxDisk``, 2/4/8 by default)."""
    from daytona import CreateSnapshotParams, Resources

    return CreateSnapshotParams(
        name=name,
        image=snapshot_image(),
        resources=Resources(cpu=cpu, memory=memory_gib, disk=disk_gib),
    )
