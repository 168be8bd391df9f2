"""Bad input is a row, never a loss: `sync_sources` into a real local lake.

A bad line costs only itself; a file that gives nothing usable (unreadable, binary, empty, over a
limit, a pipe, a link loop, every line wrong) keeps the rows of its last good version, and its
error says so; only a file that is gone loses its rows. A file's recorded hash and its rows come
from the same bytes, even while it is being rewritten.
"""

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from memcity_pipeline.ingestion.sync import Limits, sync_sources
from memcity_pipeline.lake.delta import read_rows, table_versions
from memcity_pipeline.lake.tables import TABLES

LIMITS = Limits(max_file_bytes=100_000, max_document_chars=5_000)
MEMORIES = "orgs/acme/users/ann/memories.jsonl"
KB = "orgs/acme/knowledge_bases/handbook"


def sync_memories(landing: Path, lake: Path) -> dict[str, str]:
    """Sync the user's memories; the lake's memories afterwards, id -> text."""
    sync_sources("memories", landing, lake, LIMITS, "acme", "ann")
    rows = read_rows(lake, "memories")
    return dict(zip(rows["memory_id"].to_list(), rows["text"].to_list(), strict=True))


def errors(lake: Path) -> list[tuple[str, int | None, str]]:
    rows = read_rows(lake, "ingestion_errors").sort("path", "line", nulls_last=False)
    return [(r["path"], r["line"], r["reason"]) for r in rows.iter_rows(named=True)]


def memory_lines(n: int, version: str = "") -> list[str]:
    return [json.dumps({"id": f"m{i}", "text": f"memory {i}{version}"}) for i in range(n)]


def test_a_bad_line_or_a_failed_file_never_deletes_a_users_memories(tmp_path: Path) -> None:
    landing, lake = tmp_path / "landing", tmp_path / "lake"
    path = landing / MEMORIES
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(memory_lines(5)) + "\n")
    five = {f"m{i}": f"memory {i}" for i in range(5)}
    assert sync_memories(landing, lake) == five

    # The reported defect: a 5,000-digit number, and an escaped lone surrogate.
    huge = '{"id": "big", "text": "t", "metadata": {"n": ' + "7" * 5000 + "}}"
    surrogate = r'{"id": "half", "text": "half a pair: \ud800"}'
    path.write_text("\n".join([*memory_lines(5), huge, surrogate]) + "\n")
    assert sync_memories(landing, lake) == five | {"half": "half a pair: \ufffd"}
    [(where, line, reason)] = errors(lake)
    assert (where, line) == (MEMORIES, 6) and "PYTHONINTMAXSTRDIGITS" in reason

    # The whole file fails: the last good version stays, and the error says so.
    path.write_bytes(bytes(range(256)) * 4)
    assert sync_memories(landing, lake) == five | {"half": "half a pair: \ufffd"}
    assert errors(lake) == [
        (MEMORIES, None, "binary file (not text); the previous version is kept (6 rows)")
    ]
    versions = table_versions(lake, TABLES)
    assert sync_memories(landing, lake) == five | {"half": "half a pair: \ufffd"}
    assert table_versions(lake, TABLES) == versions  # a rerun commits nothing

    path.write_text("\n".join(memory_lines(2, " (fixed)")) + "\n")
    assert sync_memories(landing, lake) == {"m0": "memory 0 (fixed)", "m1": "memory 1 (fixed)"}
    assert errors(lake) == []
    path.unlink()  # a deletion, not a failure
    assert sync_memories(landing, lake) == {}


def test_a_document_file_that_fails_keeps_its_documents(tmp_path: Path) -> None:
    landing, lake = tmp_path / "landing", tmp_path / "lake"
    doc = landing / KB / "guide.md"
    doc.parent.mkdir(parents=True)
    doc.write_text("# Guide\n\nThe first version.")
    (landing / KB / "other.md").write_text("# Other\n\nStays as it is.")
    sync_sources("documents", landing, lake, LIMITS, "acme", "handbook")

    def texts() -> dict[str, str]:
        docs = read_rows(lake, "raw_documents")
        return dict(zip(docs["title"].to_list(), docs["text"].to_list(), strict=True))

    before = texts()
    for bad, reason in [
        ("x" * 150_000, "file is 146.5 KB, over the 97.7 KB limit (MEMCITY_MAX_FILE_BYTES)"),
        ("", "empty file"),
        ("# Long\n\n" + "word " * 1_100, "over the 5,000 limit (MEMCITY_MAX_DOCUMENT_CHARS)"),
    ]:
        doc.write_text(bad)
        report = sync_sources("documents", landing, lake, LIMITS, "acme", "handbook")
        assert texts() == before
        [error] = report.errors
        assert reason in error["reason"]
        assert error["reason"].endswith("; the previous version is kept (1 rows)")
    doc.unlink()
    sync_sources("documents", landing, lake, LIMITS, "acme", "handbook")
    assert list(texts()) == ["Other"]


def test_a_file_of_many_bad_lines_lists_the_first_thousand_and_counts_the_rest(
    tmp_path: Path,
) -> None:
    """A CSV saved as memories.jsonl: every line is wrong, and each would be a row (and a warning
    in the run's log); a file lists its first 1,000 and counts the others."""
    landing, lake = tmp_path / "landing", tmp_path / "lake"
    path = landing / MEMORIES
    path.parent.mkdir(parents=True)
    csv = [f"m{i},a memory as CSV" for i in range(1_500)]
    path.write_text("\n".join([*csv, *memory_lines(2)]) + "\n")
    assert sync_memories(landing, lake) == {"m0": "memory 0", "m1": "memory 1"}
    found = errors(lake)
    assert [line for _, line, _ in found] == [None, *range(1, 1_001)]
    assert found[0][2] == "and 500 more problems (a file lists its first 1,000)"


