"""The files `memcity query` is given, read as text or JSON, each within a bound checked before
it is read: `--custom-file` against `MEMCITY_MAX_CUSTOM_CONTEXT_CHARS`, `--system-prompt-file`
against `MAX_PROMPT_CHARS`. A file of more bytes than its limit in characters is refused unread
(a character is at least one byte, so a file within the limit always fits); what a file holds is
counted again, in characters, by the query's own checks. Every problem is an `RLMRequestError`
naming the option and the file (exit code 2).
"""

import json
from pathlib import Path
from typing import Any

from memcity_pipeline.rlm.config import RLMRequestError


def read_text_file(path: Path, option: str, max_chars: int, limit: str) -> str:
    """The text of the file given to `option`; RLMRequestError naming both when it cannot be
    read as UTF-8 text, or when it has more bytes than `max_chars` (checked before it is read;
    `limit` says where that bound comes from)."""
    try:
        size = path.stat().st_size
        if size > max_chars:
            raise RLMRequestError(
                f"{option} {path} is {size:,} bytes, over the limit of {max_chars:,} "
                f"characters ({limit})"
            )
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RLMRequestError(
            f"{option} {path}: not UTF-8 text (byte {exc.start} cannot be decoded)"
        ) from None
    except OSError as exc:
        raise RLMRequestError(f"{option} {path}: {exc.strerror or exc}") from None


def _json_value(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RLMRequestError(f"{where}: not valid JSON ({exc})") from None


def read_custom_file(path: Path, max_chars: int) -> str | list[Any]:
    """The custom context of a file: a `.json` file's string or list, a `.jsonl` file's lines
    (each parsed as JSON), anything else as text. RLMRequestError naming the file (and the
    line of a `.jsonl` file) when it is malformed, or naming the limit when the file has more
    bytes than `max_chars` (`MEMCITY_MAX_CUSTOM_CONTEXT_CHARS`)."""
    text = read_text_file(path, "--custom-file", max_chars, "MEMCITY_MAX_CUSTOM_CONTEXT_CHARS")
    if path.suffix == ".json":
        value = _json_value(text, f"--custom-file {path}")
        if not isinstance(value, str | list):
            raise RLMRequestError(
                f"--custom-file {path}: a custom context must be a JSON string or list, "
                f"not {type(value).__name__}"
            )
        return value
    if path.suffix == ".jsonl":
        return [
            _json_value(line, f"--custom-file {path}, line {number}")
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    return text
