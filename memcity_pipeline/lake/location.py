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
"""

import os
from dataclasses import dataclass
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
        """delta-rs / obstore options of this location, from the standard environment variables
        (empty for a local lake)."""
        family = _FAMILY.get(_scheme(self.uri), "az" if not self.is_local else "")
        if not family:
            return {}
        return {name: os.environ[name] for name in _ENV_OPTIONS[family] if os.environ.get(name)}

    @cached_property
    def _store(self) -> Any:
        import obstore.store

        if self.is_local:
            return obstore.store.LocalStore(self.path, mkdir=True)
        options = {k.lower(): v for k, v in self.storage_options().items()}
        if "aws_endpoint_url" in options:
            options["aws_endpoint"] = options.pop("aws_endpoint_url")
        allow_http = options.pop("aws_allow_http", None)
        client = {"allow_http": allow_http.lower() == "true"} if allow_http else None
        return obstore.store.from_url(self.uri, config=options or None, client_options=client)

    def store(self) -> Any:
        """An obstore store rooted at the lake (paths relative to the root)."""
        return self._store
