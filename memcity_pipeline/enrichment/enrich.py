"""Phase 3 of enrichment: each chunk resolved with document-wide context.

For every chunk the LLM names the pronouns and vague references it contains and what each refers
to (using the document's summary and entity list), plus key terms, a one-sentence summary and the
entities it mentions. The resolved text is made here, by annotating every such phrase with its
referent (`It (HiveScale S2) weighs...`): the original wording is kept, a model cannot rewrite
facts, and the answer is a few dozen tokens instead of a copy of the chunk. Several chunks go in
one call (fewer repeated document contexts, so fewer prompt tokens); when a batch's answer is
unusable its chunks are retried one by one, and a chunk that still fails keeps its original text
with the reason.
"""

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from memcity_pipeline.enrichment.structure import EntityOut, StructuredCall
from memcity_pipeline.llm.schema import ask_for_every_field, items, text
from memcity_pipeline.llm.usage import Usage

MAX_KEY_TERMS = 5
MAX_PHRASE_CHARS = 40
MAX_REFERENT_CHARS = 60


class ReferenceOut(BaseModel):
    phrase: str = text(
        MAX_PHRASE_CHARS, "a pronoun or vague phrase exactly as written in the chunk"
    )
    refers_to: str = text(MAX_REFERENT_CHARS, "the name it refers to")


class ChunkEnrichmentOut(BaseModel):
    """One chunk's answer; bounded (`llm.schema`), every field asked for."""

    model_config = ConfigDict(json_schema_extra=ask_for_every_field)

    index: int = Field(description="the chunk's number as given")
    references: list[ReferenceOut] = items(3)
    key_terms: list[str] = items(MAX_KEY_TERMS, item_chars=30)
    summary: str = text(200, "one sentence")
    entities: list[str] = items(4, item_chars=40)


class ChunkBatchOut(BaseModel):
    chunks: list[ChunkEnrichmentOut]


@functools.cache
def batch_schema(size: int) -> type[ChunkBatchOut]:
    """The answer schema of a call on `size` chunks: exactly one entry per chunk."""

    def exactly(schema: dict[str, Any]) -> None:
        schema["properties"]["chunks"].update(minItems=size, maxItems=size)

    return type(
        f"ChunkBatchOf{size}",
        (ChunkBatchOut,),
        {"model_config": ConfigDict(json_schema_extra=exactly), "__module__": __name__},
    )


@dataclass
class ChunkEnrichment:
    """The outcome for one chunk: enriched fields, or a failure reason."""

    status: str  # enriched | failed
    resolved_text: str | None = None
    key_terms: list[str] | None = None
    summary: str | None = None
    entities: list[str] | None = None
    error: str | None = None
    usage: Usage = field(
        default_factory=Usage
    )  # a batch call's usage is shared evenly by its chunks


ENRICH_SYSTEM = (
    "You prepare chunks of a document for a search index. For EACH chunk given, reply with: "
    "index (as given); references: every pronoun or vague phrase in the chunk (such as 'it', "
    "'they', 'she', 'the company', 'this product') with the name it refers to, using the "
    "document context; key_terms: up to 5 search terms; summary: one sentence; entities: names "
    'mentioned, as in the entity list. Reply with JSON only: {"chunks": [{"index": 1, '
    '"references": [{"phrase": "It", "refers_to": "..."}], "key_terms": ["..."], '
    '"summary": "...", "entities": ["..."]}]}.'
)


def resolve_references(text: str, references: Sequence[ReferenceOut]) -> tuple[str, int]:
    """`text` with each whole-word occurrence of a reference's phrase annotated with its referent.

    References whose phrase is not in the text, is too long, or names itself are ignored.
    Returns the resolved text and how many references were applied.
    """
    pairs: dict[str, str] = {}
    for ref in references:
        phrase, target = ref.phrase.strip(), " ".join(ref.refers_to.split())
        if (
            not phrase
            or not target
            or len(phrase) > MAX_PHRASE_CHARS
            or len(target) > MAX_REFERENT_CHARS
            or phrase.lower() == target.lower()
            or target.lower() in phrase.lower()
        ):
            continue
        if re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text):
            pairs.setdefault(phrase, target)
    if not pairs:
        return text, 0
    # Longest phrases first, so "the company" wins over "company"; one pass over the text.
    pattern = re.compile(
        "|".join(rf"(?<!\w){re.escape(p)}(?!\w)" for p in sorted(pairs, key=len, reverse=True))
    )
    resolved = pattern.sub(lambda m: f"{m.group(0)} ({pairs[m.group(0)]})", text)
    return resolved, len(pairs)


def _context(title: str, summary: str, entities: Sequence[EntityOut]) -> str:
    names = "; ".join(
        e.name + (f" (also {', '.join(e.aliases)})" if e.aliases else "") + f": {e.description}"
        for e in entities[:40]
    )
    return f"Document: {title}\nSummary: {summary or '(none)'}\nEntities: {names or '(none)'}"


