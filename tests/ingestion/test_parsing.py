"""Source parsing: every format, whole-file rejections, per-line problems, the sample corpus."""

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from memcity_pipeline.ingestion.parsing import (
    SUPPORTED_DOCUMENT_SUFFIXES,
    ConversationMessage,
    FileRejected,
    MemoryRecord,
    ParsedDocument,
    Problem,
    decode_text,
    parse_conversation_file,
    parse_document_file,
    parse_memories_file,
    read_bytes_checked,
)
from tests.ingestion.helpers_parsing import (
    MAIN_KB,
    MAIN_ORG,
    OTHER_ORG,
    corpus_root,
    main_kb_dir,
    sample_pdf_bytes,
    textless_pdf_bytes,
    truncated_pdf_bytes,
    unblock_fifo_later,
    untitled_pdf_bytes,
    write,
)

LIMITS = {"max_file_bytes": 1_000_000, "max_document_chars": 50_000}


def doc(path: Path, **limits: int) -> ParsedDocument:
    """The single document of a one-document file (asserting there is exactly one, no problem)."""
    docs, problems = parse_document_file(path, **{**LIMITS, **limits})
    assert problems == []
    assert len(docs) == 1
    return docs[0]


def rejected(path: Path, parse=parse_document_file, **limits: int) -> str:
    """The reason a file is rejected as a whole."""
    with pytest.raises(FileRejected) as info:
        parse(path, **{**LIMITS, **limits})
    return str(info.value)


# --------------------------------------------------------------------------- formats


def test_markdown_title_from_first_heading_and_text_normalised(tmp_path: Path) -> None:
    raw = (
        "\r\n\r\n```\r\n# not a title, inside code\r\n```\r\n"
        "# Hive notes #\r\nLine one\rtwo\r\n\r\n"
    )
    d = doc(write(tmp_path, "notes.md", raw))
    assert d.title == "Hive notes"
    assert d.format == "md"
    assert d.text == "```\n# not a title, inside code\n```\n# Hive notes #\nLine one\ntwo"
    assert (d.source_id, d.ordinal, d.line) == (None, 0, None)
    assert d.metadata == {"encoding": "utf-8"}


def test_markdown_without_heading_is_titled_by_file_stem(tmp_path: Path) -> None:
    d = doc(write(tmp_path, "field-diary.markdown", "## Only a subheading\n\nSome text."))
    assert d.title == "field-diary" and d.format == "md"


def test_utf8_bom_is_removed(tmp_path: Path) -> None:
    d = doc(write(tmp_path, "bom.txt", b"\xef\xbb\xbfHello bees"))
    assert d.text == "Hello bees" and d.title == "bom"


def test_latin1_text_keeps_its_accented_names(tmp_path: Path) -> None:
    text = "Réunion: Hélène Marchetti, José Ibáñez, Søren Åkesson, Inês Conceição.\nFin."
    d = doc(write(tmp_path, "reunion.txt", text, encoding="latin-1"))
    assert d.text == text
    assert d.format == "txt" and d.title == "reunion"


def test_cp1252_euro_sign_and_curly_quotes(tmp_path: Path) -> None:
    text = "Das Gerät kostet 49,90 € – „günstig“, sagt die Größe."
    d = doc(write(tmp_path, "preis.txt", text, encoding="cp1252"))
    assert d.text == text


def test_non_latin_legacy_encoding_is_detected(tmp_path: Path) -> None:
    text = "Привет, это тестовый текст на русском языке для проверки кодировки пасеки."
    assert doc(write(tmp_path, "ru.txt", text, encoding="cp1251")).text == text


@pytest.mark.parametrize(
    ("encoding", "with_bom"),
    [("utf-16", True), ("utf-16-le", False), ("utf-16-be", False)],
)
def test_utf16_with_and_without_bom(tmp_path: Path, encoding: str, with_bom: bool) -> None:
    text = "Leadership notes\r\nPresent: Zoë Lindqvist, Søren Åkesson\r\nDecision: café opens."
    data = text.encode(encoding)
    assert data.startswith((b"\xff\xfe", b"\xfe\xff")) == with_bom
    d = doc(write(tmp_path, "notes.txt", data))
    assert d.text == text.replace("\r\n", "\n")
    assert "\x00" not in d.text


