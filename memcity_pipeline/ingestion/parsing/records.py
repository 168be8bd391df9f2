"""JSON records: the shared JSONL loop and field readers, user memories and conversations.

Contract:

- `decode_json_file` reads and decodes a JSON/JSONL file (see `text.decode_text`) keeping every
  line where it is, for line numbers; only line endings are normalised. A blank file raises
  `FileRejected`.
- `load_json` parses JSON text without raising for what it holds: a number Python cannot convert
  (over `sys.get_int_max_str_digits()` digits) and the `NaN`/`Infinity` constants are read as
  placeholders, so they cost at most their record (when a field it uses holds one), never the
  file; a field nobody reads is dropped whatever it holds.
- `clean_json` checks a value a record keeps (its metadata): valid Unicode in every string and
  key (lone surrogates become U+FFFD, see `base.valid_unicode`), finite numbers only, at most
  `MAX_JSON_DEPTH` levels of nesting; ValueError says what is wrong and where.
- `jsonl_records` builds one record per non-blank line; a line that is not JSON, not an object,
  or that the builder fails on (with any exception) is one `Problem` with its 1-based line, and
  the other lines are still returned.
- The field readers (`record_id`, `record_text`, `record_metadata`, `parse_timestamp`) clean what
  they return and raise `ValueError` with a reason a person reads; a text, id or metadata over
  its limit is refused (naming the limit and its setting), never truncated; timestamps are aware
  UTC (naive ones are taken as UTC).
- `parse_memories_file`: rows `{id, text, created_at?, metadata?}`.
- `parse_conversation_file`: rows `{role, content, created_at?}`, `role` one of
  `CONVERSATION_ROLES`; turns are numbered 1, 2, ... over the valid messages in file order.
- Both raise nothing but `FileRejected` (see `base.whole_file_errors`).
"""

import itertools
import json
import math
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from memcity_pipeline.ingestion.parsing.base import (
    ConversationMessage,
    FileRejected,
    MemoryRecord,
    Problem,
    source_bytes,
    too_long,
    valid_unicode,
    whole_file_errors,
)
from memcity_pipeline.ingestion.parsing.text import clean_text, decode_text

CONVERSATION_ROLES: frozenset[str] = frozenset({"user", "assistant", "system", "tool"})

T = TypeVar("T")  # a parsed record
MAX_JSON_DEPTH = 100  # levels of arrays and objects in one record (a fixed limit)


def decode_json_file(path: Path, max_file_bytes: int, data: bytes | None = None) -> str:
    """Read and decode a JSON/JSONL file, keeping every line where it is (for line numbers).

    `data` is the file's bytes when the caller already read them (see `base.source_bytes`).
    Only line endings are normalised here; each record's strings are cleaned one by one.
    """
    text = decode_text(source_bytes(path, data, max_file_bytes))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise FileRejected("empty file (only blank space)")
    return text


def type_name(value: Any) -> str:
    """The JSON name of a parsed value's type (`null`, `number`, `array`...), for reasons."""
    if value is None:
        return "null"
    if isinstance(value, _Unusable):
        return value.what
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def shown(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to about `limit` characters, to quote a wrong value in a reason."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Unusable:
    """A JSON number Python cannot hold (NaN, Infinity, too many digits); refused where read."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what  # as a type name: "NaN", "a number of 5,000 digits (...)"
        self.reason = reason


def _int(digits: str) -> int | _Unusable:
    try:
        return int(digits)
    except ValueError:  # over Python's limit of digits for int conversion
        count = len(digits.lstrip("-"))
        limit = sys.get_int_max_str_digits()
        what = (
            f"a number of {count:,} digits (over the {limit:,}-digit limit of Python's integers,"
            " PYTHONINTMAXSTRDIGITS)"
        )
        return _Unusable(what, what)


def _constant(name: str) -> _Unusable:
    return _Unusable(name, f"{name} is not a JSON number")


def load_json(text: str) -> Any:
    """`json.loads`, reading numbers Python cannot convert and NaN/Infinity as placeholders.

    Raises `json.JSONDecodeError` for text that is not JSON and RecursionError for nesting
    deeper than Python's parser goes; `clean_json` refuses what this lets through.
    """
    return json.loads(text, parse_int=_int, parse_constant=_constant)


def clean_json(value: Any, where: str = "", depth: int = 0) -> Any:
    """`value` with every string and key made valid Unicode; ValueError for a placeholder of
    `load_json`, a number out of range, or nesting deeper than `MAX_JSON_DEPTH`."""
    at = f" at {where}" if where else ""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep{at} (a fixed limit)")
    if isinstance(value, str):
        return valid_unicode(value)
    if isinstance(value, _Unusable):
        raise ValueError(value.reason + at)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"a number out of range{at}")
    if isinstance(value, list):
        return [clean_json(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {
            valid_unicode(k): clean_json(v, f"{where}.{_key(k)}" if where else _key(k), depth + 1)
            for k, v in value.items()
        }
    return value


def _key(key: str) -> str:
    """A key as a reason names it: valid Unicode, cut to 40 characters."""
    key = valid_unicode(key)
    return key if len(key) <= 40 else key[:37] + "..."


def _json_lines(text: str) -> Iterator[tuple[int, Any | Problem]]:
    """(1-based line, parsed value or Problem) for every non-blank line of a JSONL text."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, load_json(line)
        except json.JSONDecodeError as exc:
            yield number, Problem(f"invalid JSON: {exc.msg} (column {exc.colno})", number)
        except RecursionError:
            yield number, Problem("invalid JSON: nested too deeply", number)
        except Exception as exc:  # nothing of one line may cost the others
            yield number, Problem(f"invalid JSON: {type(exc).__name__}: {exc}"[:300], number)


def record_problem(exc: Exception) -> str:
    """The reason a record was refused: a ValueError's message, else the exception named."""
    if isinstance(exc, ValueError):
        return str(exc)[:300]
    return f"unexpected error: {type(exc).__name__}: {exc}"[:300]


def jsonl_records(
    text: str, build: Callable[[dict[str, Any], int, int], T]
) -> tuple[list[T], list[Problem]]:
    """Every JSONL line as `build(object, line, ordinal)`, and the problems of the others.

    `ordinal` counts non-blank lines from 0. A line that is not JSON, not an object, or that
    `build` fails on (with any exception) is one `Problem` with its line; the others are kept.
    """
    records: list[T] = []
    problems: list[Problem] = []
    for ordinal, (line, value) in enumerate(_json_lines(text)):
        if isinstance(value, Problem):
            problems.append(value)
            continue
        try:
            if not isinstance(value, dict):
                raise ValueError(f"expected a JSON object, got {type_name(value)}")
            records.append(build(value, line, ordinal))
        except Exception as exc:
            problems.append(Problem(record_problem(exc), line))
    return records, problems


# --------------------------------------------------------------------------- fields


def record_id(record: dict[str, Any], field: str, required: bool, limit: int) -> str | None:
    """A record's id as a string (numbers allowed), at most `limit` characters; ValueError says
    what is wrong."""
    value = record.get(field)
    if value is None:
        if required:
            raise ValueError(f"missing '{field}'")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"'{field}' must be a string, got {type_name(value)}")
    text = clean_text(str(value))
    if not text:
        raise ValueError(f"'{field}' is empty")
    if len(text) > limit:
        raise ValueError(too_long(f"'{field}'", len(text), limit))
    return text


