"""JSON records: the shared JSONL loop and field readers, user memories and conversations.

Contract:

- `decode_json_file` reads and decodes a JSON/JSONL file (see `text.decode_text`) keeping every
  line where it is, for line numbers; only line endings are normalised. A blank file raises
  `FileRejected`.
- `jsonl_records` builds one record per non-blank line; a line that is not JSON, not an object,
  or that the builder rejects (`ValueError`) is a `Problem` with its 1-based line, and the other
  lines are still returned.
- The field readers (`record_id`, `record_text`, `record_metadata`, `parse_timestamp`) clean what
  they return and raise `ValueError` with a reason a person reads; a text over its limit is
  refused, never truncated; timestamps are aware UTC (naive ones are taken as UTC).
- `parse_memories_file`: rows `{id, text, created_at?, metadata?}`.
- `parse_conversation_file`: rows `{role, content, created_at?}`, `role` one of
  `CONVERSATION_ROLES`; turns are numbered 1, 2, ... over the valid messages in file order.
"""

import itertools
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from memcity_pipeline.ingestion.parsing.base import (
    ConversationMessage,
    FileRejected,
    MemoryRecord,
    Problem,
    read_bytes_checked,
    too_long,
)
from memcity_pipeline.ingestion.parsing.text import clean_text, decode_text

CONVERSATION_ROLES: frozenset[str] = frozenset({"user", "assistant", "system", "tool"})

T = TypeVar("T")  # a parsed record


def decode_json_file(path: Path, max_file_bytes: int) -> str:
    """Read and decode a JSON/JSONL file, keeping every line where it is (for line numbers).

    Only line endings are normalised here; each record's strings are cleaned one by one.
    """
    text = decode_text(read_bytes_checked(path, max_file_bytes=max_file_bytes))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise FileRejected("empty file (only blank space)")
    return text


def type_name(value: Any) -> str:
    """The JSON name of a parsed value's type (`null`, `number`, `array`...), for reasons."""
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


def jsonl_records(
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
                raise ValueError(f"expected a JSON object, got {type_name(value)}")
            records.append(build(value, line, ordinal))
        except ValueError as exc:
            problems.append(Problem(str(exc), line))
    return records, problems


# --------------------------------------------------------------------------- fields


def record_id(record: dict[str, Any], field: str, required: bool) -> str | None:
    """A record's id as a string (numbers allowed); ValueError says what is wrong."""
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


def record_metadata(record: dict[str, Any]) -> dict[str, Any]:
    """A record's optional `metadata` object (`{}` when absent); ValueError when not an object."""
    value = record.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"'metadata' must be an object, got {type_name(value)}")
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
        raise ValueError(f"'created_at' {value!r} is not an ISO 8601 date-time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


# --------------------------------------------------------------------------- memories, conversations


def parse_memories_file(
    path: Path, *, max_file_bytes: int, max_document_chars: int
) -> tuple[list[MemoryRecord], list[Problem]]:
    """A user's memories: JSONL rows `{id, text, created_at?, metadata?}`.

    `id` and `text` are required; `created_at` is ISO 8601 when given. A wrong row is a
    `Problem` with its line; the other rows are returned.
    """

    def memory(record: dict[str, Any], line: int, _ordinal: int) -> MemoryRecord:
        return MemoryRecord(
            id=str(record_id(record, "id", required=True)),
            text=record_text(record, "text", max_document_chars, "memory text"),
            created_at=parse_timestamp(record.get("created_at")),
            metadata=record_metadata(record),
            line=line,
        )

    return jsonl_records(decode_json_file(path, max_file_bytes), memory)


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
        content = record_text(record, "content", max_document_chars, "message content")
        created_at = parse_timestamp(record.get("created_at"))
        return ConversationMessage(
            turn=next(turns),
            role=role.strip().lower(),
            content=content,
            created_at=created_at,
            line=line,
        )

    return jsonl_records(decode_json_file(path, max_file_bytes), message)