HTML_PAGE = """<!DOCTYPE html>
<html><head><title>  Apiary
  guide </title><style>body { color: red }</style>
<script>var secret = "do not index";</script></head>
<body>
<nav><a href="/">Home</a> <a href="/shop">Shop menu</a></nav>
<h1>Getting   started</h1>
<p>Place the   scale
   on <b>firm</b> ground.<br>Then level it.</p>
<h2>Parts</h2>
<ul><li>Platform</li><li>Four feet<ul><li>adjustable</li></ul></li></ul>
<h3>Sizes</h3>
<table><caption>Sizes</caption>
<tr><th>Model</th><th>Capacity</th></tr>
<tr><td>S2</td><td>200  kg</td></tr>
</table>
<div>Loose text in a div</div>
<!-- a comment -->
</body></html>"""


def test_html_headings_become_markdown_and_noise_is_dropped(tmp_path: Path) -> None:
    d = doc(write(tmp_path, "guide.html", HTML_PAGE))
    assert d.title == "Apiary guide"
    assert d.format == "html"
    assert d.text == (
        "# Getting started\n\n"
        "Place the scale on firm ground.\nThen level it.\n\n"
        "## Parts\n\n"
        "- Platform\n- Four feet\n  - adjustable\n\n"
        "### Sizes\n\n"
        "Sizes\n\n"
        "Model | Capacity\nS2 | 200 kg\n\n"
        "Loose text in a div"
    )
    for noise in ("secret", "color", "Shop menu", "comment"):
        assert noise not in d.text


def test_html_title_falls_back_to_h1_then_stem(tmp_path: Path) -> None:
    assert doc(write(tmp_path, "a.htm", "<h1>The  H1</h1><p>x</p>")).title == "The H1"
    assert doc(write(tmp_path, "plain-page.html", "<p>Just a paragraph.</p>")).title == "plain-page"


def test_pdf_text_layer_pages_joined_and_metadata(tmp_path: Path) -> None:
    d = doc(write(tmp_path, "press.pdf", sample_pdf_bytes()))
    assert d.format == "pdf"
    assert d.title == "SwarmWatch launch press release"  # from the PDF's metadata
    assert d.metadata["page_count"] == 3
    assert "available to order from 14 March 2026" in d.text
    assert "José Ibáñez" in d.text  # WinAnsi accents survive
    # Page 1 ends with the chief executive's quote; page 2 starts with "Private by design".
    assert 'at the right moment."\n\nPrivate by design' in d.text


def test_pdf_without_metadata_title_uses_file_stem(tmp_path: Path) -> None:
    d = doc(write(tmp_path, "launch-2026.pdf", untitled_pdf_bytes()))
    assert d.title == "launch-2026"
    assert d.metadata["page_count"] == 3


def test_json_single_object(tmp_path: Path) -> None:
    record = {
        "id": "p1",
        "title": "Price list",
        "text": "Scale:\u0000 EUR 289",
        "metadata": {"v": 2},
    }
    d = doc(write(tmp_path, "prices.json", json.dumps(record)))
    assert (d.title, d.text, d.format, d.source_id, d.ordinal) == (
        "Price list",
        "Scale: EUR 289",
        "json",
        "p1",
        0,
    )
    assert d.metadata == {"v": 2}
    untitled = doc(write(tmp_path, "note.json", '{"text": "no id, no title"}'))
    assert (untitled.title, untitled.source_id, untitled.metadata) == ("note", None, {})


def test_json_list_keeps_good_records_and_reports_bad_ones(tmp_path: Path) -> None:
    records = [
        {"id": "a", "text": "first"},
        {"id": "b"},
        {"title": "Third", "text": "third\r\nline"},
        "not an object",
        {"id": 7, "text": "numeric ids are accepted", "metadata": []},
    ]
    docs, problems = parse_document_file(
        write(tmp_path, "list.json", json.dumps(records)), **LIMITS
    )
    assert [(d.source_id, d.title, d.ordinal, d.text) for d in docs] == [
        ("a", "list #1", 0, "first"),
        (None, "Third", 2, "third\nline"),
    ]
    assert problems == [
        Problem("record #2: missing 'text'"),
        Problem("record #4: expected a JSON object, got string"),
        Problem("record #5: 'metadata' must be an object, got array"),
    ]


