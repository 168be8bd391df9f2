"""Plain text and Markdown files, and turning any file's bytes into clean text.

Contract:

- `decode_text_with_encoding` / `decode_text`: BOMs are honoured (UTF-8, UTF-16, UTF-32), then
  BOM-less UTF-16, then strict UTF-8, else a detected legacy encoding (Windows-1252 preferred
  for Western text). Binary data and bytes no encoding reads plausibly raise `FileRejected`.
  The result has no BOM but is not yet normalised.
- `clean_text`: valid Unicode (lone surrogates become U+FFFD, see `base.valid_unicode`), `\\n`
  newlines, no NUL/control characters or BOMs, NFC, no blank ends.
- `parse_text_file` (`txt`, `md`): one document; its title is the first `# Heading` of a
  Markdown file (outside fenced code), else the file's stem; its metadata names the encoding.
"""

import re
import unicodedata
from pathlib import Path

from memcity_pipeline.ingestion.parsing.base import (
    DocumentsResult,
    FileRejected,
    single_document,
    source_bytes,
    valid_unicode,
)

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
    """Valid Unicode, newlines as `\\n`, no NUL/control characters or BOMs, NFC, no blank ends."""
    text = valid_unicode(text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\v", "\n").replace("\f", "\n")
    text = _STRAY_CONTROLS.sub("", text).replace("\ufeff", "")
    return unicodedata.normalize("NFC", text).strip()


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


def parse_text_file(
    path: Path,
    fmt: str,
    *,
    max_file_bytes: int,
    max_document_chars: int,
    data: bytes | None = None,
) -> DocumentsResult:
    """The one document of a `txt` or `md` file (`fmt`); `FileRejected` when it is unusable.

    `data` is the file's bytes when the caller already read them (see `base.source_bytes`)."""
    data = source_bytes(path, data, max_file_bytes)
    raw, encoding = decode_text_with_encoding(data)
    text = clean_text(raw)
    if not text:
        raise FileRejected("empty file (only blank space)")
    title = (markdown_title(text) if fmt == "md" else None) or path.stem
    return single_document(text, title, fmt, {"encoding": encoding}, max_document_chars)
