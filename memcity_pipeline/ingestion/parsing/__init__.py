"""Reading source files: documents, user memories and conversations, into plain records.

Two kinds of failure are kept apart:

- `FileRejected` (an exception): the whole file is unusable (unreadable, empty, too large,
  binary, undecodable, a corrupt PDF, a PDF without a text layer, an unsupported type). Its
  message is a short reason meant for a person.
- `Problem` (a value): one record of a multi-record file is wrong (a malformed JSONL line, a
  missing field, a wrong type, a text over the size limit). The other records are still returned.

Every text returned is UTF-8-clean Python text with `\\n` newlines, no NUL or other stray control
characters, and no leading or trailing blank space. Nothing is ever silently truncated: a text
over `max_document_chars` is a `Problem`.
"""

import io
import itertools
import json
import logging
import re
import stat
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

SUPPORTED_DOCUMENT_SUFFIXES: frozenset[str] = frozenset(
    {".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".json", ".jsonl"}
)
CONVERSATION_ROLES: frozenset[str] = frozenset({"user", "assistant", "system", "tool"})

_FORMAT_BY_SUFFIX: dict[str, str] = {
    ".txt": "txt",
    ".md": "md",
    ".markdown": "md",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".json": "json",
    ".jsonl": "jsonl",
}

# Byte order marks, longest first (the UTF-32 LE mark begins with the UTF-16 LE one).
_BOMS: tuple[tuple[bytes, str], ...] = (
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xfe\xff", "utf-16-be"),
    (b"\xff\xfe", "utf-16-le"),
)
# Control characters that never belong in text (C0 except tab/newlines/form feed, DEL, C1).
_STRAY_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
# Above this share of stray control characters a decoded file is taken for binary data.
_MAX_CONTROL_RATIO = 0.01
_ENV_MAX_FILE_BYTES = "MEMCITY_MAX_FILE_BYTES"
_ENV_MAX_DOCUMENT_CHARS = "MEMCITY_MAX_DOCUMENT_CHARS"

T = TypeVar("T")  # a parsed record


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input; becomes a row of `ingestion_errors`."""

    reason: str
    line: int | None = None  # 1-based line for JSONL problems


class FileRejected(Exception):
    """The whole file is unusable; `str(exc)` is the reason, meant for a person."""


@dataclass(frozen=True)
class ParsedDocument:
    """One document read from a file (a JSON list or a JSONL file holds several)."""

    title: str
    text: str  # clean text (see the module docstring)
    format: str  # "txt" | "md" | "html" | "pdf" | "json" | "jsonl"
    metadata: dict[str, Any]  # JSON-serialisable
    source_id: str | None = None  # the `id` given in a JSON/JSONL record, else None
    ordinal: int = 0  # position of the record in the file (0 for one-document files)
    line: int | None = None  # JSONL line number


@dataclass(frozen=True)
class MemoryRecord:
    """One row of a user's `memories.jsonl`."""

    id: str
    text: str
    created_at: datetime | None  # always timezone-aware UTC when given
    metadata: dict[str, Any]
    line: int


@dataclass(frozen=True)
class ConversationMessage:
    """One message of a conversation session (one JSONL file per session)."""

    turn: int  # 1-based position among the session's valid messages
    role: str
    content: str
    created_at: datetime | None  # always timezone-aware UTC when given
    line: int


# --------------------------------------------------------------------------- reading bytes


def _human_bytes(n: int) -> str:
    """A size as a person reads it: `512 bytes`, `12.3 KB`, `61.2 MB` (1 KB = 1024 bytes)."""
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def _size_reason(size: int, limit: int) -> str:
    """Why a file of `size` bytes is refused under `limit`; exact counts when rounding hides it."""
    shown, cap = _human_bytes(size), _human_bytes(limit)
    if shown == cap:
        shown, cap = f"{size:,} bytes", f"{limit:,} bytes"
    return f"file is {shown}, over the {cap} limit ({_ENV_MAX_FILE_BYTES})"


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a plain file"


def read_bytes_checked(path: Path, *, max_file_bytes: int) -> bytes:
    """The bytes of `path`, refusing what is missing, not a regular file, too large or empty.

    The size is checked before reading, and the read itself never takes more than
    `max_file_bytes + 1` bytes, so a file that grows meanwhile is still refused.
    Special files (pipes, devices, directories) are refused without being opened.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileRejected("file not found") from None
    except OSError as exc:
        raise FileRejected(f"unreadable file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileRejected(f"not a regular file ({_kind_of(st.st_mode)})")
    if st.st_size > max_file_bytes:
        raise FileRejected(_size_reason(st.st_size, max_file_bytes))
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_file_bytes + 1)
    except OSError as exc:
        raise FileRejected(f"unreadable file: {exc.strerror or exc}") from None
    if len(data) > max_file_bytes:
        raise FileRejected(_size_reason(len(data), max_file_bytes))
    if not data:
        raise FileRejected("empty file")
    return data


# --------------------------------------------------------------------------- decoding text


def _utf16_without_bom(data: bytes) -> str | None:
    """`utf-16-le`/`utf-16-be` when the bytes look like BOM-less UTF-16 of mostly Latin text."""
    sample = data[:8192]
    if len(sample) < 4:
        return None
    sample = sample[: len(sample) - len(sample) % 2]
    half = len(sample) // 2
    even_nuls = sample[0::2].count(0) / half
    odd_nuls = sample[1::2].count(0) / half
    if odd_nuls > 0.4 and even_nuls < 0.05:
        return "utf-16-le"
    if even_nuls > 0.4 and odd_nuls < 0.05:
        return "utf-16-be"
    return None


def _strict_decode(data: bytes, encoding: str) -> str | None:
    try:
        return data.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        return None


def _guess_legacy(data: bytes) -> tuple[str, str]:
    """Decode bytes that are not UTF-8 with charset-normalizer, preferring Western (CP1252).

    charset-normalizer ranks several single-byte code pages equally well on short Western text
    (it may pick CP1250 for French), so Windows-1252 (a superset of Latin-1's printable range)
    wins whenever it decodes the bytes and reads at least as cleanly as the best guess.
    """
    from charset_normalizer import from_bytes
    from charset_normalizer.md import mess_ratio

    best = from_bytes(data).best()
    western = _strict_decode(data, "cp1252")
    if western is not None:
        western_mess = mess_ratio(western, 1.0)
        if western_mess <= 0.1 and (best is None or western_mess <= best.chaos + 0.02):
            return western, "cp1252"
    if best is None:
        raise FileRejected("undecodable text (no plausible character encoding)")
    return str(best), best.encoding


def _check_not_binary(text: str) -> None:
    strays = len(_STRAY_CONTROLS.findall(text))
    if strays and strays > _MAX_CONTROL_RATIO * len(text):
        raise FileRejected("binary file (not text)")


def decode_text_with_encoding(data: bytes) -> tuple[str, str]:
    """`decode_text`, also naming the encoding that was used (`utf-8`, `utf-16-le`, `cp1252`...)."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            text = _strict_decode(data[len(bom) :], encoding)
            if text is None:
                raise FileRejected(f"undecodable text (invalid {encoding.upper()} after its BOM)")
            _check_not_binary(text)
            return text, encoding
    utf16 = _utf16_without_bom(data)
    if utf16 is not None:
        text = _strict_decode(data, utf16)
        if text is not None:
            _check_not_binary(text)
            return text, utf16
    if b"\x00" in data:
        raise FileRejected("binary file (not text)")
    text = _strict_decode(data, "utf-8")
    encoding = "utf-8"
    if text is None:
        text, encoding = _guess_legacy(data)
    _check_not_binary(text)
    return text, encoding


def decode_text(data: bytes) -> str:
    """Text from bytes: BOMs honoured, UTF-8 first, UTF-16 without BOM, else a detected encoding.

    Raises `FileRejected` for binary data (NUL bytes outside UTF-16/32, or many control
    characters) and for bytes no encoding reads plausibly. The result is not yet normalised
    (see `clean_text`), but it has no BOM.
    """
    return decode_text_with_encoding(data)[0]


def clean_text(text: str) -> str:
    """Normalise newlines to `\\n`, drop NUL/control characters and BOMs, NFC, strip the ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\v", "\n").replace("\f", "\n")
    text = _STRAY_CONTROLS.sub("", text).replace("\ufeff", "")
    return unicodedata.normalize("NFC", text).strip()


def _decode_json_file(path: Path, max_file_bytes: int) -> str:
    """Read and decode a JSON/JSONL file, keeping every line where it is (for line numbers).

    Only line endings are normalised here; each record's strings are cleaned one by one.
    """
    text = decode_text(read_bytes_checked(path, max_file_bytes=max_file_bytes))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise FileRejected("empty file (only blank space)")
    return text


def _too_long(what: str, length: int, limit: int) -> str:
    return f"{what} is {length:,} characters, over the {limit:,} limit ({_ENV_MAX_DOCUMENT_CHARS})"


# --------------------------------------------------------------------------- markdown, text


_ATX_H1 = re.compile(r"^ {0,3}#[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def markdown_title(text: str) -> str | None:
    """The text of the first level-1 ATX heading (`# Title`) outside fenced code, if any."""
    in_fence = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            match = _ATX_H1.match(line)
            if match:
                return match.group(1).strip() or None
    return None


# --------------------------------------------------------------------------- HTML

_DROPPED_TAGS = ("script", "style", "nav", "head", "noscript", "template", "svg", "iframe")
_HEADINGS = {f"h{n}": n for n in range(1, 7)}
_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "center", "dd", "details", "dialog",
        "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "header",
        "hgroup", "hr", "html", "li", "main", "ol", "p", "pre", "section", "summary", "table",
        "ul", "caption", "tbody", "thead", "tfoot", "tr", "td", "th",
    }
)  # fmt: skip
_LINE_BREAK = "\ue000"  # a private-use character standing for <br> while whitespace is collapsed


def _collapse(text: str) -> str:
    """Whitespace runs become one space, `<br>` marks become newlines."""
    lines = (" ".join(part.split()) for part in text.split(_LINE_BREAK))
    return "\n".join(line for line in lines if line)


def _inline_text(node: Any) -> str:
    from bs4 import Tag

    if isinstance(node, Tag):
        return node.get_text()
    return str(node)


def _html_blocks(node: Any, depth: int = 0) -> Iterator[str]:
    """Markdown-ish blocks of an element's children: headings, paragraphs, lists, tables."""
    from bs4 import Comment, Doctype, NavigableString, Tag

    run: list[str] = []

    def flush() -> Iterator[str]:
        text = _collapse("".join(run))
        run.clear()
        if text:
            yield text

    for child in node.children:
        if isinstance(child, (Comment, Doctype)):
            continue
        if isinstance(child, NavigableString):
            run.append(str(child))
            continue
        if not isinstance(child, Tag):
            continue
        name = child.name.lower()
        if name not in _HEADINGS and name not in _BLOCK_TAGS:
            run.append(_inline_text(child))
            continue
        yield from flush()
        if name in _HEADINGS:
            text = _collapse(child.get_text()).replace("\n", " ")
            if text:
                yield "#" * _HEADINGS[name] + " " + text
        elif name in ("ul", "ol"):
            items = list(_html_list(child, depth))
            if items:
                yield "\n".join(items)
        elif name == "table":
            yield from _html_table(child)
        elif name == "pre":
            text = child.get_text().replace(_LINE_BREAK, "\n").strip("\n")
            if text.strip():
                yield text
        elif name == "hr":
            continue
        else:
            yield from _html_blocks(child, depth)
    yield from flush()


def _html_list(node: Any, depth: int) -> Iterator[str]:
    """`- item` lines of a list; nested lists are indented by two spaces a level."""
    from bs4 import Tag

    indent = "  " * depth
    for item in node.find_all("li", recursive=False):
        nested = [c for c in item.children if isinstance(c, Tag) and c.name in ("ul", "ol")]
        for sub in nested:
            sub.extract()
        text = " ".join(_collapse(item.get_text()).split("\n"))
        if text:
            yield f"{indent}- {text}"
        for sub in nested:
            yield from _html_list(sub, depth + 1)


def _html_table(table: Any) -> Iterator[str]:
    """A table as one block: each row's cells joined by ` | `; a caption becomes a paragraph."""
    caption = table.find("caption")
    if caption is not None:
        text = _collapse(caption.get_text()).replace("\n", " ")
        caption.extract()
        if text:
            yield text
    rows = []
    for tr in table.find_all("tr"):
        cells = [
            " ".join(_collapse(cell.get_text()).split("\n"))
            for cell in tr.find_all(["td", "th"], recursive=False)
        ]
        if any(cells):
            rows.append(" | ".join(cells))
    if rows:
        yield "\n".join(rows)


def html_to_text(html: str) -> tuple[str | None, str]:
    """(title, markdown-like text) of an HTML page.

    The title is `<title>`, else the first `<h1>`. Headings become `#` headings, paragraphs are
    separated by blank lines, list items become `- ` lines, table rows become cells joined by
    ` | `; scripts, styles, navigation and the head are dropped.
    """
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    title = None
    if soup.title is not None:
        title = " ".join(soup.title.get_text().split()) or None
    if title is None:
        h1 = soup.find("h1")
        if h1 is not None:
            title = " ".join(h1.get_text().split()) or None
    for tag in soup.find_all(_DROPPED_TAGS):
        tag.decompose()
    for br in soup.find_all("br"):
        br.replace_with(_LINE_BREAK)
    text = "\n\n".join(_html_blocks(soup))
    return title, clean_text(text.replace(_LINE_BREAK, "\n"))


# --------------------------------------------------------------------------- PDF


def pdf_to_text(data: bytes) -> tuple[str, dict[str, Any], str | None]:
    """(text, metadata, title) from a PDF's text layer; pages joined by a blank line.

    Raises `FileRejected` for a file that is not a PDF, truncated (no `%%EOF` in its last KB,
    trailing blank space aside), corrupt, encrypted with a password, or without any text.
    """
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError

    if b"%PDF-" not in data[:1024]:
        raise FileRejected("not a PDF (no %PDF header)")
    if b"%%EOF" not in data.rstrip(b"\x00\t\n\x0c\r ")[-1024:]:
        raise FileRejected("truncated PDF (no %%EOF end marker)")
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise FileRejected("encrypted PDF (needs a password)")
        if len(reader.pages) == 0:
            raise FileRejected("corrupt PDF (no pages found)")
        pages = [page.extract_text() or "" for page in reader.pages]
        info = reader.metadata
        raw_title = info.title if info is not None else None
    except FileRejected:
        raise
    except FileNotDecryptedError:
        raise FileRejected("encrypted PDF (needs a password)") from None
    except Exception as exc:  # pypdf raises many kinds of errors on broken files
        raise FileRejected(f"corrupt PDF ({type(exc).__name__}: {exc})"[:300]) from None
    cleaned = [clean_text(p) for p in pages]
    text = "\n\n".join(p for p in cleaned if p)
    if not text:
        raise FileRejected("PDF has no text layer (scanned images are not read)")
    title = " ".join(str(raw_title).split()) if raw_title else None
    meta = {"page_count": len(pages), "pages_with_text": sum(1 for p in cleaned if p)}
    return text, meta, title or None


# --------------------------------------------------------------------------- JSON records


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _json_lines(text: str) -> Iterator[tuple[int, Any | Problem]]:
    """(1-based line, parsed value or Problem) for every non-blank line of a JSONL text."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, Problem(f"invalid JSON: {exc.msg} (column {exc.colno})", number)
        except RecursionError:
            yield number, Problem("invalid JSON: nested too deeply", number)


def _record_id(record: dict[str, Any], field: str, required: bool) -> str | None:
    """A record's id as a string (numbers allowed); ValueError says what is wrong."""
    value = record.get(field)
    if value is None:
        if required:
            raise ValueError(f"missing '{field}'")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"'{field}' must be a string, got {_type_name(value)}")
    text = clean_text(str(value))
    if not text:
        raise ValueError(f"'{field}' is empty")
    return text


def _record_text(record: dict[str, Any], field: str, limit: int, what: str) -> str:
    """A record's required text field, cleaned; ValueError says what is wrong."""
    if field not in record or record[field] is None:
        raise ValueError(f"missing '{field}'")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"'{field}' must be a string, got {_type_name(value)}")
    text = clean_text(value)
    if not text:
        raise ValueError(f"'{field}' is empty")
    if len(text) > limit:
        raise ValueError(_too_long(what, len(text), limit))
    return text