def test_jsonl_good_lines_returned_with_line_numbers_and_problems(tmp_path: Path) -> None:
    lines = [
        '{"id": "f1", "title": "Returns", "text": "30 days"}',
        "",
        "{not json",
        '{"id": "f3"}',
        '{"id": "f4", "text": 42}',
        "   ",
        '{"id": "f5", "text": "' + "x" * 120 + '"}',
        "[1, 2]",
        '{"text": "untitled record"}',
    ]
    path = write(tmp_path, "faq.jsonl", "\n".join(lines) + "\n")
    docs, problems = parse_document_file(path, max_file_bytes=10_000, max_document_chars=100)
    assert [(d.source_id, d.title, d.line, d.format) for d in docs] == [
        ("f1", "Returns", 1, "jsonl"),
        (None, "faq #7", 9, "jsonl"),
    ]
    assert [p.line for p in problems] == [3, 4, 5, 7, 8]
    reasons = [p.reason for p in problems]
    assert reasons[0].startswith("invalid JSON: Expecting property name")
    assert reasons[1] == "missing 'text'"
    assert reasons[2] == "'text' must be a string, got number"
    assert reasons[3] == "text is 120 characters, over the 100 limit (MEMCITY_MAX_DOCUMENT_CHARS)"
    assert reasons[4] == "expected a JSON object, got array"


def test_ordinals_of_jsonl_records_ignore_blank_lines(tmp_path: Path) -> None:
    one = write(tmp_path, "a.jsonl", '{"text": "r1"}\n{"text": "r2"}\n')
    two = write(tmp_path, "b.jsonl", '\n\n{"text": "r1"}\n\n{"text": "r2"}\n')
    first = parse_document_file(one, **LIMITS)[0]
    second = parse_document_file(two, **LIMITS)[0]
    assert [d.ordinal for d in first] == [d.ordinal for d in second] == [0, 1]
    assert [d.line for d in second] == [3, 5]


def test_over_long_single_document_is_a_problem_not_truncated(tmp_path: Path) -> None:
    docs, problems = parse_document_file(
        write(tmp_path, "long.md", "# Long\n\n" + "word " * 100),
        max_file_bytes=10_000,
        max_document_chars=200,
    )
    assert docs == []
    assert problems == [
        Problem("document is 507 characters, over the 200 limit (MEMCITY_MAX_DOCUMENT_CHARS)")
    ]


# --------------------------------------------------------------------------- whole-file rejections


def test_empty_and_blank_files_are_rejected(tmp_path: Path) -> None:
    assert rejected(write(tmp_path, "empty.md", b"")) == "empty file"
    assert rejected(write(tmp_path, "blank.txt", " \r\n\t\n")) == "empty file (only blank space)"
    assert rejected(write(tmp_path, "blank16.txt", "  \n\n", encoding="utf-16")).startswith(
        "empty file"
    )
    assert rejected(write(tmp_path, "blank.jsonl", "\n\n\n")).startswith("empty file")
    assert rejected(write(tmp_path, "blank.pdf", b"")) == "empty file"
    assert rejected(write(tmp_path, "m.jsonl", ""), parse=parse_memories_file) == "empty file"


def test_binary_files_are_rejected(tmp_path: Path) -> None:
    assert rejected(write(tmp_path, "bytes.txt", bytes(range(256)) * 4)) == "binary file (not text)"
    png_like = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(40)) * 10
    assert rejected(write(tmp_path, "image.md", png_like)) == "binary file (not text)"
    controls = ("ok " + "\x01\x02\x03\x04\x05\x06") * 50  # no NUL, but mostly control characters
    assert rejected(write(tmp_path, "ctl.txt", controls)) == "binary file (not text)"


def test_a_few_stray_control_characters_are_removed_not_rejected(tmp_path: Path) -> None:
    text = "A long enough line of ordinary text about hives and honey. " * 5
    d = doc(write(tmp_path, "bell.txt", "\x07" + text + "\x1b"))
    assert d.text == text.strip()


def test_undecodable_bytes_are_rejected(tmp_path: Path) -> None:
    reason = rejected(write(tmp_path, "noise.txt", bytes(range(128, 256)) * 8))
    assert reason.startswith("undecodable text") or reason == "binary file (not text)"
    bad_bom = b"\xef\xbb\xbfok" + b"\xff\xfe\xfd" * 20
    assert rejected(write(tmp_path, "badbom.md", bad_bom)) == (
        "undecodable text (invalid UTF-8 after its BOM)"
    )


