"""PDF files: the text layer, page by page.

Contract:

- `pdf_to_text` gives (text, metadata, title): each page's text cleaned (see `text.clean_text`)
  and pages joined by a blank line; metadata `{page_count, pages_with_text}`; the title from the
  PDF's info dictionary, if any. It raises `FileRejected` for a file that is not a PDF, is
  truncated (no `%%EOF` in its last KB), corrupt, encrypted with a password, or has no text
  layer (scanned images are not read). Given `max_chars`, it stops at the first page that takes
  the text over it and refuses the file, naming the limit and its setting (a small PDF can hold
  far more text than its size suggests).
- `parse_pdf_file`: one document, titled by the PDF's title, else the file's stem.
"""

import io
import logging
from pathlib import Path
from typing import Any

from memcity_pipeline.ingestion.parsing.base import (
    ENV_MAX_DOCUMENT_CHARS,
    DocumentsResult,
    FileRejected,
    single_document,
    source_bytes,
    valid_unicode,
)
from memcity_pipeline.ingestion.parsing.text import clean_text


def pdf_to_text(
    data: bytes, max_chars: int | None = None
) -> tuple[str, dict[str, Any], str | None]:
    """(text, metadata, title) from a PDF's text layer; pages joined by a blank line.

    Raises `FileRejected` for a file that is not a PDF, truncated (no `%%EOF` in its last KB,
    trailing blank space aside), corrupt, encrypted with a password, without any text, or (given
    `max_chars`) whose text runs over `max_chars` (extraction stops at that page).
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
        cleaned = _page_texts(reader.pages, max_chars)
        info = reader.metadata
        raw_title = info.title if info is not None else None
    except FileRejected:
        raise
    except FileNotDecryptedError:
        raise FileRejected("encrypted PDF (needs a password)") from None
    except Exception as exc:  # pypdf raises many kinds of errors on broken files
        raise FileRejected(f"corrupt PDF ({type(exc).__name__}: {exc})"[:300]) from None
    text = "\n\n".join(p for p in cleaned if p)
    if not text:
        raise FileRejected("PDF has no text layer (scanned images are not read)")
    title = " ".join(valid_unicode(str(raw_title)).split()) if raw_title else None
    meta = {"page_count": len(cleaned), "pages_with_text": sum(1 for p in cleaned if p)}
    return text, meta, title or None


def _page_texts(pages: Any, max_chars: int | None) -> list[str]:
    """Each page's clean text, stopping (with `FileRejected`) once they hold over `max_chars`."""
    texts: list[str] = []
    total = 0
    for page in pages:
        texts.append(clean_text(page.extract_text() or ""))
        total += len(texts[-1]) + (2 if total and texts[-1] else 0)  # pages join by a blank line
        if max_chars is not None and total > max_chars:
            raise FileRejected(
                f"document has {total:,} characters in its first {len(texts)} of {len(pages)}"
                f" pages, over the {max_chars:,} limit ({ENV_MAX_DOCUMENT_CHARS})"
            )
    return texts


def parse_pdf_file(
    path: Path, *, max_file_bytes: int, max_document_chars: int, data: bytes | None = None
) -> DocumentsResult:
    """The one document of a PDF; `FileRejected` when it is unusable.

    `data` is the file's bytes when the caller already read them (see `base.source_bytes`)."""
    data = source_bytes(path, data, max_file_bytes)
    text, metadata, title = pdf_to_text(data, max_document_chars)
    return single_document(text, title or path.stem, "pdf", metadata, max_document_chars)
