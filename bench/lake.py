"""The lake on Delta Lake: what a rerun after one edit writes, and what object storage costs.

    python bench/lake.py [--docs 500] [--skip-s3]

Printed, measured in one run (figures are ratios of things measured side by side):

(a) bytes written to the lake by a rerun after editing one document of a knowledge base of
    `--docs` documents, over the bytes of that knowledge base's tables (the live files of its
    partition in every table). Goal <= 0.05. "Written" is every object that is new or changed
    after the rerun: data files and commit files of the tables. The BM25 index, which is rebuilt
    whole when any chunk changes, is printed beside it, not in the ratio. On the local lake and
    on an S3-protocol server (moto, started here on 127.0.0.1).
(b) ingest wall time of the sample corpus (every partition, `memcity ingest`'s defaults) on the
    S3 server over the same on the local lake, in this run.

Enrichment is off (no LLM calls); embeddings are the local all-MiniLM-L6-v2. Each measurement
runs on a fresh `MEMCITY_HOME`, in its own process.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KB = "orgs/bench/knowledge_bases/big"
WORDS = [
    "hive",
    "scale",
    "battery",
    "warranty",
    "sensor",
    "apiary",
    "colony",
    "queen",
    "frame",
    "honey",
    "super",
    "brood",
    "winter",
    "feeding",
    "inspection",
    "swarm",
    "varroa",
    "treatment",
    "harvest",
    "extractor",
    "smoker",
    "veil",
    "record",
    "weight",
]


def _document(i: int) -> str:
    """A Markdown document of about 2 KB, different from every other."""
    lines = [f"# Note {i}: {WORDS[i % len(WORDS)]} and {WORDS[(i * 7) % len(WORDS)]}", ""]
    for p in range(4):
        words = [WORDS[(i * 31 + p * 17 + k * 5) % len(WORDS)] for k in range(60)]
        lines += [f"Paragraph {p} of note {i}: " + " ".join(words) + ".", ""]
    return "\n".join(lines)


def _moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    process = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import httpx

    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{endpoint}/moto-api/", timeout=1)
            return process, endpoint
        except httpx.HTTPError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise SystemExit("moto_server did not start") from None
            time.sleep(0.2)


def _configure(home: Path, lake_uri: str | None, s3: dict[str, str] | None) -> Any:
    from memcity_pipeline.settings import load_settings

    for name in [n for n in os.environ if n.startswith(("MEMCITY_", "AWS_", "DAGSTER_"))]:
        del os.environ[name]
    os.environ.update(MEMCITY_HOME=str(home), MEMCITY_ENRICHMENT="off", **(s3 or {}))
    if lake_uri:
        os.environ["MEMCITY_LAKE_URI"] = lake_uri
    return load_settings()


def _objects(lake: Any) -> dict[str, tuple[int, str]]:
    """Every object of the lake: path -> (size, e_tag or mtime)."""
    import obstore

    found: dict[str, tuple[int, str]] = {}
    for batch in obstore.list(lake.store()):
        for meta in batch:
            found[str(meta["path"])] = (
                int(meta["size"]),
                str(meta.get("e_tag") or meta["last_modified"]),
            )
    return found


def _kb_table_bytes(lake: Any) -> int:
    """Bytes of the live data files of the knowledge base's partition in every table."""
    import pyarrow as pa

    from memcity_pipeline.lake.delta import open_table
    from memcity_pipeline.lake.tables import TABLES

    total = 0
    for t in TABLES.values():
        dt = open_table(lake, t.name)
        if dt is None:
            continue
        actions = pa.table(dt.get_add_actions(flatten=True)).to_pylist()
        for a in actions:
            if a.get(f"partition.{t.partition_by[1]}") == "big":
                total += int(a["size_bytes"])
    return total