def test_oversized_file_is_refused_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "huge.txt"
    with open(big, "wb") as fh:  # a sparse 61.2 MB file: its size is known without reading it
        fh.truncate(int(61.2 * 1024 * 1024))
    reason = rejected(big, max_file_bytes=50 * 1024 * 1024)
    assert reason == "file is 61.2 MB, over the 50.0 MB limit (MEMCITY_MAX_FILE_BYTES)"
    small = write(tmp_path, "small.md", "x" * 2000)
    assert rejected(small, max_file_bytes=1000) == (
        "file is 2.0 KB, over the 1000 bytes limit (MEMCITY_MAX_FILE_BYTES)"
    )
    # When both sizes round to the same figure, exact byte counts are shown.
    assert rejected(write(tmp_path, "edge.md", "x" * 1_000_001), max_file_bytes=1_000_000) == (
        "file is 1,000,001 bytes, over the 1,000,000 bytes limit (MEMCITY_MAX_FILE_BYTES)"
    )


def test_truncated_and_corrupt_pdfs_are_rejected(tmp_path: Path) -> None:
    assert "truncated PDF" in rejected(write(tmp_path, "half.pdf", truncated_pdf_bytes()))
    data = sample_pdf_bytes()
    mangled = data[:9] + bytes(b ^ 0x5A for b in data[9:-40]) + data[-40:]  # keeps %PDF and %%EOF
    assert rejected(write(tmp_path, "mangled.pdf", mangled)).startswith("corrupt PDF")
    assert (
        rejected(write(tmp_path, "fake.pdf", "just text, renamed")) == "not a PDF (no %PDF header)"
    )
    # Blank space after the end marker (as some tools append) is not truncation.
    assert doc(write(tmp_path, "padded.pdf", data + b"\r\n" * 2000)).metadata["page_count"] == 3


def test_pdf_without_text_layer_is_rejected(tmp_path: Path) -> None:
    reason = rejected(write(tmp_path, "scan.pdf", textless_pdf_bytes()))
    assert reason.startswith("PDF has no text layer")


def test_invalid_json_file_and_wrong_top_level_are_rejected(tmp_path: Path) -> None:
    assert rejected(write(tmp_path, "broken.json", '{"text": "a",\n  oops}')) == (
        "invalid JSON: Expecting property name enclosed in double quotes (line 2, column 3)"
    )
    assert rejected(write(tmp_path, "num.json", "42")) == (
        "JSON must be an object or a list of objects, got number"
    )
    assert rejected(write(tmp_path, "none.json", "[]")) == "JSON list is empty (no records)"
    # Line numbers count from the file's first line, blank lines included.
    assert rejected(write(tmp_path, "lead.json", "\n\n{oops}")).endswith("(line 3, column 2)")


def test_unsupported_suffix_is_rejected_without_reading(tmp_path: Path) -> None:
    reason = rejected(write(tmp_path, "report.docx", b"PK\x03\x04"))
    assert reason.startswith("unsupported file type '.docx' (supported: ")
    assert all(s in reason for s in SUPPORTED_DOCUMENT_SUFFIXES)
    assert "(no extension)" in rejected(write(tmp_path, "README", "text"))
    assert doc(write(tmp_path, "UPPER.MD", "# Caps\n\nok")).title == "Caps"


# Tests run as root, for whom `chmod 000` does not stop a read. These inputs fail for root too:
# a directory, a named pipe (opening it would block forever, so it must be refused from its
# stat alone), a dangling symbolic link, and /proc/self/mem (a "regular" file whose read at
# offset 0 fails with EIO, because address 0 is never mapped).


def test_directory_with_a_document_name_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "folder.md").mkdir()
    assert rejected(tmp_path / "folder.md") == "not a regular file (a directory)"


def test_named_pipe_is_rejected_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    unblock_fifo_later(fifo)  # turns a wrongly blocking open into a failure, not a hang
    assert rejected(fifo) == "not a regular file (a named pipe)"
    assert rejected(fifo, parse=parse_conversation_file) == "not a regular file (a named pipe)"


def test_dangling_link_and_failing_read_are_unreadable(tmp_path: Path) -> None:
    (tmp_path / "gone.md").symlink_to(tmp_path / "deleted.md")
    assert rejected(tmp_path / "gone.md") == "file not found"
    mem = Path("/proc/self/mem")
    if not mem.exists():
        pytest.skip("needs Linux /proc")
    (tmp_path / "memory.txt").symlink_to(mem)
    assert rejected(tmp_path / "memory.txt") == "unreadable file: Input/output error"
    assert rejected(mem, parse=parse_memories_file) == "unreadable file: Input/output error"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_is_unreadable(tmp_path: Path) -> None:  # pragma: no cover - non-root
    path = write(tmp_path, "secret.md", "# hidden")
    path.chmod(0)
    assert rejected(path) == "unreadable file: Permission denied"


