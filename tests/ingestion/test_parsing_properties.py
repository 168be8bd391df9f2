"""Property-based tests of the readers: generated records, JSON values, bytes and files.

Whatever a file holds, a reader returns records and problems or refuses the whole file with
`FileRejected`; no other exception escapes. Every good record comes out (valid UTF-8, metadata
that is strict JSON), and every bad one is reported exactly once, with its line.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memcity_pipeline.ingestion.parsing import (
    FileRejected,
    parse_conversation_file,
    parse_document_file,
    parse_memories_file,
)
from tests.ingestion.helpers_parsing import sample_pdf_bytes

LIMIT = 5000  # max_document_chars of these tests; good texts stay far below it
LIMITS = {"max_file_bytes": 2_000_000, "max_document_chars": LIMIT}
C1_AND_DEL = [chr(c) for c in range(0x7F, 0xA0)]  # raw in a file, many of them read as binary

# Any character, lone surrogates included (JSON escapes them as \udXXX).
any_char = st.characters(exclude_categories=(), exclude_characters=C1_AND_DEL)
odd_text = st.text(any_char, max_size=12)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | odd_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
    max_leaves=8,
)
metadata = st.dictionaries(odd_text, json_values, max_size=3)


def dumps(value: Any, ascii_only: bool) -> str:
    """One JSON line; raw UTF-8 when asked and possible (a lone surrogate must be escaped)."""
    line = json.dumps(value, ensure_ascii=ascii_only)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(value, ensure_ascii=True)
    return line


def strings_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in strings_of(v)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *strings_of(v)]]
    return []


def assert_utf8(*values: Any) -> None:
    for value in values:
        for s in strings_of(value):
            s.encode("utf-8")  # raises on a lone surrogate
        json.dumps(value, allow_nan=False)  # strict JSON: no NaN or Infinity


# --------------------------------------------------------------------------- JSONL lines


# A reader: its text field, a good record, and how to parse a file.
@dataclass(frozen=True)
class Reader:
    name: str
    text_field: str
    parse: Callable[..., tuple[list[Any], list[Any]]]
    suffix: str


READERS = [
    Reader("memories", "text", parse_memories_file, "memories.jsonl"),
    Reader("conversations", "content", parse_conversation_file, "session.jsonl"),
    Reader("documents", "text", parse_document_file, "records.jsonl"),
]
ROLES = ["user", "assistant", "system", "tool", " User ", "ASSISTANT"]
HUGE = st.integers(4301, 6000).map(lambda n: "9" * n)  # Python's int() refuses these
UNUSABLE = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999"]) | HUGE
PLACEHOLDER = "__raw_literal__"


@st.composite
def good_record(draw: st.DrawFn, reader: Reader, n: int) -> tuple[dict[str, Any], str]:
    """A record `reader` must accept, and a word its text keeps."""
    word = f"record{n}"
    text = word + " " + draw(odd_text)
    record: dict[str, Any] = {reader.text_field: text}
    if reader.name == "memories":
        record["id"] = f"m{n}"
    if reader.name == "conversations":
        record["role"] = draw(st.sampled_from(ROLES))
    if reader.name == "documents" and draw(st.booleans()):
        record["id"] = f"d{n}"
    if reader.name == "documents" and draw(st.booleans()):
        record["title"] = draw(odd_text)
    if reader.name != "conversations" and draw(st.booleans()):
        record["metadata"] = draw(metadata)
    if draw(st.booleans()):
        record["created_at"] = draw(st.datetimes(timezones=st.just(None))).isoformat()
    if draw(st.booleans()):  # a field nobody reads may hold anything, even what JSON forbids
        record["unread"] = PLACEHOLDER
        raw = draw(UNUSABLE | json_values.map(json.dumps))
        return record | {"_raw": raw}, word
    return record, word


@st.composite
def bad_line(draw: st.DrawFn, reader: Reader) -> str:
    """A non-blank line `reader` must refuse (exactly one problem)."""
    base, _ = draw(good_record(reader, 999))
    base.pop("_raw", None)
    base.pop("unread", None)
    how = draw(
        st.sampled_from(
            [
                "text-type",
                "text-unusable",
                "text-blank",
                "text-too-long",
                "metadata-type",
                "metadata-unusable",
                "metadata-deep",
                "not-object",
                "truncated",
                "too-deep",
            ]
            + (["id-type"] if reader.name != "conversations" else [])
            + (["created-at"] if reader.name != "documents" else [])
            + (["id-missing"] if reader.name == "memories" else [])
            + (["role"] if reader.name == "conversations" else [])
        )
    )
    raw = None
    field = reader.text_field
    if how == "text-type":
        base[field] = draw(st.integers() | st.booleans() | st.lists(st.integers(), max_size=2))
    elif how == "text-unusable":
        base[field], raw = PLACEHOLDER, draw(UNUSABLE)
    elif how == "text-blank":
        base[field] = draw(st.sampled_from(["", "   ", "\t\n", "\x00\x01", "\ufeff"]))
    elif how == "text-too-long":
        base[field] = "x" * draw(st.integers(LIMIT + 1, LIMIT + 50))
    elif how == "metadata-type":
        base["metadata"] = draw(st.lists(st.integers(), max_size=2) | st.integers() | odd_text)
        if reader.name == "conversations":  # conversations read no metadata
            base[field] = 5
    elif how == "metadata-unusable":
        base["metadata"], raw = {"x": [PLACEHOLDER]}, draw(UNUSABLE)
        if reader.name == "conversations":
            base[field], raw = PLACEHOLDER, raw
    elif how == "metadata-deep":
        depth = draw(st.integers(101, 400))
        nested: Any = 1
        for _ in range(depth):
            nested = {"k": nested}
        base["metadata"] = nested
        if reader.name == "conversations":
            base[field] = None
    elif how == "created-at":
        base["created_at"] = draw(
            st.sampled_from(["yesterday", "2026-13-01", "0001-01-01T00:00:00+05:00"])
            | st.integers()
        )
    elif how == "not-object":
        return json.dumps(draw(st.lists(st.integers(), max_size=2) | st.integers() | odd_text))
    elif how == "truncated":
        line = json.dumps(base)
        return line[: draw(st.integers(1, len(line) - 1))]
    elif how == "too-deep":
        n = draw(st.integers(5000, 20000))
        return "[" * n + "]" * n
    elif how == "id-type":
        base["id"] = draw(st.floats() | st.booleans() | st.lists(st.integers(), max_size=2))
    elif how == "id-missing":
        base.pop("id")
    elif how == "role":
        base["role"] = draw(st.sampled_from(["wizard", "", "users"]) | st.integers())
    line = dumps(base, ascii_only=True)
    return line if raw is None else line.replace(json.dumps(PLACEHOLDER), raw)


@st.composite
def jsonl_file(draw: st.DrawFn, reader: Reader) -> tuple[str, list[str], list[int]]:
    """(file text, the words of the good records in order, the lines of the bad ones)."""
    kinds = draw(st.lists(st.sampled_from(["good", "bad", "blank"]), min_size=1, max_size=12))
    if "good" not in kinds and "bad" not in kinds:
        kinds.append("good")
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    lines: list[str] = []
    words: list[str] = []
    bad: list[int] = []
    for n, kind in enumerate(kinds):
        if kind == "blank":
            lines.append(draw(st.sampled_from(["", " ", "\t"])))
        elif kind == "bad":
            lines.append(draw(bad_line(reader)))
            bad.append(len(lines))
        else:
            record, word = draw(good_record(reader, n))
            raw = record.pop("_raw", None)
            line = dumps(record, ascii_only=draw(st.booleans()))
            lines.append(line if raw is None else line.replace(json.dumps(PLACEHOLDER), raw))
            words.append(word)
    return newline.join(lines) + draw(st.sampled_from(["", newline])), words, bad


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.name)
@settings(max_examples=150)
@given(data=st.data())
def test_every_good_line_is_read_and_every_bad_line_reported_once(
    tmp_path: Path, reader: Reader, data: st.DataObject
) -> None:
    text, words, bad = data.draw(jsonl_file(reader))
    path = tmp_path / reader.suffix
    path.write_bytes(text.encode("utf-8"))
    records, problems = reader.parse(path, **LIMITS)
    got = [getattr(r, reader.text_field) for r in records]
    assert [t.split(" ", 1)[0] for t in got] == words
    assert sorted(p.line for p in problems) == bad, problems
    for r in records:
        assert_utf8(*(v for v in vars(r).values() if isinstance(v, (str, dict))))


@settings(max_examples=100)
@given(
    records=st.lists(
        st.tuples(st.booleans(), metadata, st.none() | UNUSABLE, odd_text), min_size=1, max_size=8
    )
)
def test_one_bad_record_of_a_json_list_costs_that_record_only(
    tmp_path: Path, records: list[tuple[bool, dict[str, Any], str | None, str]]
) -> None:
    items, expected, bad = [], [], []
    for n, (has_text, meta, unusable, extra) in enumerate(records, start=1):
        item: dict[str, Any] = {"metadata": meta, "title": extra}
        if has_text:
            item["text"] = f"doc{n} {extra}"
        if unusable is not None:
            item["metadata"] = {**meta, "x": PLACEHOLDER}
        items.append((item, unusable))
        if has_text and unusable is None:
            expected.append(f"doc{n}")
        else:
            bad.append(f"record #{n}: ")
    text = "[" + ", ".join(
        dumps(item, True).replace(json.dumps(PLACEHOLDER), raw or "") for item, raw in items
    )
    path = tmp_path / "list.json"
    path.write_bytes((text + "]").encode("utf-8"))
    docs, problems = parse_document_file(path, **LIMITS)
    assert [d.text.split(" ", 1)[0] for d in docs] == expected
    assert [p.reason[: len(b)] for p, b in zip(problems, bad, strict=True)] == bad
    for d in docs:
        assert_utf8(d.text, d.title, d.metadata)


# --------------------------------------------------------------------------- any JSON, any bytes

# JSON text of anything: odd values, literals JSON forbids, huge numbers, deep nesting.
any_json_text = st.recursive(
    json_scalars.map(lambda v: dumps(v, True)) | UNUSABLE,
    lambda inner: (
        st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]")
        | st.lists(st.tuples(odd_text.map(lambda k: dumps(k, True)), inner), max_size=4).map(
            lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"
        )
    ),
    max_leaves=20,
) | st.integers(50, 3000).map(
    lambda n: '{"text": "deep", "metadata": ' + '{"a":' * n + "0" + "}" * (n + 1)
)

READ_ANYTHING: list[tuple[str, Callable[..., Any]]] = [
    ("memories.jsonl", parse_memories_file),
    ("session.jsonl", parse_conversation_file),
    *(
        (f"doc{suffix}", parse_document_file)
        for suffix in (".jsonl", ".json", ".txt", ".md", ".html", ".pdf")
    ),
]


def read_anything(tmp_path: Path, data: bytes) -> None:
    """Every reader on `data`: records and problems, or FileRejected; nothing else escapes."""
    for name, parse in READ_ANYTHING:
        path = tmp_path / name
        path.write_bytes(data)
        try:
            records, problems = parse(path, **LIMITS)
        except FileRejected as exc:
            assert str(exc)
            str(exc).encode("utf-8")
            continue
        lines = data.count(b"\n") + data.count(b"\r") + 1
        for p in problems:
            assert p.reason and (p.line is None or 1 <= p.line <= lines)
        for r in records:
            assert_utf8(*(v for v in vars(r).values() if isinstance(v, (str, dict))))


@settings(max_examples=150)
@given(text=any_json_text, as_record=st.booleans())
def test_any_json_in_any_reader_is_records_problems_or_a_rejection(
    tmp_path: Path, text: str, as_record: bool
) -> None:
    if as_record:  # as the metadata of an otherwise good record
        text = '{"id": "m", "role": "user", "text": "t", "content": "c", "metadata": ' + text + "}"
    read_anything(tmp_path, text.encode("utf-8"))


@settings(max_examples=100)
@given(
    data=st.binary(max_size=400)
    | st.text(any_char, max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))
    | st.tuples(st.text(max_size=100), st.sampled_from(["utf-16", "latin-1", "utf-32"])).map(
        lambda te: te[0].encode(te[1], "replace")
    )
)
def test_any_bytes_in_any_reader_is_records_problems_or_a_rejection(
    tmp_path: Path, data: bytes
) -> None:
    read_anything(tmp_path, data)


@settings(max_examples=40)
@given(
    cut=st.integers(0, 100),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=6),
)
def test_damaged_pdfs_are_a_document_or_a_rejection(
    tmp_path: Path, cut: int, flips: list[tuple[float, int]]
) -> None:
    data = bytearray(sample_pdf_bytes())
    for where, value in flips:
        data[int(where * len(data))] = value
    data = data[: len(data) - cut * 40]
    path = tmp_path / "damaged.pdf"
    path.write_bytes(bytes(data))
    try:
        docs, problems = parse_document_file(path, **{**LIMITS, "max_document_chars": 100_000})
    except FileRejected:
        return
    assert len(docs) + len(problems) == 1
    for d in docs:
        assert_utf8(d.text, d.title, d.metadata)


html_nodes = st.recursive(
    st.text(any_char, max_size=10).map(lambda t: t.replace("<", "&lt;")),
    lambda inner: st.tuples(
        st.sampled_from(["div", "p", "ul", "li", "table", "tr", "td", "h1", "pre", "br", "b"]),
        st.lists(inner, max_size=4),
    ).map(lambda t: f"<{t[0]}>" + "".join(t[1]) + (f"</{t[0]}>" if t[0] != "br" else "")),
    max_leaves=30,
)


@settings(max_examples=60)
@given(body=html_nodes, depth=st.integers(0, 3000))
def test_any_html_is_a_document_or_a_rejection(tmp_path: Path, body: str, depth: int) -> None:
    page = "<div>" * depth + body + "</div>" * depth
    read_anything(tmp_path, page.encode("utf-8", "surrogatepass"))