def _ingest(settings: Any) -> float:
    from memcity_pipeline.cli.ingest import ingest

    started = time.perf_counter()
    outcome = ingest(settings)
    if not outcome.success:
        raise SystemExit(f"ingest failed: {[p.failure for p in outcome.partitions]}")
    return time.perf_counter() - started


def edit_ratio(root: Path, docs: int, lake_uri: str | None, s3: dict[str, str] | None) -> None:
    home = root / f"edit-{uuid.uuid4().hex[:6]}"
    folder = home / "landing" / KB
    folder.mkdir(parents=True)
    for i in range(docs):
        (folder / f"note-{i:04d}.md").write_text(_document(i))
    settings = _configure(home, lake_uri, s3)
    first = _ingest(settings)
    before = _objects(settings.lake)
    kb_bytes = _kb_table_bytes(settings.lake)
    edited = folder / f"note-{docs // 2:04d}.md"
    edited.write_text(edited.read_text() + "\nOne more sentence about the hive scale.\n")
    rerun = _ingest(settings)
    after = _objects(settings.lake)
    written = {k: v[0] for k, v in after.items() if before.get(k) != v}
    index = sum(v for k, v in written.items() if k.startswith("indexes/"))
    tables = sum(v for k, v in written.items() if not k.startswith("indexes/"))
    where = "S3 (moto)" if lake_uri else "local"
    print(
        f"(a) {where}: {docs} documents, knowledge base's table bytes {kb_bytes:,}; rerun after "
        f"one edit wrote {tables:,} bytes to tables ({len(written)} objects incl. index) -> "
        f"ratio {tables / kb_bytes:.4f} (goal <= 0.05); BM25 index rewritten: {index:,} bytes; "
        f"first ingest {first:.1f} s, rerun {rerun:.1f} s"
    )


def sample_ingest(root: Path, lake_uri: str | None, s3: dict[str, str] | None) -> float:
    from memcity_pipeline.cli.runner import copy_sample_corpus

    home = root / f"sample-{uuid.uuid4().hex[:6]}"
    copy_sample_corpus(home / "landing")
    return _ingest(_configure(home, lake_uri, s3))


def _measure(args: list[str], env: dict[str, str]) -> str:
    """One measurement in a fresh process (settings, the Dagster instance and `memcity ingest`'s
    worker processes follow the environment of the process they start in)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MEMCITY_", "AWS_"))}
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"measurement {args} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=500)
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--measure", choices=["edit", "sample"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--uri", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # inside a measurement process
        s3 = {k: v for k, v in os.environ.items() if k.startswith("AWS_")} or None
        if args.measure == "edit":
            edit_ratio(Path(args.root), args.docs, args.uri or None, s3)
        else:
            print(f"{sample_ingest(Path(args.root), args.uri or None, s3):.3f}")
        return
    root = Path(tempfile.mkdtemp(prefix="memcity-bench-lake-"))
    moto, s3 = None, {}
    if not args.skip_s3:
        moto, endpoint = _moto()
        s3 = {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ALLOW_HTTP": "true",
        }
    try:
        import httpx

        def bucket() -> str:
            name = f"bench-{uuid.uuid4().hex[:10]}"
            httpx.put(f"{s3['AWS_ENDPOINT_URL']}/{name}", timeout=10).raise_for_status()
            return f"s3://{name}/lake"

        edit = ["--measure", "edit", "--root", str(root), "--docs", str(args.docs)]
        print(_measure(edit, {}), flush=True)
        if s3:
            print(_measure([*edit, "--uri", bucket()], s3), flush=True)
            sample = ["--measure", "sample", "--root", str(root)]
            _measure(sample, {})  # warm-up (file cache, ONNX session), not counted
            local = float(_measure(sample, {}))
            remote = float(_measure([*sample, "--uri", bucket()], s3))
            print(
                f"(b) sample corpus ingest: local {local:.1f} s, S3 (moto) {remote:.1f} s -> "
                f"S3 / local {remote / local:.2f}"
            )
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
