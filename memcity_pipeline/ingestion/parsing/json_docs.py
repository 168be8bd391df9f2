"""Documents given as JSON records: a `.json` file (one object or a list) or a `.jsonl` file.

Contract: every record is `{id?, title?, text, metadata?}`. `text` is required and cleaned,
refused (never truncated) over `max_document_chars` (as are an `id`, a title or a metadata over
it); `id` becomes `source_id`; a record without a title is named after the file's stem (`stem #n`
when the file holds several). A wrong record (whatever fails in it: see `records.jsonl_records`
and `records.load_json`) is a `Problem` (`record #n: ...` in a JSON list, with its line in
JSONL) and the others are still returned. A `.json` file that is not valid JSON, an empty list,
or neither an object nor a list raises `FileRejected`; nothing else is raised.
"""

import json
from pathlib import Path
from typing import Any

from memcity_pipeline.ingestion.parsing.base import (
    DocumentsResult,
    FileRejected,
    ParsedDocument,
    Problem,
    too_long,
    whole_file_errors,
)
from memcity_pipeline.ingestion.parsing.records import (
    decode_json_file,
    jsonl_records,
    load_json,
    record_id,
    record_metadata,
    record_problem,
    record_text,
    type_name,
)
from memcity_pipeline.ingestion.parsing.text import clean_text


def _record_title(record: dict[str, Any], limit: int) -> str | None:
    value = record.get("title")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"'title' must be a string, got {type_name(value)}")
    title = " ".join(clean_text(value).split())
    if len(title) > limit:
        raise ValueError(too_long("'title'", len(title), limit))
    return title or None


def _document_record(
    record: Any, *, stem: str, fmt: str, ordinal: int, line: int | None, limit: int, many: bool
) -> ParsedDocument:
    """One `{id?, title?, text, metadata?}` record as a document; ValueError when it is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type_name(record)}")
    text = record_text(record, "text", limit, "text")
    source_id = record_id(record, "id", required=False, limit=limit)
    title = _record_title(record, limit) or (f"{stem} #{ordinal + 1}" if many else stem)
    return ParsedDocument(
        title=title,
        text=text,
        format=fmt,
        metadata=record_metadata(record, limit),
        source_id=source_id,
        ordinal=ordinal,
        line=line,
    )


def _parse_json_documents(text: str, stem: str, limit: int) -> DocumentsResult:
    try:
        value = load_json(text)
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
        raise FileRejected(f"JSON must be an object or a list of objects, got {type_name(value)}")
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
        except Exception as exc:
            label = f"record #{ordinal + 1}: " if many else ""
            problems.append(Problem(f"{label}{record_problem(exc)}"))
    return docs, problems


def _parse_jsonl_documents(text: str, stem: str, limit: int) -> DocumentsResult:
    def document(record: dict[str, Any], line: int, ordinal: int) -> ParsedDocument:
        return _document_record(
            record, stem=stem, fmt="jsonl", ordinal=ordinal, line=line, limit=limit, many=True
        )

    return jsonl_records(text, document)


def parse_json_file(
    path: Path, *, max_file_bytes: int, max_document_chars: int, data: bytes | None = None
) -> DocumentsResult:
    """The documents of a `.json` file: one object, or a list of objects. `data` is the file's
    bytes when the caller already read them."""
    with whole_file_errors("JSON file"):
        text = decode_json_file(path, max_file_bytes, data)
        return _parse_json_documents(text, path.stem, max_document_chars)


def parse_jsonl_file(
    path: Path, *, max_file_bytes: int, max_document_chars: int, data: bytes | None = None
) -> DocumentsResult:
    """The documents of a `.jsonl` file: one object a line. `data` is the file's bytes when the
    caller already read them."""
    with whole_file_errors("JSONL file"):
        text = decode_json_file(path, max_file_bytes, data)
        return _parse_jsonl_documents(text, path.stem, max_document_chars)
