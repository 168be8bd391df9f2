"""Where the lake lives: one URI (`MEMCITY_LAKE_URI`), a local folder or object storage.

`Lake.of` takes a local path or an `s3://`, `gs://` or `az://` (also `abfs://`) URI. The
credentials of object storage come from each store's standard environment variables, read when
the lake is used (so a run process sees its own environment):

- S3: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
  `AWS_ENDPOINT_URL` (S3-compatible servers) and `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint;
- GCS: `GOOGLE_APPLICATION_CREDENTIALS` (or `GOOGLE_SERVICE_ACCOUNT`);
- Azure: `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY` (or `AZURE_STORAGE_SAS_KEY`).

Delta tables (`lake.delta`) are reached by delta-rs with `storage_options()`; every other file
of the lake (BM25 index folders, trajectories, markers) through `store()`, an obstore store of
the same location.

Every request to object storage has deadlines, the same for delta-rs and obstore (both on the
`object_store` crate), set here rather than left to the libraries' defaults: connecting
`CONNECT_TIMEOUT` (5 s), each request `REQUEST_TIMEOUT` (30 s, body included), and the retries
of one failed request (object_store's backoff) stop after `RETRY_TIMEOUT` (60 s; object_store's
own default is 3 minutes). A store that accepts connections and never answers fails a call in
about 90 s rather than hanging it.
"""

import os
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "azure")

_ENV_OPTIONS: dict[str, tuple[str, ...]] = {
    "s3": (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ALLOW_HTTP",
    ),
    "gs": ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_SERVICE_ACCOUNT"),
    "az": (
        "AZURE_STORAGE_ACCOUNT_NAME",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_SAS_KEY",
        "AZURE_STORAGE_CLIENT_ID",
        "AZURE_STORAGE_CLIENT_SECRET",
        "AZURE_STORAGE_TENANT_ID",
    ),
}
_FAMILY = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs"}

CONNECT_TIMEOUT_S = 5
REQUEST_TIMEOUT_S = 30
RETRY_TIMEOUT_S = 60
MAX_RETRIES = 10


def _scheme(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    return head.lower() if sep else ""


@dataclass(frozen=True)
class Lake:
    """The lake's root: `uri` is an absolute local path or an object-storage URI."""

    uri: str

    @classmethod
    def of(cls, where: "Lake | str | Path") -> "Lake":
        """A Lake from a Lake, a local path, a `file://` URI or an object-storage URI."""
        if isinstance(where, Lake):
            return where
        text = str(where)
        scheme = _scheme(text)
        if scheme == "file":
            text = text[len("file://") :]
            scheme = ""
        if scheme and scheme not in REMOTE_SCHEMES:
            raise ValueError(
                f"unsupported lake URI {text!r}: use a local path or s3://, gs://, az:// URI"
            )
        if not scheme:
            return cls(str(Path(text).expanduser().resolve()))
        return cls(text.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return not _scheme(self.uri)

    @property
    def path(self) -> Path:
        """The local folder of a local lake (ValueError for object storage)."""
        if not self.is_local:
            raise ValueError(f"the lake at {self.uri} is not a local folder")
        return Path(self.uri)

    def join(self, *parts: str) -> str:
        """The URI (or local path) of `parts` below the root, joined with `/`."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.uri}/{rel}" if rel else self.uri

    def __str__(self) -> str:
        return self.uri

    def storage_options(self) -> dict[str, str]:
        """delta-rs options of this location: the credentials of the standard environment
        variables and the deadlines (empty for a local lake)."""
        family = _FAMILY.get(_scheme(self.uri), "az" if not self.is_local else "")
        if not family:
            return {}
        options = {name: os.environ[name] for name in _ENV_OPTIONS[family] if os.environ.get(name)}
        return {
            **options,
            "connect_timeout": f"{CONNECT_TIMEOUT_S}s",
            "timeout": f"{REQUEST_TIMEOUT_S}s",
            "max_retries": str(MAX_RETRIES),
            "retry_timeout": f"{RETRY_TIMEOUT_S}s",
        }

    @cached_property
    def _store(self) -> Any:
        import obstore.store

        if self.is_local:
            return obstore.store.LocalStore(self.path, mkdir=True)
        options = {k.lower(): v for k, v in self.storage_options().items()}
        if "aws_endpoint_url" in options:
            options["aws_endpoint"] = options.pop("aws_endpoint_url")
        client: dict[str, Any] = {
            "connect_timeout": options.pop("connect_timeout"),
            "timeout": options.pop("timeout"),
        }
        allow_http = options.pop("aws_allow_http", None)
        if allow_http:
            client["allow_http"] = allow_http.lower() == "true"
        retry = {
            "max_retries": int(options.pop("max_retries")),
            "retry_timeout": timedelta(seconds=RETRY_TIMEOUT_S),
        }
        options.pop("retry_timeout")
        return obstore.store.from_url(
            self.uri, config=options or None, client_options=client, retry_config=retry
        )

    def store(self) -> Any:
        """An obstore store rooted at the lake (paths relative to the root)."""
        return self._store
