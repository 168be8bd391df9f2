"""The landing scan survives any file system: each odd path is one problem, the rest is found.

Link loops, dangling links, links out of the landing folder or to folders, pipes and sockets,
names that are not UTF-8, folders the scan cannot list, empty files: `scan_landing`,
`landing_scopes` and `scope_is_current` never raise, every good file is found exactly once, every
bad path is reported exactly once (in a readable, valid UTF-8 form), and a sync still ingests
every good file of the knowledge base. Generated trees check the same on random layouts.
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memcity_pipeline.ingestion.landing import landing_scopes, scan_landing
from memcity_pipeline.ingestion.parsing import FileRejected, read_file_checked
from memcity_pipeline.ingestion.sync import Limits, scope_is_current, sync_sources
from memcity_pipeline.lake.delta import read_rows

LIMITS = Limits(max_file_bytes=100_000, max_document_chars=10_000)
KB = "orgs/acme/knowledge_bases/kb"


def scan(landing: Path) -> tuple[list[str], dict[str, str]]:
    """The found files' paths, and the refused paths with their reasons (each path once)."""
    files, problems = scan_landing(landing)
    reasons = {p.rel_path: p.reason for p in problems}
    assert len(reasons) == len(problems), problems  # no path reported twice
    for rel in [*reasons, *(f.rel_path for f in files)]:
        rel.encode("utf-8")  # the lake stores paths as UTF-8
    return [f.rel_path for f in files], reasons


