"""Phase 1 of enrichment: a document's summary, entities, relationships and sections, by an LLM.

The LLM names each section by its title and the first words of its text; offsets are found in
the document here (LLMs are poor at counting characters). A document longer than the model's
window is read by a `LongReader` when one is given (the RLM engine: the document is the
`context` of a sandbox session), and otherwise, or when that read fails, in windows whose results
are merged: entities de-duplicated by name and alias, sections shifted to document offsets,
window summaries combined by one more call.
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from memcity_pipeline.enrichment.chunking import (
    Section,
    chunk_document,
    heading_sections,
    normalise_sections,
)
from memcity_pipeline.llm.schema import ask_for_every_field, items, text
from memcity_pipeline.llm.usage import Usage

SUMMARY_MAX_CHARS = 2000


class EntityOut(BaseModel):
    model_config = ConfigDict(json_schema_extra=ask_for_every_field)

    name: str = text(40)
    type: str = text(20, default="other")
    aliases: list[str] = items(2, item_chars=40)
    description: str = text(80, default="")


class RelationshipOut(BaseModel):
    source: str = text(40)
    relation: str = text(30)
    target: str = text(40)


class SectionOut(BaseModel):
    title: str = text(60)
    starts_with: str = text(60, "the first 5-12 words of the section, copied exactly")


class DocumentStructureOut(BaseModel):
    """What the LLM returns for a document (or one window of it); bounded (`llm.schema`)."""

    model_config = ConfigDict(json_schema_extra=ask_for_every_field)

    summary: str = text(600)
    entities: list[EntityOut] = items(8)
    relationships: list[RelationshipOut] = items(5)
    sections: list[SectionOut] = items(10)


class SummaryOut(BaseModel):
    summary: str = text(600)


@dataclass
class DocumentStructure:
    """Phase 1's result for one document, in document offsets."""

    summary: str
    entities: list[EntityOut]
    relationships: list[RelationshipOut]
    sections: list[Section]
    method: str  # llm | llm-rlm | llm-windowed | headings
    usage: Usage = field(default_factory=Usage)
    notes: list[str] = field(default_factory=list)


STRUCTURE_SYSTEM = (
    "You analyse one document for a search index. Reply with JSON only, matching the schema. "
    "summary: at most 5 sentences on what the document says. entities: people, organisations, "
    "products, places, dates and other named things, each with a type, aliases used in the text "
    "and a short description. relationships: facts linking two entities (source, relation, "
    "target). sections: the document's logical sections in order, each with a short title and "
    "starts_with = the first words of that section copied exactly from the text."
)

MERGE_SUMMARY_SYSTEM = (
    "You combine partial summaries of consecutive parts of one document into one summary of at "
    'most 5 sentences. Reply with JSON only: {"summary": "..."}.'
)


class StructuredCall(Protocol):
    """One structured LLM call: (messages, schema) -> (the parsed answer, the call's usage).

    `accept` is the caller's verdict on a parsed answer: one it refuses is not cached, so that a
    later retry asks the model again instead of getting the same answer back."""

    def __call__(
        self,
        messages: list[dict[str, str]],
        schema: type[BaseModel],
        accept: Callable[[BaseModel], bool] | None = None,
    ) -> tuple[BaseModel, Usage]: ...


@dataclass
class LongRead:
    """What a `LongReader` made of a whole long document (`parsed` None: it failed, see `note`)."""

    parsed: DocumentStructureOut | None
    note: str
    usage: Usage = field(default_factory=Usage)


# (title, text) -> LongRead; reads a document longer than the window in one piece.
LongReader = Callable[[str, str], LongRead]


def long_document_task(title: str, chars: int) -> str:
    """The task given to the RLM engine for a document longer than the model's window."""
    return (
        f"`context` is the whole text of one document titled {title!r} ({chars:,} characters), "
        "too long to read in one call. Build its structure for a search index: summary (at most "
        "5 sentences on what the whole document says); entities (people, organisations, "
        "products, places, dates and other named things: name, type, aliases used in the text, "
        "a short description); relationships (facts linking two entities: source, relation, "
        "target); sections (the document's logical sections in order: a short title, and "
        "starts_with = the first 5-12 words of the section copied exactly from the text; keep "
        "only those for which `starts_with in context` is true). Split the document into parts "
        "(at headings where it has them), ask llm_query_batched for each part's summary, "
        "entities and relationships as JSON, and merge the answers in code."
    )


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().lower()


def locate_sections(text: str, found: Sequence[SectionOut], offset: int = 0) -> list[Section]:
    """Turn titled section starts into offsets by finding `starts_with` (or the title) in order."""
    starts: list[tuple[int, str]] = []
    pos = 0
    for sec in found:
        idx = _find_loose(text, sec.starts_with, pos)
        if idx < 0:
            idx = _find_loose(text, sec.title, pos)
        if idx < 0:
            continue
        # Back up to the start of a heading line that holds the title, if there is one.
        line_start = text.rfind("\n", 0, idx) + 1
        if text[line_start:idx].strip("# \t") == "":
            idx = line_start
        starts.append((idx, sec.title.strip()[:200] or "Section"))
        pos = idx + 1
    sections = [
        Section(
            title, offset + s, offset + (starts[i + 1][0] if i + 1 < len(starts) else len(text))
        )
        for i, (s, title) in enumerate(starts)
    ]
    return sections


