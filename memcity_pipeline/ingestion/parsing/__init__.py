"""Reading source files: documents, user memories and conversations, into plain records.

Two kinds of failure are kept apart:

- `FileRejected` (an exception): the whole file is unusable (unreadable, empty, too large,
  binary, undecodable, a corrupt PDF, a PDF without a text layer, an unsupported type, or a
  parser that failed on it). Its message is a short reason meant for a person. The `parse_*`
  functions raise nothing else.
- `Problem` (a value): one record of a multi-record file is wrong (a malformed JSONL line, a
  missing field, a wrong type, a text over the size limit, anything that failed in it). The
  other records are still returned.

Every text returned is valid Unicode (a lone surrogate, which JSON's `\\ud800` escapes can
give, becomes U+FFFD), so it encodes as UTF-8, with `\\n` newlines, no NUL or other stray
control characters, and no leading or trailing blank space; metadata is JSON-serialisable
(finite numbers, at most `MAX_JSON_DEPTH` levels). Nothing is ever silently truncated: a text
over `max_document_chars` is a `Problem`, naming the limit and its setting.

Every `parse_*_file` takes `data`, the file's bytes when the caller has already read them (with
`read_file_checked`), so that a file's hash and its records come from the same bytes.

One module per format, each behind `parse_document_file` (which picks it by suffix):

- `base`: the records returned, the two failures, reading a file's bytes under the size limit;
- `text`: decoding bytes into clean text (encodings, BOMs), `.txt` and `.md`;
- `html`: `.html` / `.htm`; `pdf`: `.pdf` (its text layer);
- `json_docs`: documents as `.json` / `.jsonl` records;
- `records`: the JSONL record loop and field readers, memories and conversation sessions.

Callers use this package's names (`parsing.parse_document_file`, ...), never the modules'.
"""

from pathlib import Path

from memcity_pipeline.ingestion.parsing.base import (
    ConversationMessage,
    DocumentsResult,
    FileBytes,
    FileRejected,
    MemoryRecord,
    ParsedDocument,
    Problem,
    read_bytes_checked,
    read_file_checked,
    valid_unicode,
    whole_file_errors,
)
from memcity_pipeline.ingestion.parsing.html import html_to_text, parse_html_file
from memcity_pipeline.ingestion.parsing.json_docs import parse_json_file, parse_jsonl_file
from memcity_pipeline.ingestion.parsing.pdf import parse_pdf_file, pdf_to_text
from memcity_pipeline.ingestion.parsing.records import (
    CONVERSATION_ROLES,
    MAX_JSON_DEPTH,
    parse_conversation_file,
    parse_memories_file,
    parse_timestamp,
)
from memcity_pipeline.ingestion.parsing.text import (
    clean_text,
    decode_text,
    decode_text_with_encoding,
    markdown_title,
    parse_text_file,
)

__all__ = [
    "CONVERSATION_ROLES",
    "MAX_JSON_DEPTH",
    "SUPPORTED_DOCUMENT_SUFFIXES",
    "ConversationMessage",
    "FileBytes",
    "FileRejected",
    "MemoryRecord",
    "ParsedDocument",
    "Problem",
    "clean_text",
    "decode_text",
    "decode_text_with_encoding",
    "html_to_text",
    "markdown_title",
    "parse_conversation_file",
    "parse_document_file",
    "parse_memories_file",
    "parse_timestamp",
    "pdf_to_text",
    "read_bytes_checked",
    "read_file_checked",
    "valid_unicode",
]

SUPPORTED_DOCUMENT_SUFFIXES: frozenset[str] = frozenset(
    {".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".json", ".jsonl"}
)

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


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_DOCUMENT_SUFFIXES:
        what = f"'{suffix}'" if suffix else "(no extension)"
        supported = ", ".join(sorted(SUPPORTED_DOCUMENT_SUFFIXES))
        raise FileRejected(f"unsupported file type {what} (supported: {supported})")
    return _FORMAT_BY_SUFFIX[suffix]


def parse_document_file(
    path: Path, *, max_file_bytes: int, max_document_chars: int, data: bytes | None = None
) -> DocumentsResult:
    """The documents of one knowledge-base file, and the problems of its records.

    md/txt/html/pdf files hold one document; a `.json` file one object or a list of objects;
    a `.jsonl` file one object a line. Raises `FileRejected` when the whole file is unusable
    (and nothing else). `data` is the file's bytes when the caller already read them.
    """
    fmt = _check_suffix(path)
    kw = {"max_file_bytes": max_file_bytes, "max_document_chars": max_document_chars, "data": data}
    with whole_file_errors(f"{fmt.upper()} file"):
        if fmt == "pdf":
            return parse_pdf_file(path, **kw)
        if fmt == "json":
            return parse_json_file(path, **kw)
        if fmt == "jsonl":
            return parse_jsonl_file(path, **kw)
        if fmt == "html":
            return parse_html_file(path, **kw)
        return parse_text_file(path, fmt, **kw)
