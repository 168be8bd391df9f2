"""HTML pages (`.html`, `.htm`) as Markdown-like text.

Contract:

- `html_to_text` gives (title, text): the title is `<title>`, else the first `<h1>`; headings
  become `#` headings, paragraphs are separated by blank lines, list items become `- ` lines
  (nested lists indented), table rows become cells joined by ` | `, `<br>` a newline; scripts,
  styles, navigation and the head are dropped. The text is clean (see `text.clean_text`).
- `parse_html_file`: one document, decoded like a text file (its metadata names the
  encoding); a page without text raises `FileRejected`.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memcity_pipeline.ingestion.parsing.base import (
    DocumentsResult,
    FileRejected,
    single_document,
    source_bytes,
)
from memcity_pipeline.ingestion.parsing.text import clean_text, decode_text_with_encoding

_DROPPED_TAGS = ("script", "style", "nav", "head", "noscript", "template", "svg", "iframe")
_HEADINGS = {f"h{n}": n for n in range(1, 7)}
_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "center", "dd", "details", "dialog",
        "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "header",
        "hgroup", "hr", "html", "li", "main", "ol", "p", "pre", "section", "summary", "table",
        "ul", "caption", "tbody", "thead", "tfoot", "tr", "td", "th",
    }
)  # fmt: skip
_LINE_BREAK = "\ue000"  # a private-use character standing for <br> while whitespace is collapsed


def _collapse(text: str) -> str:
    """Whitespace runs become one space, `<br>` marks become newlines."""
    lines = (" ".join(part.split()) for part in text.split(_LINE_BREAK))
    return "\n".join(line for line in lines if line)


def _inline_text(node: Any) -> str:
    from bs4 import Tag

    if isinstance(node, Tag):
        return node.get_text()
    return str(node)


def _html_blocks(node: Any, depth: int = 0) -> Iterator[str]:
    """Markdown-ish blocks of an element's children: headings, paragraphs, lists, tables."""
    from bs4 import Comment, Doctype, NavigableString, Tag

    run: list[str] = []

    def flush() -> Iterator[str]:
        text = _collapse("".join(run))
        run.clear()
        if text:
            yield text

    for child in node.children:
        if isinstance(child, (Comment, Doctype)):
            continue
        if isinstance(child, NavigableString):
            run.append(str(child))
            continue
        if not isinstance(child, Tag):
            continue
        name = child.name.lower()
        if name not in _HEADINGS and name not in _BLOCK_TAGS:
            run.append(_inline_text(child))
            continue
        yield from flush()
        if name in _HEADINGS:
            text = _collapse(child.get_text()).replace("\n", " ")
            if text:
                yield "#" * _HEADINGS[name] + " " + text
        elif name in ("ul", "ol"):
            items = list(_html_list(child, depth))
            if items:
                yield "\n".join(items)
        elif name == "table":
            yield from _html_table(child)
        elif name == "pre":
            text = child.get_text().replace(_LINE_BREAK, "\n").strip("\n")
            if text.strip():
                yield text
        elif name == "hr":
            continue
        else:
            yield from _html_blocks(child, depth)
    yield from flush()


def _html_list(node: Any, depth: int) -> Iterator[str]:
    """`- item` lines of a list; nested lists are indented by two spaces a level."""
    from bs4 import Tag

    indent = "  " * depth
    for item in node.find_all("li", recursive=False):
        nested = [c for c in item.children if isinstance(c, Tag) and c.name in ("ul", "ol")]
        for sub in nested:
            sub.extract()
        text = " ".join(_collapse(item.get_text()).split("\n"))
        if text:
            yield f"{indent}- {text}"
        for sub in nested:
            yield from _html_list(sub, depth + 1)


def _html_table(table: Any) -> Iterator[str]:
    """A table as one block: each row's cells joined by ` | `; a caption becomes a paragraph."""
    caption = table.find("caption")
    if caption is not None:
        text = _collapse(caption.get_text()).replace("\n", " ")
        caption.extract()
        if text:
            yield text
    rows = []
    for tr in table.find_all("tr"):
        cells = [
            " ".join(_collapse(cell.get_text()).split("\n"))
            for cell in tr.find_all(["td", "th"], recursive=False)
        ]
        if any(cells):
            rows.append(" | ".join(cells))
    if rows:
        yield "\n".join(rows)


def html_to_text(html: str) -> tuple[str | None, str]:
    """(title, markdown-like text) of an HTML page.

    The title is `<title>`, else the first `<h1>`. Headings become `#` headings, paragraphs are
    separated by blank lines, list items become `- ` lines, table rows become cells joined by
    ` | `; scripts, styles, navigation and the head are dropped.
    """
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    title = None
    if soup.title is not None:
        title = " ".join(soup.title.get_text().split()) or None
    if title is None:
        h1 = soup.find("h1")
        if h1 is not None:
            title = " ".join(h1.get_text().split()) or None
    for tag in soup.find_all(_DROPPED_TAGS):
        tag.decompose()
    for br in soup.find_all("br"):
        br.replace_with(_LINE_BREAK)
    text = "\n\n".join(_html_blocks(soup))
    return title, clean_text(text.replace(_LINE_BREAK, "\n"))


def parse_html_file(
    path: Path, *, max_file_bytes: int, max_document_chars: int, data: bytes | None = None
) -> DocumentsResult:
    """The one document of an HTML page; `FileRejected` when it is unusable or has no text.

    `data` is the file's bytes when the caller already read them (see `base.source_bytes`)."""
    data = source_bytes(path, data, max_file_bytes)
    raw, encoding = decode_text_with_encoding(data)
    html_title, text = html_to_text(raw)
    if not text:
        raise FileRejected("HTML page has no text")
    return single_document(
        text, html_title or path.stem, "html", {"encoding": encoding}, max_document_chars
    )