def _find_loose(text: str, needle: str, start: int) -> int:
    """Index of `needle` in `text` from `start`, ignoring case and runs of white space."""
    words = needle.split()
    if not words:
        return -1
    pattern = r"\s+".join(re.escape(w) for w in words[:12])
    match = re.compile(pattern, re.IGNORECASE).search(text, start)
    return match.start() if match else -1


def merge_entities(groups: Sequence[Sequence[EntityOut]]) -> list[EntityOut]:
    """Entities of several windows, de-duplicated by name and alias (case and space-insensitive)."""
    merged: list[EntityOut] = []
    index: dict[str, int] = {}
    for group in groups:
        for ent in group:
            names = [ent.name, *ent.aliases]
            keys = [_norm(n) for n in names if _norm(n)]
            if not keys:
                continue
            hit = next((index[k] for k in keys if k in index), None)
            if hit is None:
                merged.append(ent.model_copy(deep=True))
                hit = len(merged) - 1
            else:
                cur = merged[hit]
                known = {_norm(cur.name), *(_norm(a) for a in cur.aliases)}
                for n in names:
                    if _norm(n) and _norm(n) not in known:
                        cur.aliases.append(n)
                        known.add(_norm(n))
                if not cur.description and ent.description:
                    cur.description = ent.description
                if cur.type == "other" and ent.type:
                    cur.type = ent.type
            for k in keys:
                index.setdefault(k, hit)
    return merged


def merge_relationships(groups: Sequence[Sequence[RelationshipOut]]) -> list[RelationshipOut]:
    seen: set[tuple[str, str, str]] = set()
    out: list[RelationshipOut] = []
    for group in groups:
        for rel in group:
            key = (_norm(rel.source), _norm(rel.relation), _norm(rel.target))
            if all(key) and key not in seen:
                seen.add(key)
                out.append(rel)
    return out


def _messages(title: str, text: str, part: str = "") -> list[dict[str, str]]:
    return [
        {"role": "system", "content": STRUCTURE_SYSTEM},
        {"role": "user", "content": f"Title: {title}{part}\n\n---\n{text}\n---"},
    ]


def structure_document(
    title: str,
    text: str,
    call: StructuredCall,
    *,
    window_tokens: int,
    count_tokens: Callable[[str], int],
    long_reader: LongReader | None = None,
) -> DocumentStructure:
    """Phase 1 for one document. Raises what `call` raises when the LLM fails for good.

    Over `window_tokens`, `long_reader` (if any) reads the whole document first; windows are
    the fallback when it returns nothing usable (its note and spend are kept either way).
    """
    windows = (
        chunk_document(
            text,
            heading_sections(text),
            max_tokens=window_tokens,
            overlap_tokens=0,
            count=count_tokens,
        )
        if count_tokens(text) > window_tokens
        else None
    )
    if not windows:
        parsed, spent = call(_messages(title, text), DocumentStructureOut)
        assert isinstance(parsed, DocumentStructureOut)
        return _finish(text, [parsed], [0], [text], "llm", spent, None)
    spent = Usage()
    notes: list[str] = []
    if long_reader is not None:
        read = long_reader(title, text)
        notes.append(read.note)
        if read.parsed is not None:
            done = _finish(text, [read.parsed], [0], [text], "llm-rlm", read.usage, None)
            done.notes[:0] = notes
            return done
        spent = read.usage
    results: list[DocumentStructureOut] = []
    for i, win in enumerate(windows, start=1):
        parsed, used = call(
            _messages(title, win.text, f" (part {i} of {len(windows)})"), DocumentStructureOut
        )
        assert isinstance(parsed, DocumentStructureOut)
        results.append(parsed)
        spent = spent + used
    joined = "\n".join(f"Part {i}: {r.summary}" for i, r in enumerate(results, start=1))
    merged, used = call(
        [{"role": "system", "content": MERGE_SUMMARY_SYSTEM}, {"role": "user", "content": joined}],
        SummaryOut,
    )
    assert isinstance(merged, SummaryOut)
    windowed = _finish(
        text,
        results,
        [w.start for w in windows],
        [w.text for w in windows],
        "llm-windowed",
        spent + used,
        merged.summary,
    )
    windowed.notes[:0] = notes
    return windowed


def _finish(
    text: str,
    results: Sequence[DocumentStructureOut],
    offsets: Sequence[int],
    texts: Sequence[str],
    method: str,
    usage: Usage,
    summary: str | None,
) -> DocumentStructure:
    sections: list[Section] = []
    for res, off, win in zip(results, offsets, texts, strict=True):
        sections.extend(locate_sections(win, res.sections, off))
    notes = []
    if not sections:
        sections = heading_sections(text)
        notes.append("no LLM section could be located: sections from headings")
    summary_text = (summary if summary is not None else results[0].summary).strip()
    return DocumentStructure(
        summary=summary_text[:SUMMARY_MAX_CHARS],
        entities=merge_entities([r.entities for r in results]),
        relationships=merge_relationships([r.relationships for r in results]),
        sections=normalise_sections(sections, len(text), text=text),
        method=method,
        usage=usage,
        notes=notes,
    )


def headings_structure(text: str) -> DocumentStructure:
    """Enrichment off: sections from headings, no summary, no entities."""
    return DocumentStructure(
        summary="",
        entities=[],
        relationships=[],
        sections=heading_sections(text),
        method="headings",
    )
