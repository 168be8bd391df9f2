"""The Python 3.11 documentation as a retrieval corpus, with its development set of questions.

    apt-get install python3.11-doc
    python bench/python_docs_corpus.py        # pages and questions found

The pages are the HTML files of Debian's `python3.11-doc` package. `copy_to_landing` puts every
content page into one knowledge base at its path below the HTML root (the landing layout allows
files at any depth), so the question target `library/functools.html` is the document whose
`source_path` is `orgs/<org>/knowledge_bases/<kb>/library/functools.html` (`source_path`).
Left out: `_static/`, `_sources/`, `_images/`, `_downloads/`, the `includes/` fragment and the
top-level navigation pages (`index`, `contents`, `genindex*`, `py-modindex`, `search`, `download`).
"""

import json
import os
import shutil
import sys
from pathlib import Path

ORG = "pydocs"
KB = "python311"
QUESTIONS = Path(__file__).resolve().parent / "python_docs" / "questions.jsonl"
BY_NAME = Path(__file__).resolve().parent / "python_docs" / "by_name.jsonl"  # API names as queries
ROOTS = (Path("/usr/share/doc/python3.11/html"), Path("/usr/share/doc/python3.11-doc/html"))
ENV_ROOT = "PYTHON_DOCS_HTML"  # overrides ROOTS: an HTML root laid out like Debian's
_NAV_PAGES = {"index.html", "contents.html", "search.html", "py-modindex.html", "download.html"}


def docs_root() -> Path:
    """The installed HTML root of the Python 3.11 documentation."""
    override = os.environ.get(ENV_ROOT)
    for root in (Path(override),) if override else ROOTS:
        if (root / "library" / "functools.html").is_file():
            return root
    raise FileNotFoundError(
        f"Python 3.11 HTML documentation not found in {override or ', '.join(map(str, ROOTS))}:"
        f" install it with `apt-get install python3.11-doc` (or set {ENV_ROOT})"
    )


def is_content_page(rel: str) -> bool:
    """Whether a page (path relative to the HTML root, with `/`) belongs in the corpus."""
    parts = rel.split("/")
    if not rel.endswith(".html") or parts[0].startswith("_") or parts[0] == "includes":
        return False
    return len(parts) > 1 or not (rel in _NAV_PAGES or rel.startswith("genindex"))


def content_pages(root: Path | None = None) -> list[str]:
    """The corpus's pages, relative to the HTML root, sorted."""
    root = root or docs_root()
    rels = (p.relative_to(root).as_posix() for p in root.rglob("*.html"))
    return sorted(rel for rel in rels if is_content_page(rel))


def source_path(target: str, org: str = ORG, kb: str = KB) -> str:
    """The landing-relative `source_path` of the document a question target names."""
    return f"orgs/{org}/knowledge_bases/{kb}/{target}"


def copy_to_landing(landing: Path, org: str = ORG, kb: str = KB) -> int:
    """Copy every content page into `landing/orgs/<org>/knowledge_bases/<kb>/`, keeping its path
    below the HTML root and its mtime (so copying again leaves the knowledge base unchanged).
    Returns the number of pages."""
    root = docs_root()
    dest = landing / "orgs" / org / "knowledge_bases" / kb
    pages = content_pages(root)
    for rel in pages:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)
    return len(pages)


def load_questions(path: Path = QUESTIONS) -> list[dict]:
    """The development set (or `BY_NAME`, queries that name the API): `{"id", "question",
    "targets"}` per question, each target a content page relative to the HTML root. Raises
    ValueError when a target is missing or not a page."""
    root = docs_root()
    lines = path.read_text("utf-8").splitlines()
    questions = [json.loads(line) for line in lines if line.strip()]
    for q in questions:
        bad = [t for t in q["targets"] if not is_content_page(t) or not (root / t).is_file()]
        if bad or not q["targets"]:
            raise ValueError(f"{q['id']}: targets not among the corpus pages: {bad or 'none'}")
    return questions


if __name__ == "__main__":
    try:
        pages = content_pages()
    except FileNotFoundError as exc:  # not an error for `make bench`, which runs every script
        print(f"skipped: {exc}")
        sys.exit(0)
    try:
        questions = load_questions()
    except ValueError as exc:
        sys.exit(str(exc))
    targets = {t for q in questions for t in q["targets"]}
    print(f"{len(pages)} pages in {docs_root()}")
    print(f"{len(questions)} questions, {len(targets)} distinct target pages")