def _messages(context: str, items: Sequence[tuple[int, str]]) -> list[dict[str, str]]:
    body = "\n\n".join(f"[chunk {i}]\n{text}" for i, text in items)
    return [
        {"role": "system", "content": ENRICH_SYSTEM},
        {"role": "user", "content": f"{context}\n\nChunks:\n\n{body}"},
    ]


def check_enrichment(original: str, out: ChunkEnrichmentOut) -> str | None:
    """Why an answer is unusable for this chunk, or None when it is plausible."""
    summary = out.summary.strip()
    if not summary:
        return "empty summary"
    if len(summary) > max(400, len(original)):
        return "summary longer than the chunk"
    if summary == original.strip():
        return "summary is the chunk itself"
    return None


def _accept(original: str, out: ChunkEnrichmentOut) -> ChunkEnrichment:
    reason = check_enrichment(original, out)
    if reason:
        return ChunkEnrichment(status="failed", error=f"LLM answer rejected: {reason}")
    terms = list(dict.fromkeys(t.strip() for t in out.key_terms if t.strip()))[:MAX_KEY_TERMS]
    return ChunkEnrichment(
        status="enriched",
        resolved_text=resolve_references(original, out.references)[0],
        key_terms=terms,
        summary=out.summary.strip(),
        entities=list(dict.fromkeys(e.strip() for e in out.entities if e.strip())),
    )


def enrich_chunks(
    title: str,
    summary: str,
    entities: Sequence[EntityOut],
    chunks: Sequence[str],
    call: StructuredCall,
    *,
    batch_size: int = 4,
    on_error: Callable[[str], None] | None = None,
) -> list[ChunkEnrichment]:
    """Enrich `chunks` of one document; the result has one entry per chunk, in order. An answer
    with any chunk rejected is not cached (`StructuredCall`'s `accept`)."""
    context = _context(title, summary, entities)
    results: list[ChunkEnrichment | None] = [None] * len(chunks)
    for start in range(0, len(chunks), batch_size):
        batch = list(range(start, min(start + batch_size, len(chunks))))
        retry: list[int] = []
        try:
            parsed, spent = call(
                _messages(context, [(i + 1, chunks[i]) for i in batch]),
                batch_schema(len(batch)),
                accept=lambda answer, batch=batch: _all_enriched(answer, batch, chunks),
            )
            share = spent.share(len(batch))
            for i, res in _outcomes(parsed, batch, chunks).items():
                res.usage = share
                if res.status == "failed" and len(batch) > 1:
                    retry.append(i)
                results[i] = res
        except Exception as exc:  # the batch as a whole failed: try its chunks one by one
            if on_error:
                on_error(f"batch of {len(batch)} chunks failed: {exc}")
            if len(batch) == 1:
                results[batch[0]] = ChunkEnrichment(
                    "failed", error=_reason(exc), usage=Usage(calls=1)
                )
            retry = batch
        for i in retry if len(batch) > 1 else []:
            results[i] = _single(context, i, chunks, call, results[i])
    return [
        r if r is not None else ChunkEnrichment("failed", error="not processed") for r in results
    ]


def _outcomes(
    parsed: BaseModel, batch: list[int], chunks: Sequence[str]
) -> dict[int, ChunkEnrichment]:
    """Each chunk of `batch` (positions in `chunks`) with its outcome from one answer."""
    assert isinstance(parsed, ChunkBatchOut)
    answers = _by_chunk(parsed, [i + 1 for i in batch])
    missing = "chunk missing from the LLM's answer"
    return {
        i: _accept(chunks[i], out)
        if (out := answers.get(i + 1))
        else ChunkEnrichment("failed", error=missing)
        for i in batch
    }


def _all_enriched(parsed: BaseModel, batch: list[int], chunks: Sequence[str]) -> bool:
    """Whether an answer enriches every chunk of `batch` (else it is not cached)."""
    return all(r.status == "enriched" for r in _outcomes(parsed, batch, chunks).values())


def _single(
    context: str,
    i: int,
    chunks: Sequence[str],
    call: StructuredCall,
    prior: ChunkEnrichment | None,
) -> ChunkEnrichment:
    before = prior.usage if prior is not None else Usage()
    try:
        parsed, spent = call(
            _messages(context, [(i + 1, chunks[i])]),
            batch_schema(1),
            accept=lambda answer: _all_enriched(answer, [i], chunks),
        )
        res = _outcomes(parsed, [i], chunks)[i]
    except Exception as exc:
        res = ChunkEnrichment("failed", error=_reason(exc))
        spent = Usage(calls=1)
    res.usage = before + spent
    return res


def _by_chunk(parsed: ChunkBatchOut, numbers: list[int]) -> dict[int, ChunkEnrichmentOut]:
    """Each chunk's answer by its number; when the numbers are not those asked for but there is
    one answer per chunk, by position (a small model may count from 0 or repeat a number)."""
    by_index = {c.index: c for c in parsed.chunks}
    if set(by_index) >= set(numbers) or len(parsed.chunks) != len(numbers):
        return by_index
    return dict(zip(numbers, parsed.chunks, strict=True))


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]
