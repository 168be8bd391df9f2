"""Build the Daytona snapshot that RLM sandboxes start from (`memcity daytona create-snapshot`).

The image is Debian slim with Python 3.12, numpy, pandas and scipy, and our REPL server written
to :data:`BAKED_SERVER_PATH`. The server's source travels inside the Dockerfile (base64 in a
``RUN`` line) rather than as a build-context upload, so the build needs nothing but the
Dockerfile. Nothing secret goes into the image: no API key, no environment variable.
Sandboxes created from a snapshot take their CPU, memory and disk from it, so these are set here.
"""

import base64
import hashlib
from collections.abc import Callable
from pathlib import Path

from daytona import CreateSnapshotParams, Daytona, DaytonaError, Image, Resources

DEFAULT_SNAPSHOT = "memcity-rlm-v1"
PYTHON_VERSION = "3.12"
PACKAGES = ("numpy", "pandas", "scipy")
BAKED_SERVER_PATH = "/opt/memcity/repl_server.py"
SERVER_SOURCE = Path(__file__).with_name("repl_server.py")
# One Dockerfile line must stay well below Linux's 128 KiB limit for a single argument.
_MAX_INLINE_BYTES = 90_000


def server_source() -> bytes:
    """The REPL server's source, as the host has it."""
    return SERVER_SOURCE.read_bytes()


def server_digest(source: bytes | None = None) -> str:
    """SHA-256 (hex) of the REPL server's source: tells whether a baked copy is current."""
    return hashlib.sha256(server_source() if source is None else source).hexdigest()


def snapshot_image(source: bytes | None = None) -> Image:
    """The declarative image: Python 3.12 slim + packages + the REPL server at a fixed path."""
    code = server_source() if source is None else source
    encoded = base64.b64encode(code).decode("ascii")
    if len(encoded) > _MAX_INLINE_BYTES:
        raise ValueError(f"REPL server source is too large to inline ({len(code)} bytes)")
    directory = BAKED_SERVER_PATH.rsplit("/", 1)[0]
    return (
        Image.debian_slim(PYTHON_VERSION)
        .pip_install(list(PACKAGES))
        .run_commands(
            f"mkdir -p {directory} && echo {encoded} | base64 -d > {BAKED_SERVER_PATH}"
            f" && chmod 0644 {BAKED_SERVER_PATH}"
        )
        .workdir("/home/daytona")
    )


def create_snapshot(
    name: str = DEFAULT_SNAPSHOT,
    *,
    daytona: Daytona | None = None,
    cpu: int = 2,
    memory_gib: int = 4,
    disk_gib: int = 8,
    on_logs: Callable[[str], None] | None = None,
) -> None:
    """Build and register the snapshot ``name`` with the given default sandbox resources.

    ``daytona`` defaults to a client configured from ``DAYTONA_API_KEY`` / ``DAYTONA_API_URL``.
    Raises ``RuntimeError`` with the service's reason when the build or registration fails
    (for example, a snapshot of that name already exists).
    """
    client = daytona if daytona is not None else Daytona()
    params = CreateSnapshotParams(
        name=name,
        image=snapshot_image(),
        resources=Resources(cpu=cpu, memory=memory_gib, disk=disk_gib),
    )
    try:
        client.snapshot.create(params, on_logs=on_logs)
    except DaytonaError as exc:
        raise RuntimeError(f"Could not create Daytona snapshot {name!r}: {exc}") from exc
