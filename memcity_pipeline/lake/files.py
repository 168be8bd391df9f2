"""The lake's plain files (BM25 index folders, trajectories, markers) through obstore, on a
local folder or object storage alike. Paths are relative to the lake root, `/`-separated.

A single object is written whole (`put_bytes`: an object store PUT, a write-and-rename on a
local folder), so a reader sees the old content or the new one. A folder is uploaded file by
file; callers that need a folder to appear at once publish it under a fresh name and then write
one pointer object naming it (`search.bm25_store`).
"""

import contextlib
from datetime import datetime
from pathlib import Path

import obstore

from memcity_pipeline.lake.location import Lake


def put_bytes(lake: Lake | str, key: str, data: bytes) -> None:
    """Write the object `key` whole."""
    obstore.put(Lake.of(lake).store(), key, data)


def get_bytes(lake: Lake | str, key: str) -> bytes | None:
    """The content of object `key`, or None when there is none."""
    try:
        return bytes(obstore.get(Lake.of(lake).store(), key).bytes())
    except FileNotFoundError:
        return None


def modified_at(lake: Lake | str, key: str) -> datetime | None:
    """When object `key` was last written (UTC), or None when there is none."""
    try:
        return obstore.head(Lake.of(lake).store(), key)["last_modified"]
    except FileNotFoundError:
        return None


def list_keys(lake: Lake | str, prefix: str) -> list[str]:
    """Every object below `prefix` (a folder: `prefix/...`)."""
    store = Lake.of(lake).store()
    prefix = prefix.rstrip("/") + "/"
    try:
        return sorted(
            str(meta["path"]) for batch in obstore.list(store, prefix=prefix) for meta in batch
        )
    except FileNotFoundError:
        return []


def delete_keys(lake: Lake | str, keys: list[str]) -> None:
    store = Lake.of(lake).store()
    for key in keys:
        with contextlib.suppress(FileNotFoundError):
            obstore.delete(store, key)


def delete_prefix(lake: Lake | str, prefix: str) -> bool:
    """Remove every object below `prefix`; True when there was one."""
    keys = list_keys(lake, prefix)
    delete_keys(lake, keys)
    lake = Lake.of(lake)
    if lake.is_local:  # object stores have no folders; a local lake keeps no empty ones
        folder = lake.path / prefix
        for sub in sorted(folder.rglob("*"), reverse=True) if folder.is_dir() else []:
            if sub.is_dir():
                sub.rmdir()
        if folder.is_dir():
            folder.rmdir()
    return bool(keys)


def upload_dir(lake: Lake | str, local: Path, prefix: str) -> None:
    """Copy every file below the local folder `local` to `prefix/<relative path>`."""
    for file in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        put_bytes(lake, f"{prefix}/{file.relative_to(local).as_posix()}", file.read_bytes())


def download_dir(lake: Lake | str, prefix: str, local: Path) -> int:
    """Copy every object below `prefix` into the local folder `local`; how many."""
    keys = list_keys(lake, prefix)
    for key in keys:
        target = Path(local) / key[len(prefix.rstrip("/")) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        data = get_bytes(lake, key)
        if data is not None:
            target.write_bytes(data)
    return len(keys)