def record_text(record: dict[str, Any], field: str, limit: int, what: str) -> str:
    """A record's required text field, cleaned; ValueError says what is wrong."""
    if field not in record or record[field] is None:
        raise ValueError(f"missing '{field}'")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"'{field}' must be a string, got {type_name(value)}")
    text = clean_text(value)
    if not text:
        raise ValueError(f"'{field}' is empty")
    if len(text) > limit:
        raise ValueError(too_long(what, len(text), limit))
    return text


def record_metadata(record: dict[str, Any], limit: int) -> dict[str, Any]:
    """A record's optional `metadata` object (`{}` when absent), checked by `clean_json`;
    ValueError when it is not an object or its JSON text is over `limit` characters."""
    value = record.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"'metadata' must be an object, got {type_name(value)}")
    value = clean_json(value, "metadata")
    size = len(json.dumps(value, ensure_ascii=False, allow_nan=False))
    if size > limit:
        raise ValueError(too_long("'metadata'", size, limit))
    return value


def parse_timestamp(value: Any) -> datetime | None:
    """An ISO 8601 date-time (or date) as aware UTC; naive values are taken as UTC.

    `None` gives `None`; anything else unreadable raises ValueError.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"'created_at' must be an ISO 8601 string, got {type_name(value)}")
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"'created_at' {shown(value)} is not an ISO 8601 date-time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is in the year 0 in UTC
        raise ValueError(f"'created_at' {shown(value)} is out of range in UTC") from None


# --------------------------------------------------------------------------- memories, conversations


def parse_memories_file(
    path: Path, *, max_file_bytes: int, max_document_chars: int, data: bytes | None = None
) -> tuple[list[MemoryRecord], list[Problem]]:
    """A user's memories: JSONL rows `{id, text, created_at?, metadata?}`.

    `id` and `text` are required; `created_at` is ISO 8601 when given. A wrong row is a
    `Problem` with its line; the other rows are returned. `data` is the file's bytes when the
    caller already read them.
    """

    def memory(record: dict[str, Any], line: int, _ordinal: int) -> MemoryRecord:
        return MemoryRecord(
            id=str(record_id(record, "id", required=True, limit=max_document_chars)),
            text=record_text(record, "text", max_document_chars, "memory text"),
            created_at=parse_timestamp(record.get("created_at")),
            metadata=record_metadata(record, max_document_chars),
            line=line,
        )

    with whole_file_errors("memories file"):
        return jsonl_records(decode_json_file(path, max_file_bytes, data), memory)


def parse_conversation_file(
    path: Path, *, max_file_bytes: int, max_document_chars: int, data: bytes | None = None
) -> tuple[list[ConversationMessage], list[Problem]]:
    """One conversation session: JSONL rows `{role, content, created_at?}`.

    `role` is one of user, assistant, system, tool. Turns are numbered 1, 2, ... over the valid
    messages in file order. A wrong row is a `Problem` with its line. `data` is the file's
    bytes when the caller already read them.
    """
    turns = itertools.count(1)  # numbers only the messages that pass

    def message(record: dict[str, Any], line: int, _ordinal: int) -> ConversationMessage:
        role = record.get("role")
        if role is None:
            raise ValueError("missing 'role'")
        if not isinstance(role, str) or role.strip().lower() not in CONVERSATION_ROLES:
            allowed = ", ".join(sorted(CONVERSATION_ROLES))
            raise ValueError(f"'role' must be one of {allowed}, got {shown(role)}")
        content = record_text(record, "content", max_document_chars, "message content")
        created_at = parse_timestamp(record.get("created_at"))
        return ConversationMessage(
            turn=next(turns),
            role=role.strip().lower(),
            content=content,
            created_at=created_at,
            line=line,
        )

    with whole_file_errors("conversation file"):
        return jsonl_records(decode_json_file(path, max_file_bytes, data), message)
