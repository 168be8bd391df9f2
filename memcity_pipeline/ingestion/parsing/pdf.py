"""PDF files: the text layer, page by page.

Contract:

- `pdf_to_text` gives (text, metadata, title): each page's text cleaned (see `text.clean_text`)
  and pages joined by a blank line; metadata `{page_count, pages_with_text}`; the title from the
  PDF's info dictionary, if any. It raises `FileRejected` for a file that is not a PDF, is
  truncated (no `%%EOF` in its last KB), corrupt, encrypted with a password, or has no text
  layer (scanned images are not read).
- `parse_pdf_file`: one document, titled by the PDF's title, else the file's stem.
"""

import io
import logging
from pathlib import Path
from typing import Any

from memcity_pipeline.ingestion.parsing.base import (
    DocumentsResult,
    FileRejected,
    read_bytes_checked,
    single_document,
)
from memcity_pipeline.ingestion.parsing.text import clean_text


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


def parse_pdf_file(path: Path, *, max_file_bytes: int, max_document_chars: int) -> DocumentsResult:
    """The one document of a PDF; `FileRejected` when it is unusable."""
    data = read_bytes_checked(path, max_file_bytes=max_file_bytes)
    text, metadata, title = pdf_to_text(data)
    return single_document(text, title or path.stem, "pdf", metadata, max_document_chars)