def _record_metadata(record: dict[str, Any]) -> dict[str, Any]:
    value = record.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"'metadata' must be an object, got {_type_name(value)}")
    return value


def _record_title(record: dict[str, Any]) -> str | None:
    value = record.get("title")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"'title' must be a string, got {_type_name(value)}")
    return " ".join(clean_text(value).split()) or None


def parse_timestamp(value: Any) -> datetime | None:
    """An ISO 8601 date-time (or date) as aware UTC; naive values are taken as UTC.

    `None` gives `None`; anything else unreadable raises ValueError.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"'created_at' must be an ISO 8601 string, got {_type_name(value)}")
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"'created_at' {value!r} is not an ISO 8601 date-time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def _document_record(
    record: Any, *, stem: str, fmt: str, ordinal: int, line: int | None, limit: int, many: bool
) -> ParsedDocument:
    """One `{id?, title?, text, metadata?}` record as a document; ValueError when it is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {_type_name(record)}")
    text = _record_text(record, "text", limit, "text")
    source_id = _record_id(record, "id", required=False)
    title = _record_title(record) or (f"{stem} #{ordinal + 1}" if many else stem)
    return ParsedDocument(
        title=title,
        text=text,
        format=fmt,
        metadata=_record_metadata(record),
        source_id=source_id,
        ordinal=ordinal,
        line=line,
    )