# --------------------------------------------------------------------------- any sequence of edits

BAD_LINES = [
    '{"id": "bad", "text": "t", "metadata": {"n": ' + "1" * 4301 + "}}",
    '{"id": "bad", "text": "t", "metadata": {"x": NaN}}',
    '{"id": "bad", "text": 1e400}',
    '{"id": "bad", "text": "t", "metadata": ' + "[" * 150 + "]" * 150 + "}",
    "[" * 3_000 + "]" * 3_000,
    '{"id": "bad", "te',
    '"just a string"',
    '{"id": "bad"}',
]
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
FAILURES = ["binary", "empty", "blank", "oversize", "bad-bom", "all-bad", "fifo", "loop"]

version = st.one_of(
    st.tuples(
        st.just("lines"),
        st.lists(
            st.one_of(
                st.tuples(st.just("good"), st.integers(0, 9), st.text(PRINTABLE, max_size=20)),
                st.tuples(st.just("bad"), st.integers(0, len(BAD_LINES) - 1), st.just("")),
            ),
            min_size=1,
            max_size=8,
        ),
    ),
    st.tuples(st.just("failure"), st.sampled_from(FAILURES)),
    st.tuples(st.just("delete"), st.just(None)),
)


def write_version(path: Path, step: int, v: tuple) -> dict[str, str] | None:
    """Put version `v` in place of the file; the memories it holds, or None when it holds none
    (then the lake must keep the last good ones); {} when the file is gone."""
    if path.is_symlink() or path.exists():
        path.unlink()
    what, spec = v
    if what == "delete":
        return {}
    if what == "failure":
        if spec == "fifo":
            os.mkfifo(path)
        elif spec == "loop":
            path.symlink_to(path.name)  # a link to itself
        else:
            path.write_bytes(
                {
                    "binary": bytes(range(256)) * 8,
                    "empty": b"",
                    "blank": b" \n\n\t\n",
                    "oversize": b'{"id": "x", "text": "' + b"y" * 100_000 + b'"}\n',
                    "bad-bom": b"\xef\xbb\xbf" + b"\xff\xfe\xfd" * 30,
                    "all-bad": "\n".join(BAD_LINES[:3]).encode(),
                }[spec]
            )
        return None
    lines, good = [], {}
    for kind, a, b in spec:
        if kind == "bad":
            lines.append(BAD_LINES[a])
        elif f"m{a}" not in good:  # a memory id appears once in a file
            text = f"memory {a} of version {step} {b}"
            lines.append(json.dumps({"id": f"m{a}", "text": text}))
            good[f"m{a}"] = " ".join(text.split())  # what cleaning leaves of this text
    path.write_text("\n".join(lines) + "\n")
    os.utime(path, ns=(10**18 + step * 10**9, 10**18 + step * 10**9))  # every edit is seen
    return good or None


@settings(max_examples=40)
@given(versions=st.lists(version, min_size=1, max_size=5))
def test_no_sequence_of_edits_loses_a_good_memory(versions: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        landing, lake = Path(tmp) / "landing", Path(tmp) / "lake"
        path = landing / MEMORIES
        path.parent.mkdir(parents=True)
        path.write_text("\n".join(memory_lines(3)) + "\n")
        expected = sync_memories(landing, lake)
        assert len(expected) == 3
        for step, v in enumerate(versions, start=1):
            held = write_version(path, step, v)
            if held is not None:
                expected = held
            got = sync_memories(landing, lake)
            assert {k: " ".join(t.split()) for k, t in got.items()} == expected, (step, v)
            if held is None and expected:  # a failure of the file: its error says what is kept
                reasons = [r for p, line, r in errors(lake) if p == MEMORIES and line is None]
                assert len(reasons) == 1 and reasons[0].endswith(
                    f"the previous version is kept ({len(expected)} rows)"
                ), reasons


# --------------------------------------------------------------------------- read once


def test_the_recorded_hash_and_the_rows_come_from_the_same_bytes(tmp_path: Path) -> None:
    """While a writer keeps swapping the file between two versions, every sync records the hash
    of exactly the version whose memories it wrote."""
    landing, lake = tmp_path / "landing", tmp_path / "lake"
    path = landing / MEMORIES
    path.parent.mkdir(parents=True)
    versions = {
        "a": "\n".join(memory_lines(3, " a")) + "\n",
        "b": "\n".join(memory_lines(5, " b")) + "\n",
    }
    sha = {hashlib.sha256(v.encode()).hexdigest(): k for k, v in versions.items()}
    path.write_text(versions["a"])
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            name = "ab"[n % 2]
            tmp = path.parent / f".swap-{name}"  # hidden: the scan ignores it
            tmp.write_text(versions[name])
            os.utime(tmp, ns=(n, 10**18 + n))  # a new mtime for each swap
            os.replace(tmp, path)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        for _ in range(15):
            got = sync_memories(landing, lake)
            manifest = read_rows(lake, "source_files").filter(pl.col("path") == MEMORIES)
            name = sha[manifest["content_hash"][0]]
            assert got == {f"m{i}": f"memory {i} {name}" for i in range(len(got))}
            assert len(got) == {"a": 3, "b": 5}[name]
    finally:
        stop.set()
        thread.join()
    assert errors(lake) == []