def test_read_bytes_checked_returns_exact_bytes(tmp_path: Path) -> None:
    data = "café\r\n".encode("latin-1")
    assert read_bytes_checked(write(tmp_path, "x.bin", data), max_file_bytes=len(data)) == data


def test_decode_text_rejects_nul_bytes_outside_utf16() -> None:
    with pytest.raises(FileRejected, match="binary"):
        decode_text(b"plain ascii with a \x00 NUL in the middle of a fairly long line")
    assert decode_text("kort".encode("utf-16")) == "kort"


# --------------------------------------------------------------------------- memories


def test_memories_good_rows_and_bad_rows(tmp_path: Path) -> None:
    rows = [
        {"id": "m1", "text": "Prefers short replies.", "created_at": "2026-10-06T09:20:00Z"},
        {
            "id": "m2",
            "text": "Local time",
            "created_at": "2026-10-06T10:20:00+01:00",
            "metadata": {"topic": "t"},
        },
        {"id": "m3", "text": "Naive time is UTC", "created_at": "2026-10-06T09:20:00"},
        {"id": "m4", "text": "bad date", "created_at": "last Tuesday"},
        {"text": "no id"},
        {"id": "m6"},
        {"id": "m7", "text": "wrong metadata", "metadata": "x"},
        {"id": "m8", "text": "no created_at at all"},
        {"id": "m9", "text": "y" * 300},
        {"id": "m10", "text": "numeric date", "created_at": 1760000000},
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{oops")  # line 4
    path = write(tmp_path, "memories.jsonl", "\r\n".join(lines) + "\r\n")
    memories, problems = parse_memories_file(path, max_file_bytes=100_000, max_document_chars=200)
    nine = datetime(2026, 10, 6, 9, 20, tzinfo=UTC)
    assert memories == [
        MemoryRecord("m1", "Prefers short replies.", nine, {}, 1),
        MemoryRecord("m2", "Local time", nine, {"topic": "t"}, 2),
        MemoryRecord("m3", "Naive time is UTC", nine, {}, 3),
        MemoryRecord("m8", "no created_at at all", None, {}, 9),
    ]
    assert memories[1].created_at.tzinfo == UTC
    assert [(p.line, p.reason) for p in problems] == [
        (4, "invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
        (5, "'created_at' 'last Tuesday' is not an ISO 8601 date-time"),
        (6, "missing 'id'"),
        (7, "missing 'text'"),
        (8, "'metadata' must be an object, got string"),
        (10, "memory text is 300 characters, over the 200 limit (MEMCITY_MAX_DOCUMENT_CHARS)"),
        (11, "'created_at' must be an ISO 8601 string, got number"),
    ]


# --------------------------------------------------------------------------- conversations


def test_conversation_messages_turns_roles_and_problems(tmp_path: Path) -> None:
    rows = [
        {"role": "system", "content": "Be brief.", "created_at": "2026-11-03T08:52:00Z"},
        {"role": "user", "content": "Gateway offline at 2am?"},
        {"role": "wizard", "content": "not a role"},
        {"role": "Assistant", "content": "That is the update window."},
        {"role": "user"},
        {"role": "tool", "content": '{"firmware": "2.9"}', "created_at": "yesterday"},
        {"content": "who said this?"},
        {"role": "user", "content": "Thanks."},
    ]
    text = (
        "\n".join(json.dumps(r) for r in rows[:4])
        + "\n\n"
        + "\n".join(json.dumps(r) for r in rows[4:])
    )
    messages, problems = parse_conversation_file(write(tmp_path, "s1.jsonl", text), **LIMITS)
    assert messages == [
        ConversationMessage(1, "system", "Be brief.", datetime(2026, 11, 3, 8, 52, tzinfo=UTC), 1),
        ConversationMessage(2, "user", "Gateway offline at 2am?", None, 2),
        ConversationMessage(3, "assistant", "That is the update window.", None, 4),
        ConversationMessage(4, "user", "Thanks.", None, 9),
    ]
    assert [(p.line, p.reason) for p in problems] == [
        (3, "'role' must be one of assistant, system, tool, user, got 'wizard'"),
        (6, "missing 'content'"),
        (7, "'created_at' 'yesterday' is not an ISO 8601 date-time"),
        (8, "missing 'role'"),
    ]


# --------------------------------------------------------------------------- the sample corpus


def _corpus_files() -> list[Path]:
    return sorted(p for p in (corpus_root() / "orgs").rglob("*") if p.is_file())


def test_the_whole_sample_corpus_parses_without_any_problem() -> None:
    limits = {"max_file_bytes": 50 * 1024 * 1024, "max_document_chars": 2_000_000}
    formats: dict[str, int] = {}
    memory_counts: dict[str, int] = {}
    session_sizes: dict[str, list[int]] = {}
    for path in _corpus_files():
        org, area, scope, *rest = path.relative_to(corpus_root() / "orgs").parts
        if area == "knowledge_bases":
            docs, problems = parse_document_file(path, **limits)
            assert docs, path
            for d in docs:
                formats[d.format] = formats.get(d.format, 0) + 1
                assert d.text and d.title and "\r" not in d.text and "\x00" not in d.text
                json.dumps(d.metadata)
        elif rest == ["memories.jsonl"]:
            memories, problems = parse_memories_file(path, **limits)
            assert all(m.created_at is not None for m in memories)
            memory_counts[f"{org}/{scope}"] = len(memories)
        else:
            messages, problems = parse_conversation_file(path, **limits)
            session_sizes.setdefault(f"{org}/{scope}", []).append(len(messages))
        assert problems == [], (path, problems)
    assert set(formats) == {"md", "txt", "html", "pdf", "json", "jsonl"}
    main_users = sorted(u for u in memory_counts if u.startswith(MAIN_ORG + "/"))
    assert 2 <= len(main_users) <= 3
    for user in main_users:
        assert 15 <= memory_counts[user] <= 40, user
        sizes = session_sizes[user]
        assert 2 <= len(sizes) <= 4 and all(5 <= n <= 20 for n in sizes), (user, sizes)
    assert [u for u in memory_counts if u.startswith(OTHER_ORG + "/")] == [f"{OTHER_ORG}/ruth"]


def test_sample_corpus_encodings_and_contradictions_are_as_documented() -> None:
    kb = main_kb_dir()
    handbook_bytes = (kb / "team/employee-handbook.txt").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        handbook_bytes.decode("utf-8")  # really Latin-1, not UTF-8
    handbook = doc(kb / "team/employee-handbook.txt")
    assert "Hélène Marchetti" in handbook.text and "Inês Conceição" in handbook.text
    meeting_bytes = (kb / "team/leadership-meeting-2026-09-08.txt").read_bytes()
    assert meeting_bytes.startswith(b"\xff\xfe")
    meeting = doc(kb / "team/leadership-meeting-2026-09-08.txt")
    assert "Søren Åkesson" in meeting.text and "\r" not in meeting.text

    returns = doc(kb / "policies/returns-and-refunds.md").text
    faq = {d.source_id: d.text for d in parse_document_file(kb / "support/faq.jsonl", **LIMITS)[0]}
    assert "30 days of delivery" in returns and "within 14 days" in faq["faq-return-window"]
    assert "14 Tannery Lane" in handbook.text
    assert "Cooper's Yard" in doc(kb / "website/contact.html").text
    assert "14 March 2026" in doc(kb / "press/swarmwatch-launch-press-release.pdf").text
    assert "2 June 2026" in doc(kb / "products/swarmwatch-roadmap.md").text
    assert "about 18 months" in doc(kb / "products/hivescale-s2.md").text
    assert "about 12 months" in faq["faq-scale-battery"]
    # Chunking needs some long documents: at least two over ~1,000 words.
    long_docs = [p for p in kb.rglob("*.md") if len(doc(p).text.split()) > 1000]
    assert len(long_docs) >= 2


def test_eval_questions_point_at_real_files_of_the_main_kb() -> None:
    lines = (corpus_root() / "eval/questions.jsonl").read_text(encoding="utf-8").splitlines()
    questions = [json.loads(line) for line in lines if line.strip()]
    assert 15 <= len(questions) <= 20
    assert len({q["id"] for q in questions}) == len(questions)
    for q in questions:
        assert set(q) == {
            "id",
            "org_id",
            "knowledge_base_id",
            "question",
            "relevant_paths",
            "answer",
        }
        assert (q["org_id"], q["knowledge_base_id"]) == (MAIN_ORG, MAIN_KB)
        assert q["question"].endswith("?") and q["answer"]
        for rel in q["relevant_paths"]:
            assert (main_kb_dir() / rel).is_file(), rel


def test_second_org_has_different_facts_and_corpus_is_small() -> None:
    other = corpus_root() / "orgs" / OTHER_ORG / "knowledge_bases" / "operations"
    texts = " ".join(doc(p).text for p in sorted(other.iterdir()))
    assert "48 hours" in texts and "3 Harbour Steps" in texts
    for brambleway_fact in ("Brambleway", "HiveScale", "30 days", "Cooper's Yard"):
        assert brambleway_fact not in texts
    assert sum(p.stat().st_size for p in corpus_root().rglob("*") if p.is_file()) < 300_000


# --------------------------------------------------------------------------- bad records, one each


def _good_memories(n: int = 5) -> list[str]:
    return [json.dumps({"id": f"m{i}", "text": f"memory number {i}"}) for i in range(n)]


def test_a_number_python_cannot_convert_costs_only_its_line(tmp_path: Path) -> None:
    huge = "9" * 5000  # over Python's 4,300-digit limit: json.loads alone raises ValueError
    lines = _good_memories()
    lines.insert(2, '{"id": "big", "text": "t", "metadata": {"n": ' + huge + "}}")  # line 3
    lines.append('{"id": ' + huge + ', "text": "t"}')  # line 7
    lines.append('{"id": "ignored", "text": "kept", "unused": ' + huge + "}")  # line 8
    path = write(tmp_path, "memories.jsonl", "\n".join(lines))
    memories, problems = parse_memories_file(path, **LIMITS)
    assert [m.id for m in memories] == ["m0", "m1", "m2", "m3", "m4", "ignored"]
    assert [p.line for p in problems] == [3, 7]
    assert problems[0].reason == (
        "a number of 5,000 digits (over the 4,300-digit limit of Python's integers,"
        " PYTHONINTMAXSTRDIGITS) at metadata.n"
    )
    assert problems[1].reason.startswith("'id' must be a string, got a number of 5,000 digits")
    # The same line reader serves conversations and JSONL documents.
    session = write(
        tmp_path,
        "s.jsonl",
        '{"role": "user", "content": "hi"}\n{"role": "user", "content": ' + huge + "}\n",
    )
    messages, problems = parse_conversation_file(session, **LIMITS)
    assert [(m.content, m.line) for m in messages] == [("hi", 1)]
    assert [p.line for p in problems] == [2]
    docs, problems = parse_document_file(
        write(tmp_path, "d.jsonl", '{"text": "a"}\n{"text": "b", "metadata": {"x": ' + huge + "}}"),
        **LIMITS,
    )
    assert [d.text for d in docs] == ["a"] and [p.line for p in problems] == [2]


def test_lone_surrogates_become_replacement_characters(tmp_path: Path) -> None:
    lines = [
        r'{"id": "m1", "text": "half \ud800 a pair", "metadata": {"k\udc00": ["\ud83d"]}}',
        r'{"id": "m2\udfff", "text": "a real pair \ud83d\ude00 stays"}',
    ]
    memories, problems = parse_memories_file(
        write(tmp_path, "memories.jsonl", "\n".join(lines)), **LIMITS
    )
    assert problems == []
    assert [(m.id, m.text, m.metadata) for m in memories] == [
        ("m1", "half \ufffd a pair", {"k\ufffd": ["\ufffd"]}),
        ("m2\ufffd", "a real pair \U0001f600 stays", {}),
    ]
    for m in memories:  # what the lake writes must encode as UTF-8
        (m.id + m.text + json.dumps(m.metadata, ensure_ascii=False)).encode("utf-8")
    docs, _ = parse_document_file(
        write(tmp_path, "d.json", r'{"title": "T\udbff", "text": "x\udc80y"}'), **LIMITS
    )
    assert (docs[0].title, docs[0].text) == ("T\ufffd", "x\ufffdy")
    messages, _ = parse_conversation_file(
        write(tmp_path, "s.jsonl", r'{"role": "user", "content": "\ud800"}'), **LIMITS
    )
    assert messages[0].content == "\ufffd"


def test_nan_infinity_and_overflow_cost_their_line_when_kept(tmp_path: Path) -> None:
    lines = [
        '{"id": "a", "text": "t", "metadata": {"score": NaN}}',
        '{"id": "b", "text": "t", "metadata": {"x": [1, -Infinity]}}',
        '{"id": "c", "text": "t", "metadata": {"x": 1e400}}',
        '{"id": "d", "text": NaN}',
        '{"id": "e", "text": "unused fields may hold anything", "score": NaN, "big": 1e999}',
    ]
    memories, problems = parse_memories_file(
        write(tmp_path, "memories.jsonl", "\n".join(lines)), **LIMITS
    )
    assert [m.id for m in memories] == ["e"]
    assert [(p.line, p.reason) for p in problems] == [
        (1, "NaN is not a JSON number at metadata.score"),
        (2, "-Infinity is not a JSON number at metadata.x[1]"),
        (3, "a number out of range at metadata.x"),
        (4, "'text' must be a string, got NaN"),
    ]


def test_deep_nesting_is_a_problem_of_its_line(tmp_path: Path) -> None:
    deep_meta = '{"id": "a", "text": "t", "metadata": ' + '{"k": ' * 150 + "1" + "}" * 151
    deeper = "[" * 100_000 + "]" * 100_000  # deeper than Python's parser goes
    path = write(tmp_path, "m.jsonl", "\n".join([deep_meta, deeper, '{"id": "ok", "text": "t"}']))
    memories, problems = parse_memories_file(path, max_file_bytes=10**6, max_document_chars=10**6)
    assert [m.id for m in memories] == ["ok"]
    assert [p.line for p in problems] == [1, 2]
    assert problems[0].reason.startswith("nested more than 100 levels deep at metadata.k.k.k")
    assert problems[1].reason == "invalid JSON: nested too deeply"


def test_one_bad_record_of_a_json_list_costs_only_that_record(tmp_path: Path) -> None:
    text = '[{"text": "a"}, {"text": "b", "metadata": {"n": ' + "1" * 4400 + '}}, {"text": "c"}]'
    docs, problems = parse_document_file(write(tmp_path, "list.json", text), **LIMITS)
    assert [d.text for d in docs] == ["a", "c"]
    assert len(problems) == 1 and problems[0].reason.startswith("record #2: a number of 4,400")


def test_ids_titles_and_metadata_over_the_limit_name_the_setting(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "i" * 101, "text": "t"}),
        json.dumps({"title": "T" * 101, "text": "t"}),
        json.dumps({"text": "t", "metadata": {"k": "v" * 100}}),
        json.dumps({"text": "fits"}),
    ]
    docs, problems = parse_document_file(
        write(tmp_path, "d.jsonl", "\n".join(lines)), max_file_bytes=10_000, max_document_chars=100
    )
    assert [d.text for d in docs] == ["fits"]
    assert [(p.line, p.reason) for p in problems] == [
        (1, "'id' is 101 characters, over the 100 limit (MEMCITY_MAX_DOCUMENT_CHARS)"),
        (2, "'title' is 101 characters, over the 100 limit (MEMCITY_MAX_DOCUMENT_CHARS)"),
        (3, "'metadata' is 109 characters, over the 100 limit (MEMCITY_MAX_DOCUMENT_CHARS)"),
    ]


def test_a_time_out_of_range_in_utc_is_a_problem(tmp_path: Path) -> None:
    lines = [
        '{"id": "a", "text": "t", "created_at": "0001-01-01T00:00:00+01:00"}',
        '{"id": "b", "text": "t", "created_at": "9999-12-31T23:00:00+00:00"}',
    ]
    memories, problems = parse_memories_file(write(tmp_path, "m.jsonl", "\n".join(lines)), **LIMITS)
    assert [m.id for m in memories] == ["b"]
    assert problems == [
        Problem("'created_at' '0001-01-01T00:00:00+01:00' is out of range in UTC", 1)
    ]


def test_pdf_text_over_the_limit_is_refused_at_the_page_that_crosses_it(tmp_path: Path) -> None:
    path = write(tmp_path, "press.pdf", sample_pdf_bytes())
    reason = rejected(path, max_document_chars=500)
    assert reason.startswith("document has ") and "characters in its first 1 of 3 pages" in reason
    assert reason.endswith("over the 500 limit (MEMCITY_MAX_DOCUMENT_CHARS)")


def test_a_parser_failing_on_a_file_refuses_that_file(tmp_path: Path) -> None:
    deep = write(tmp_path, "deep.html", "<div>" * 5000 + "text" + "</div>" * 5000)
    assert rejected(deep) == "HTML file is nested too deeply to read"


def test_parsers_read_the_bytes_they_are_given(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.md", "# On disk\n\nthe file as it is now")
    docs, _ = parse_document_file(path, **LIMITS, data=b"# Read before\n\nwhat was hashed")
    assert docs[0].title == "Read before" and docs[0].text.endswith("what was hashed")
    with pytest.raises(FileRejected, match="empty file"):
        parse_memories_file(path, **LIMITS, data=b"")
    with pytest.raises(FileRejected, match="MEMCITY_MAX_FILE_BYTES"):
        parse_document_file(path, max_file_bytes=3, max_document_chars=10, data=b"four")