def _parse_json_documents(
    text: str, stem: str, limit: int
) -> tuple[list[ParsedDocument], list[Problem]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileRejected(
            f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise FileRejected("invalid JSON: nested too deeply") from None
    if isinstance(value, dict):
        records, many = [value], False
    elif isinstance(value, list):
        if not value:
            raise FileRejected("JSON list is empty (no records)")
        records, many = value, True
    else:
        raise FileRejected(f"JSON must be an object or a list of objects, got {_type_name(value)}")
    docs: list[ParsedDocument] = []
    problems: list[Problem] = []
    for ordinal, record in enumerate(records):
        try:
            docs.append(
                _document_record(
                    record,
                    stem=stem,
                    fmt="json",
                    ordinal=ordinal,
                    line=None,
                    limit=limit,
                    many=many,
                )
            )
        except ValueError as exc:
            label = f"record #{ordinal + 1}: " if many else ""
            problems.append(Problem(f"{label}{exc}"))
    return docs, problems


def _jsonl_records(
    text: str, build: Callable[[dict[str, Any], int, int], T]
) -> tuple[list[T], list[Problem]]:
    """Every JSONL line as `build(object, line, ordinal)`, and the problems of the others.

    `ordinal` counts non-blank lines from 0. A line that is not JSON, not an object, or that
    `build` rejects with ValueError is a `Problem` with its line; the other lines are kept.
    """
    records: list[T] = []
    problems: list[Problem] = []
    for ordinal, (line, value) in enumerate(_json_lines(text)):
        if isinstance(value, Problem):
            problems.append(value)
            continue
        try:
            if not isinstance(value, dict):
                raise ValueError(f"expected a JSON object, got {_type_name(value)}")
            records.append(build(value, line, ordinal))
        except ValueError as exc:
            problems.append(Problem(str(exc), line))
    return records, problems


def _parse_jsonl_documents(
    text: str, stem: str, limit: int
) -> tuple[list[ParsedDocument], list[Problem]]:
    def document(record: dict[str, Any], line: int, ordinal: int) -> ParsedDocument:
        return _document_record(
            record, stem=stem, fmt="jsonl", ordinal=ordinal, line=line, limit=limit, many=True
        )

    return _jsonl_records(text, document)


# --------------------------------------------------------------------------- public parsers


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_DOCUMENT_SUFFIXES:
        what = f"'{suffix}'" if suffix else "(no extension)"
        supported = ", ".join(sorted(SUPPORTED_DOCUMENT_SUFFIXES))
        raise FileRejected(f"unsupported file type {what} (supported: {supported})")
    return _FORMAT_BY_SUFFIX[suffix]


def parse_document_file(
    path: Path, *, max_file_bytes: int, max_document_chars: int
) -> tuple[list[ParsedDocument], list[Problem]]:
    """The documents of one knowledge-base file, and the problems of its records.

    md/txt/html/pdf files hold one document; a `.json` file one object or a list of objects;
    a `.jsonl` file one object a line. Raises `FileRejected` when the whole file is unusable.
    """
    fmt = _check_suffix(path)
    stem = path.stem
    if fmt == "pdf":
        data = read_bytes_checked(path, max_file_bytes=max_file_bytes)
        text, metadata, title = pdf_to_text(data)
        return _single(text, title or stem, fmt, metadata, max_document_chars)
    if fmt in ("json", "jsonl"):
        text = _decode_json_file(path, max_file_bytes)
        if fmt == "json":
            return _parse_json_documents(text, stem, max_document_chars)
        return _parse_jsonl_documents(text, stem, max_document_chars)
    data = read_bytes_checked(path, max_file_bytes=max_file_bytes)
    raw, encoding = decode_text_with_encoding(data)
    metadata: dict[str, Any] = {"encoding": encoding}
    if fmt == "html":
        html_title, text = html_to_text(raw)
        if not text:
            raise FileRejected("HTML page has no text")
        return _single(text, html_title or stem, fmt, metadata, max_document_chars)
    text = clean_text(raw)
    if not text:
        raise FileRejected("empty file (only blank space)")
    title = (markdown_title(text) if fmt == "md" else None) or stem
    return _single(text, title, fmt, metadata, max_document_chars)


def _single(
    text: str, title: str, fmt: str, metadata: dict[str, Any], limit: int
) -> tuple[list[ParsedDocument], list[Problem]]:
    """A one-document file's result; an over-long document is a problem, never truncated."""
    if len(text) > limit:
        return [], [Problem(_too_long("document", len(text), limit))]
    title = unicodedata.normalize("NFC", " ".join(title.split()))
    return [ParsedDocument(title=title, text=text, format=fmt, metadata=metadata)], []


def parse_memories_file(
    path: Path, *, max_file_bytes: int, max_document_chars: int
) -> tuple[list[MemoryRecord], list[Problem]]:
    """A user's memories: JSONL rows `{id, text, created_at?, metadata?}`.

    `id` and `text` are required; `created_at` is ISO 8601 when given. A wrong row is a
    `Problem` with its line; the other rows are returned.
    """

    def memory(record: dict[str, Any], line: int, _ordinal: int) -> MemoryRecord:
        return MemoryRecord(
            id=str(_record_id(record, "id", required=True)),
            text=_record_text(record, "text", max_document_chars, "memory text"),
            created_at=parse_timestamp(record.get("created_at")),
            metadata=_record_metadata(record),
            line=line,
        )

    return _jsonl_records(_decode_json_file(path, max_file_bytes), memory)


def parse_conversation_file(
    path: Path, *, max_file_bytes: int, max_document_chars: int
) -> tuple[list[ConversationMessage], list[Problem]]:
    """One conversation session: JSONL rows `{role, content, created_at?}`.

    `role` is one of user, assistant, system, tool. Turns are numbered 1, 2, ... over the valid
    messages in file order. A wrong row is a `Problem` with its line.
    """
    turns = itertools.count(1)  # numbers only the messages that pass

    def message(record: dict[str, Any], line: int, _ordinal: int) -> ConversationMessage:
        role = record.get("role")
        if role is None:
            raise ValueError("missing 'role'")
        if not isinstance(role, str) or role.strip().lower() not in CONVERSATION_ROLES:
            allowed = ", ".join(sorted(CONVERSATION_ROLES))
            raise ValueError(f"'role' must be one of {allowed}, got {role!r}")
        content = _record_text(record, "content", max_document_chars, "message content")
        created_at = parse_timestamp(record.get("created_at"))
        return ConversationMessage(
            turn=next(turns),
            role=role.strip().lower(),
            content=content,
            created_at=created_at,
            line=line,
        )

    return _jsonl_records(_decode_json_file(path, max_file_bytes), message)