def test_every_odd_path_is_one_problem_and_every_good_file_is_ingested(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    landing, lake = tmp_path / "landing", tmp_path / "lake"
    kb = landing / KB
    (kb / "sub").mkdir(parents=True)
    (kb / "a.md").write_text("# A\n\nthe first document")
    (kb / "sub/b.txt").write_text("the second document")
    (kb / "alias.md").symlink_to("a.md")  # a link inside the landing folder is read
    (kb / "empty.md").write_bytes(b"")
    (kb / "loop.md").symlink_to("loop.md")
    (kb / "ping.md").symlink_to("pong.md")
    (kb / "pong.md").symlink_to("ping.md")
    (kb / "gone.md").symlink_to("nowhere.md")
    outside = tmp_path / "secret.txt"
    outside.write_text("never read")
    (kb / "out.md").symlink_to(outside)
    (kb / "sub-link").symlink_to("sub")
    os.mkfifo(kb / "pipe.md")
    monkeypatch.chdir(kb)  # a socket's path must be short
    server = socket.socket(socket.AF_UNIX)
    server.bind("sock.md")
    named = os.fsencode(kb)
    (Path(os.fsdecode(named + b"/caf\xe9.md"))).write_text("Latin-1 name")
    bad_dir = Path(os.fsdecode(named + b"/d\xff"))
    bad_dir.mkdir()
    (bad_dir / "inside.md").write_text("under a folder whose name is not UTF-8")
    (kb / ".hidden").mkdir()
    (kb / ".hidden/loop").symlink_to("loop")  # hidden: never looked at
    user = landing / "orgs/acme/users/ann"
    (user / "conversations").mkdir(parents=True)
    (user / "memories.jsonl").write_text('{"id": "m1", "text": "likes tea"}\n')
    (user / "conversations/s1.jsonl").symlink_to("s1.jsonl")

    try:
        found, reasons = scan(landing)
        assert found == [
            f"{KB}/a.md",
            f"{KB}/alias.md",
            f"{KB}/empty.md",
            f"{KB}/sub/b.txt",
            "orgs/acme/users/ann/memories.jsonl",
        ]
        assert reasons == {
            f"{KB}/caf\\xe9.md": "name is not valid UTF-8 (rename it): not read",
            f"{KB}/d\\xff": "name is not valid UTF-8 (rename it): not read",
            f"{KB}/gone.md": "dangling symbolic link (its target does not exist)",
            f"{KB}/loop.md": "symbolic link loop: not followed",
            f"{KB}/out.md": "symbolic link leading out of the landing folder: not followed",
            f"{KB}/ping.md": "symbolic link loop: not followed",
            f"{KB}/pipe.md": "not a regular file (a named pipe)",
            f"{KB}/pong.md": "symbolic link loop: not followed",
            f"{KB}/sock.md": "not a regular file (a socket)",
            f"{KB}/sub-link": "symbolic link to a folder: not followed",
            "orgs/acme/users/ann/conversations/s1.jsonl": "symbolic link loop: not followed",
        }
        scopes = landing_scopes(landing)
        assert list(scopes.knowledge_bases) == ["acme/kb"] and list(scopes.users) == ["acme/ann"]
        assert scopes.unscoped == []

        report = sync_sources("documents", landing, lake, LIMITS, "acme", "kb")
        docs = read_rows(lake, "raw_documents")
        assert sorted(docs["source_path"].to_list()) == [
            f"{KB}/a.md",
            f"{KB}/alias.md",
            f"{KB}/sub/b.txt",
        ]
        assert "never read" not in " ".join(docs["text"].to_list())
        errors = read_rows(lake, "ingestion_errors")
        assert sorted(errors["path"].to_list()) == sorted(
            [f"{KB}/empty.md", *(r for r in reasons if r.startswith(KB))]
        )
        assert report.failed_files == errors.height
        assert scope_is_current(landing, lake, "knowledge_base", "acme", "kb")
        sync_sources("conversations", landing, lake, LIMITS, "acme", "ann")
        assert not scope_is_current(landing, lake, "user", "acme", "ann")  # memories not yet
    finally:
        server.close()


# --------------------------------------------------------------------------- generated trees

# Any name a folder can hold (a backslash aside: `\xff` is how a name that is not UTF-8 is shown).
plain_name = st.text(
    st.characters(exclude_characters="/\x00\\", exclude_categories=("Cs",)), min_size=1, max_size=8
).filter(lambda n: not n.startswith("."))

GOOD = ("file", "empty", "link-in")  # found by the scan
BAD = ("loop", "dangling", "link-out", "link-dir", "fifo", "bad-file")  # refused by it

tree = st.recursive(
    st.sampled_from(GOOD + BAD + ("hidden",)),
    lambda inner: st.one_of(
        st.dictionaries(plain_name, inner, min_size=1, max_size=4),
        st.tuples(st.just("bad-dir"), st.dictionaries(plain_name, inner, max_size=2)),
    ),
    max_leaves=12,
)


def build(
    folder: Path, rel: str, node: object, places: tuple[Path, Path], good: list, bad: list
) -> None:
    """Make `node` at `folder` (shown as `rel`), noting the paths the scan must find or refuse;
    `places` are a good file in the landing folder and a folder outside it, for links."""
    inside, outside = places
    if isinstance(node, dict):
        folder.mkdir()
        for name, child in node.items():
            build(folder / name, f"{rel}/{name}", child, places, good, bad)
        return
    if isinstance(node, tuple):  # a folder named with bytes that are not UTF-8, and its tree
        path = Path(os.fsdecode(os.fsencode(folder) + b"\xfe"))
        path.mkdir()
        build(path / "child", "", node[1] or "file", places, [], [])  # never looked at
        bad.append(rel + "\\xfe")
        return
    kind = node
    {
        "file": lambda: folder.write_text(f"# {folder.name}\n\ntext"),
        "empty": lambda: folder.write_bytes(b""),
        "link-in": lambda: folder.symlink_to(inside),
        "loop": lambda: folder.symlink_to(folder.name),
        "dangling": lambda: folder.symlink_to(folder.name + ".missing"),
        "link-out": lambda: folder.symlink_to(outside / "file.md"),
        "link-dir": lambda: folder.symlink_to(outside),
        "fifo": lambda: os.mkfifo(folder),
        "bad-file": lambda: Path(os.fsdecode(os.fsencode(folder) + b"\xff.md")).write_text("x"),
        "hidden": lambda: (folder.parent / ("." + folder.name)).symlink_to("."),
    }[kind]()
    if kind in GOOD:
        good.append(rel)
    elif kind == "bad-file":
        bad.append(rel + "\\xff.md")
    elif kind != "hidden":
        bad.append(rel)


@settings(max_examples=100)
@given(root=st.dictionaries(plain_name, tree, min_size=1, max_size=4))
def test_any_tree_is_scanned_whole_each_bad_path_once(tmp_path: Path, root: dict) -> None:
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    landing, outside, lake = base / "landing", base / "outside", base / "lake"
    outside.mkdir(parents=True)
    (outside / "file.md").write_text("outside the landing folder")
    target = landing / "orgs/acme/knowledge_bases/other/target.md"
    target.parent.mkdir(parents=True)
    target.write_text("a file links may point at")
    good: list[str] = ["orgs/acme/knowledge_bases/other/target.md"]
    bad: list[str] = []
    build(landing / KB, KB, root, (target, outside), good, bad)

    found, reasons = scan(landing)
    assert found == sorted(good)
    assert sorted(reasons) == sorted(bad)
    scopes = landing_scopes(landing)
    kbs = ["acme/kb"] if good[1:] or bad else []  # a folder of hidden files only is no scope
    assert sorted(scopes.knowledge_bases) == [*kbs, "acme/other"]
    assert scope_is_current(landing, lake, "knowledge_base", "acme", "kb") is (not good[1:])

    report = sync_sources("documents", landing, lake, LIMITS, "acme", "kb")
    docs = read_rows(lake, "raw_documents")
    errors = read_rows(lake, "ingestion_errors")
    landing_errors = errors.filter(pl.col("path").is_in(bad))
    assert sorted(landing_errors["path"].to_list()) == sorted(bad)  # each once
    ingested = set(docs["source_path"].to_list()) | set(errors["path"].to_list())
    assert ingested == {g for g in good if g.startswith(KB)} | set(bad)
    assert report.files == len(good) - 1
    shutil.rmtree(base)


# --------------------------------------------------------------------------- unreadable folders

SCAN_AS_OTHER = """
import json, sys
from pathlib import Path
from memcity_pipeline.ingestion.landing import landing_scopes, scan_landing
from memcity_pipeline.ingestion.sync import Limits, scope_is_current, sync_sources
from memcity_pipeline.lake.delta import read_rows
landing, lake = Path(sys.argv[1]), Path(sys.argv[2])
files, problems = scan_landing(landing)
scopes = landing_scopes(landing)
current = scope_is_current(landing, lake, "knowledge_base", "acme", "kb")
sync_sources("documents", landing, lake, Limits(100_000, 10_000), "acme", "kb")
docs, errors = read_rows(lake, "raw_documents"), read_rows(lake, "ingestion_errors")
print(json.dumps({
    "files": [f.rel_path for f in files],
    "problems": {p.rel_path: p.reason for p in problems},
    "scopes": sorted(scopes.knowledge_bases),
    "current": current,
    "docs": sorted(docs["source_path"].to_list()),
    "errors": {e["path"]: e["reason"] for e in errors.iter_rows(named=True)},
}))
"""


def scan_without_privileges(landing: Path, lake: Path) -> dict:
    """Scan and sync in a process the file system's permissions apply to. Root (as the tests
    run) reads any folder: its process runs without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH."""
    command = [sys.executable, "-c", SCAN_AS_OTHER, str(landing), str(lake)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("needs setpriv to drop root's permission to read any folder")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


def test_a_folder_the_scan_cannot_list_is_reported_and_its_documents_kept(tmp_path: Path) -> None:
    landing, lake = tmp_path / "landing", tmp_path / "lake"
    kb = landing / KB
    (kb / "locked").mkdir(parents=True)
    (kb / "open.md").write_text("# Open\n\nreadable")
    (kb / "locked/b.md").write_text("# B\n\nbehind a folder that will be locked")
    (kb / "locked/c.md").write_text("# C\n\nthe same")
    sync_sources("documents", landing, lake, LIMITS, "acme", "kb")
    everything = [f"{KB}/locked/b.md", f"{KB}/locked/c.md", f"{KB}/open.md"]
    (kb / "locked").chmod(0)
    try:
        seen = scan_without_privileges(landing, lake)
        assert seen["files"] == [f"{KB}/open.md"]
        assert seen["problems"] == {f"{KB}/locked": "cannot list folder: Permission denied"}
        assert seen["scopes"] == ["acme/kb"]
        assert seen["current"] is True  # nothing to read again: the locked files are held
        assert seen["docs"] == everything  # not deleted: they could not be looked at
        assert seen["errors"] == {
            f"{KB}/locked": "cannot list folder: Permission denied;"
            " the previous version is kept (2 rows)"
        }
        (kb / "locked").chmod(0o755)
        kb.chmod(0)  # the knowledge base's own folder
        seen = scan_without_privileges(landing, lake)
        assert seen["files"] == []
        assert seen["problems"] == {KB: "cannot list folder: Permission denied"}
        assert seen["scopes"] == ["acme/kb"]  # still a partition
        assert seen["docs"] == everything
        assert seen["errors"] == {
            KB: "cannot list folder: Permission denied; the previous version is kept (3 rows)"
        }
    finally:
        (kb / "locked").chmod(0o755)
        kb.chmod(0o755)
    assert sync_sources("documents", landing, lake, LIMITS, "acme", "kb").errors == []


# --------------------------------------------------------------------------- files swapped under us


def test_a_file_swapped_for_a_pipe_is_never_read_from_the_pipe(tmp_path: Path) -> None:
    """While a file keeps being swapped with a named pipe, a read gets the file's bytes or
    refuses the pipe; never the pipe's (empty) content, which a blocking open would give once
    this writer opens the pipe's other end."""
    landing = tmp_path / "landing"
    path = landing / KB / "doc.md"
    path.parent.mkdir(parents=True)
    path.write_text("# Doc\n\nthe real content")
    stop = threading.Event()

    def swapper() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            regular, fifo = path.parent / f".r{n}", path.parent / f".p{n}"
            regular.write_text("# Doc\n\nthe real content")
            os.mkfifo(fifo)
            os.replace(regular, path)
            os.replace(fifo, path)
            with contextlib.suppress(OSError):  # a reader holding the pipe: let it go (empty)
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    outcomes: set[str] = set()
    try:
        for _ in range(300):
            try:
                data = read_file_checked(path, max_file_bytes=1000).data
                outcomes.add(data.decode())
            except FileRejected as exc:
                outcomes.add(str(exc))
            scan(landing)
    finally:
        stop.set()
        thread.join()
    assert outcomes <= {"# Doc\n\nthe real content", "not a regular file (a named pipe)"}
