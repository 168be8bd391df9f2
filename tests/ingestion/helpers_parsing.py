"""Inputs for parsing tests: the bundled sample corpus and PDFs derived from its press release.

PDF fixtures come from the corpus PDF (a truncated copy, a copy without metadata) or from
pypdf's writer (a page without text), so no PDF-authoring library is needed at test time.
"""

import io
import os
import threading
import time
from pathlib import Path

from pypdf import PdfWriter

from memcity_pipeline.cli.runner import sample_corpus_dir

MAIN_ORG = "brambleway"
MAIN_KB = "company_docs"
OTHER_ORG = "saltmarsh"


def corpus_root() -> Path:
    """The bundled sample corpus folder (holds `orgs/`, `eval/` and README.md)."""
    return sample_corpus_dir()


def main_kb_dir() -> Path:
    """The main organisation's knowledge-base folder."""
    return corpus_root() / "orgs" / MAIN_ORG / "knowledge_bases" / MAIN_KB


def sample_pdf_bytes() -> bytes:
    """The corpus's press-release PDF (3 pages, a text layer, a metadata title)."""
    return (main_kb_dir() / "press" / "swarmwatch-launch-press-release.pdf").read_bytes()


def truncated_pdf_bytes() -> bytes:
    """The first half of the sample PDF, as left by an interrupted upload."""
    data = sample_pdf_bytes()
    return data[: len(data) // 2]


def untitled_pdf_bytes() -> bytes:
    """The sample PDF rewritten without its document-information dictionary (no title)."""
    writer = PdfWriter(clone_from=io.BytesIO(sample_pdf_bytes()))
    writer.metadata = None
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def textless_pdf_bytes(pages: int = 2) -> bytes:
    """A valid PDF whose pages carry no text at all (like a scan without OCR)."""
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(width=595, height=842)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def write(folder: Path, name: str, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write `data` (text in `encoding`, or raw bytes) to `folder/name`, creating folders."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode(encoding))
    return path


def unblock_fifo_later(
    path: Path, after_s: float = 3.0, give_up_s: float = 10.0
) -> threading.Thread:
    """Open and close the FIFO's write end once a reader appears, so a reader never hangs.

    A parser that wrongly opens a FIFO blocks until a writer shows up; this thread plays that
    writer (after `after_s`), so such a parser returns (with no data) and the test fails
    instead of hanging.
    """

    def run() -> None:
        time.sleep(after_s)
        deadline = time.monotonic() + give_up_s
        while time.monotonic() < deadline:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody is reading; nothing to unblock yet
                time.sleep(0.1)
                continue
            os.close(fd)
            return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
