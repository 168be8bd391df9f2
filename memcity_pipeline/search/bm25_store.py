"""BM25 index folders in the lake (local folder or object storage), published atomically.

An index of one knowledge base (user) lives under `indexes/<items>_bm25/<org>/<scope>/`:
each build is uploaded to a folder named after the hash of what it was built from
(`<source key[:16]>/`), and then the object `CURRENT` is written with the full source key. A
reader follows `CURRENT`, so it sees a whole index or the previous one, never a half-uploaded
one; folders of older builds are removed after the switch. Two concurrent builds of the same
texts write the same folder; of different texts, the last `CURRENT` written wins and the next
run rebuilds if it is not the current content.

On a local lake an index is loaded in place; from object storage it is downloaded once into a
local cache folder named by the lake and the build (`cache_dir`), then loaded from there.
"""

import hashlib
import shutil
import tempfile
from pathlib import Path

from memcity_pipeline.lake.files import (
    delete_keys,
    delete_prefix,
    download_dir,
    get_bytes,
    list_keys,
    put_bytes,
    upload_dir,
)
from memcity_pipeline.lake.location import Lake
from memcity_pipeline.lake.tables import BM25_POINTER
from memcity_pipeline.search.bm25 import BM25Index

POINTER = BM25_POINTER
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "memcity-lake-cache"


def _build_name(key: str) -> str:
    return key[:16]


def current_key(lake: Lake | str, prefix: str) -> str | None:
    """The source key of the index published under `prefix`, or None."""
    data = get_bytes(lake, f"{prefix}/{POINTER}")
    return data.decode() if data else None


def is_current(lake: Lake | str, prefix: str, key: str) -> bool:
    """Whether the index under `prefix` was built from `key` and is whole."""
    return current_key(lake, prefix) == key and (
        get_bytes(lake, f"{prefix}/{_build_name(key)}/meta.json") is not None
    )


def publish(lake: Lake | str, prefix: str, index: BM25Index, key: str) -> None:
    """Upload `index` under `prefix` as the build of `key`, point `CURRENT` at it, then remove
    older builds."""
    name = _build_name(key)
    with tempfile.TemporaryDirectory(prefix="memcity-bm25-") as tmp:
        folder = Path(tmp) / name
        folder.mkdir()
        index.write_into(folder)
        upload_dir(lake, folder, f"{prefix}/{name}")
    put_bytes(lake, f"{prefix}/{POINTER}", key.encode())
    stale = [
        k
        for k in list_keys(lake, prefix)
        if k != f"{prefix}/{POINTER}" and not k.startswith(f"{prefix}/{name}/")
    ]
    delete_keys(lake, stale)


def drop(lake: Lake | str, prefix: str) -> bool:
    """Remove the index under `prefix`; True when there was one."""
    return delete_prefix(lake, prefix)


def local_folder(lake: Lake | str, prefix: str, cache_dir: Path = DEFAULT_CACHE) -> Path | None:
    """A local folder holding the current index under `prefix` (None when none is published)."""
    lake = Lake.of(lake)
    key = current_key(lake, prefix)
    if key is None:
        return None
    rel = f"{prefix}/{_build_name(key)}"
    if lake.is_local:
        folder = lake.path / rel
        return folder if (folder / "meta.json").exists() else None
    lake_hash = hashlib.sha256(lake.uri.encode()).hexdigest()[:12]
    folder = cache_dir / lake_hash / rel
    if (folder / "meta.json").exists():
        return folder
    staging = Path(tempfile.mkdtemp(prefix=".download.", dir=_mkdir(folder.parent)))
    try:
        if not download_dir(lake, rel, staging) or not (staging / "meta.json").exists():
            return None
        if not folder.exists():
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def load(lake: Lake | str, prefix: str, cache_dir: Path = DEFAULT_CACHE) -> BM25Index | None:
    """The current index under `prefix`, or None."""
    folder = local_folder(lake, prefix, cache_dir)
    return BM25Index.load(folder) if folder is not None else None
