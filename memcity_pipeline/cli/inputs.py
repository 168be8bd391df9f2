"""The files `memcity query` is given (`--custom-file`, `--system-prompt-file`), read as text or
JSON. Every problem is an `RLMRequestError` naming the option and the file (exit code 2).
"""

import json
from pathlib import Path
from typing import Any

from memcity_pipeline.rlm.config import RLMRequestError


def read_text_file(path: Path, option: str) -> str:
    """The text of the file given to `option`; RLMRequestError naming both when it cannot be
    read as UTF-8 text."""
    try:
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


def read_custom_file(path: Path) -> str | list[Any]:
    """The custom context of a file: a `.json` file's string or list, a `.jsonl` file's lines
    (each parsed as JSON), anything else as text. RLMRequestError naming the file (and the
    line of a `.jsonl` file) when it is malformed."""
    text = read_text_file(path, "--custom-file")
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
