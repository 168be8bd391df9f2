"""What every parser shares: the records it returns, its two kinds of failure, reading bytes.

Contract:

- `FileRejected` is raised when a whole file is unusable; `str(exc)` is a short reason for a
  person. `Problem` is returned for one wrong record of a multi-record file.
- `read_file_checked` returns a regular, non-empty file's bytes (with the size and mtime of the
  file they were read from), never more than `max_file_bytes` (checked before and during the
  read), and raises `FileRejected` otherwise. A special file (pipe, socket, device, directory) is
  never opened: it is refused from its stat, and a file swapped for one between that stat and
  the open is opened without blocking (`O_NONBLOCK`) and refused from the descriptor's own stat.
- `source_bytes` gives a parser the bytes a caller already read (so a file's hash and its
  records come from the same bytes), under the same limits, or reads the file itself.
- `whole_file_errors` turns any other exception of a parser into `FileRejected` naming it: a
  parser that crashes on a file refuses that file, and its caller never sees anything else.
- `valid_unicode`: a lone surrogate (half of a UTF-16 pair, which JSON's `\\ud800` escapes give
  but UTF-8 cannot hold) becomes U+FFFD, the replacement character, as a decoder does with an
  invalid byte; every text a parser returns goes through it.
- `single_document` gives a one-document file's result: an over-long text is a `Problem`, never
  truncated; the title is valid Unicode, NFC, with its blank space collapsed.
"""

import os
import re
import stat
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ENV_MAX_FILE_BYTES = "MEMCITY_MAX_FILE_BYTES"
ENV_MAX_DOCUMENT_CHARS = "MEMCITY_MAX_DOCUMENT_CHARS"


# Lone surrogates: Python text can hold them (JSON's `\ud800`), UTF-8 cannot.
_SURROGATES = re.compile("[\ud800-\udfff]")


def valid_unicode(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD, so that it encodes as UTF-8."""
    return _SURROGATES.sub("\ufffd", text)


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
    text: str  # clean text (see the package docstring)
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


DocumentsResult = tuple[list[ParsedDocument], list[Problem]]


def too_long(what: str, length: int, limit: int) -> str:
    """Why a text of `length` characters is refused under `limit`."""
    return f"{what} is {length:,} characters, over the {limit:,} limit ({ENV_MAX_DOCUMENT_CHARS})"


def single_document(
    text: str, title: str, fmt: str, metadata: dict[str, Any], limit: int
) -> DocumentsResult:
    """A one-document file's result; an over-long document is a problem, never truncated."""
    if len(text) > limit:
        return [], [Problem(too_long("document", len(text), limit))]
    title = unicodedata.normalize("NFC", " ".join(valid_unicode(title).split()))
    return [ParsedDocument(title=title, text=text, format=fmt, metadata=metadata)], []


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
    return f"file is {shown}, over the {cap} limit ({ENV_MAX_FILE_BYTES})"


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, for a reason: `a named pipe`, `a device`..."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a plain file"


@dataclass(frozen=True)
class FileBytes:
    """A file's bytes and the size and mtime its open descriptor had when they were read."""

    data: bytes
    size: int
    mtime_ns: int


_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def read_file_checked(path: Path, *, max_file_bytes: int) -> FileBytes:
    """The bytes of `path`, refusing what is missing, not a regular file, too large or empty.

    The size is checked before reading, and the read itself never takes more than
    `max_file_bytes + 1` bytes, so a file that grows meanwhile is still refused. Special files
    (pipes, sockets, devices, directories) are refused without being opened; one swapped in
    after that check is opened without blocking and refused from its descriptor's stat.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileRejected("file not found") from None
    except OSError as exc:
        raise FileRejected(f"unreadable file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileRejected(f"not a regular file ({file_kind(st.st_mode)})")
    if st.st_size > max_file_bytes:
        raise FileRejected(_size_reason(st.st_size, max_file_bytes))
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise FileRejected("file not found") from None
    except OSError as exc:
        raise FileRejected(f"unreadable file: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped for a special file since the stat above
            raise FileRejected(f"not a regular file ({file_kind(st.st_mode)})")
        if st.st_size > max_file_bytes:
            raise FileRejected(_size_reason(st.st_size, max_file_bytes))
        with open(fd, "rb", closefd=False) as fh:
            data = fh.read(max_file_bytes + 1)
    except OSError as exc:
        raise FileRejected(f"unreadable file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return FileBytes(_checked(data, max_file_bytes), st.st_size, st.st_mtime_ns)


def _checked(data: bytes, max_file_bytes: int) -> bytes:
    if len(data) > max_file_bytes:
        raise FileRejected(_size_reason(len(data), max_file_bytes))
    if not data:
        raise FileRejected("empty file")
    return data


def read_bytes_checked(path: Path, *, max_file_bytes: int) -> bytes:
    """The bytes of `path` under the same checks as `read_file_checked`."""
    return read_file_checked(path, max_file_bytes=max_file_bytes).data


def source_bytes(path: Path, data: bytes | None, max_file_bytes: int) -> bytes:
    """`data` (the file's bytes, already read by the caller) under the file limits, or else the
    bytes of `path` (`read_bytes_checked`)."""
    if data is None:
        return read_bytes_checked(path, max_file_bytes=max_file_bytes)
    return _checked(data, max_file_bytes)


@contextmanager
def whole_file_errors(what: str) -> Iterator[None]:
    """Let `FileRejected` through; turn any other exception into `FileRejected` naming it."""
    try:
        yield
    except FileRejected:
        raise
    except RecursionError:
        raise FileRejected(f"{what} is nested too deeply to read") from None
    except Exception as exc:
        raise FileRejected(
            f"{what} could not be read ({type(exc).__name__}: {exc})"[:300]
        ) from None
