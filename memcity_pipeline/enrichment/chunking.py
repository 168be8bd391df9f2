"""Phase 2 of enrichment: split a document into chunks that fit a token budget (no LLM).

A document is first cut into sections (from phase 1, which may be imperfect and is repaired, or
from its markdown headings). Inside a section the text is cut into pieces at sentence, line,
paragraph and heading boundaries (words, then characters, only for pieces that would not fit),
and the pieces are packed greedily into chunks. A chunk ends at the strongest boundary in the
second half of its budget, and starts with a short tail of the previous chunk of the same section
(the overlap). Every chunk is an exact slice of the document: `chunk.text == text[start:end]`.

Token counts of pieces cut at whitespace add up exactly for the WordPiece tokenizer; every chunk
is still counted once as a whole, and shrunk if a counter does not add up.

This module stays whole: it is one algorithm (cut at sections, then headings, paragraphs and
sentences, under a token budget with overlap) whose steps only make sense together.
"""

import bisect
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memcity_pipeline.enrichment.tokens import MiniLMTokenizer, count_tokens, count_tokens_many

# Boundary strength at the start of a piece: the packer prefers to end a chunk before a strong one.
CHAR, WORD, SENTENCE, LINE, PARAGRAPH, HEADING = range(6)

_HEADING_LINE = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*#*[ \t]*$", re.MULTILINE)
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})", re.MULTILINE)
_BREAK = re.compile(r"\s*\n\s*|[.!?…]+[\"'”’)\]]*\s+|[。！？]+(?=\S)")
_WORD_BREAK = re.compile(r"\s+")
_SNAP_TITLE_WINDOW = 1500
_SNAP_LINE_WINDOW = 120


@dataclass(frozen=True)
class Section:
    """A titled span of a document: character offsets `[start, end)` into its text."""

    title: str | None
    start: int
    end: int


@dataclass(frozen=True)
class Chunk:
    """A piece of a document that fits the token budget; `text == document[start:end]`.

    `header` says where the chunk sits (document title, then the headings enclosing it); the
    budget counts it, so `header` + blank line + `text` fits `max_tokens`.
    """

    ordinal: int
    start: int
    end: int
    text: str
    section_title: str | None
    token_count: int
    header: str = ""


@dataclass
class _Piece:
    start: int
    end: int
    level: int
    tokens: int


def _fenced_ranges(text: str) -> list[tuple[int, int]]:
    """Character ranges of fenced code blocks (``` or ~~~), where `#` lines are not headings."""
    ranges: list[tuple[int, int]] = []
    opened: tuple[int, str] | None = None
    for m in _FENCE.finditer(text):
        marker = m.group(1)
        if opened is None:
            opened = (m.start(), marker)
        elif marker[0] == opened[1][0] and len(marker) >= len(opened[1]):
            ranges.append((opened[0], m.end()))
            opened = None
    if opened is not None:
        ranges.append((opened[0], len(text)))
    return ranges


def _in_ranges(pos: int, ranges: list[tuple[int, int]], starts: list[int]) -> bool:
    i = bisect.bisect_right(starts, pos) - 1
    return i >= 0 and ranges[i][0] <= pos < ranges[i][1]


def _headings(text: str) -> list[tuple[int, str]]:
    """(line start, heading text) of every markdown ATX heading outside fenced code."""
    return [(line, title) for line, _, title in _heading_marks(text)]


HEADER_SEPARATOR = " › "
CHUNKING_VERSION = "2"  # part of a document's chunking fingerprint: a change re-chunks everything


def section_paths(text: str, sections: Sequence[Section]) -> list[list[str]]:
    """For each section, the titles of the markdown headings enclosing its start, outermost first.

    A heading closes every open heading of its level or deeper (`##` closes `##` and `###`). A
    section whose title is not the innermost heading (a title phase 1 gave) ends with its own title.
    """
    marks = _heading_marks(text)
    levels = [len(text[hash_at:].split(None, 1)[0]) for _, hash_at, _ in marks]
    paths: list[list[str]] = []
    stack: list[tuple[int, str]] = []
    m = 0
    for sec in sections:
        while m < len(marks) and marks[m][0] <= sec.start:
            level = levels[m]
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, marks[m][2]))
            m += 1
        path = [title for _, title in stack]
        if sec.title and (not path or path[-1] != sec.title):
            path.append(sec.title)
        paths.append(path)
    return paths


def chunk_header(title: str | None, path: Sequence[str]) -> str:
    """`Title › Heading › Subheading`: the document title, then the section path, without a
    heading that repeats the one before it or begins the title."""
    parts: list[str] = []
    for part in (title, *path):
        cleaned = " ".join((part or "").split()).strip(" ¶#")
        low = cleaned.lower()
        repeats = parts and (low == parts[-1].lower() or parts[0].lower().startswith(low))
        if cleaned and not repeats:
            parts.append(cleaned)
    return HEADER_SEPARATOR.join(parts)


def _fit_header(header: str, budget: int, count: Callable[[str], int]) -> tuple[str, int]:
    """`header` cut (at its end, by words) to at most `budget` tokens, and its token count."""
    tokens = count(header) if header else 0
    if tokens <= budget:
        return header, tokens
    words = header.split(" ")
    while words and count(" ".join(words)) > budget:
        words.pop()
    header = " ".join(words)
    return header, count(header) if header else 0


def _heading_marks(text: str) -> list[tuple[int, int, str]]:
    """(line start, position of the first `#`, heading text) of every heading outside fences."""
    fences = _fenced_ranges(text)
    starts = [r[0] for r in fences]
    found = []
    for m in _HEADING_LINE.finditer(text):
        if _in_ranges(m.start(), fences, starts):
            continue
        title = (m.group(2) or "").strip()
        if title:
            found.append((m.start(), m.start(1), title))
    return found


def heading_sections(text: str, title: str | None = None) -> list[Section]:
    """Sections from markdown headings (`#` to `######`), tiling `[0, len(text))`.

    Each heading starts a section that runs to the next heading of any level. Text before the
    first heading is a section titled `title` (the document title, or None); a whitespace-only
    preamble joins the first heading's section.
    """
    if not text:
        return []
    heads = _headings(text)
    if not heads:
        return [Section(title, 0, len(text))]
    sections: list[Section] = []
    first = heads[0][0]
    if first > 0 and text[:first].strip():
        sections.append(Section(title, 0, first))
    for i, (pos, head) in enumerate(heads):
        start = 0 if not sections and i == 0 else pos
        end = heads[i + 1][0] if i + 1 < len(heads) else len(text)
        sections.append(Section(head, start, end))
    return sections


def _snap_start(sec: Section, text: str, heads: list[tuple[int, str]]) -> int:
    """A better start for a section whose offsets came from an LLM.

    Moves the start to the nearest heading line bearing the section's title (within a window),
    else to the nearest line that begins with the title, else to the nearest line start close
    by; unchanged when none is found.
    """
    start = sec.start
    if start <= 0 or start >= len(text):
        return start
    title = (sec.title or "").strip().lower()
    if title:
        near = [
            pos
            for pos, head in heads
            if abs(pos - start) <= _SNAP_TITLE_WINDOW and head.lower().strip("#* ") == title
        ]
        if not near:
            lo = max(0, start - _SNAP_TITLE_WINDOW)
            window = text[lo : start + _SNAP_TITLE_WINDOW + len(title)].lower()
            at = window.find(title)
            while at != -1:
                line_start = text.rfind("\n", 0, lo + at) + 1
                if not text[line_start : lo + at].strip(" \t#*>-0123456789."):
                    near.append(line_start)
                at = window.find(title, at + 1)
        if near:
            return min(near, key=lambda p: (abs(p - start), p))
    if text[start - 1] == "\n":
        return start
    before = text.rfind("\n", max(0, start - _SNAP_LINE_WINDOW), start)
    after = text.find("\n", start, min(len(text), start + _SNAP_LINE_WINDOW))
    options = [p + 1 for p in (before, after) if p != -1]
    if not options:
        return start
    return min(options, key=lambda p: (abs(p - start), p))


def normalise_sections(
    sections: Sequence[Section], text_len: int, *, text: str | None = None
) -> list[Section]:
    """Repair sections (for instance from an LLM) so that they tile `[0, text_len)` in order.

    Offsets are clamped into the text; empty or inverted sections are dropped; a section nested
    inside an earlier one is dropped; a partial overlap ends the earlier section where the later
    one starts. With `text`, starts snap to the line holding the section's title (or to a line
    start nearby), and a gap that holds markdown headings is split at them. A gap otherwise joins
    the section before it (a gap at the start becomes an untitled section).
    """
    if text is not None and len(text) != text_len:
        raise ValueError(f"text has {len(text)} characters, text_len says {text_len}")
    if text_len <= 0:
        return []
    heads = _headings(text) if text is not None else []
    spans: list[tuple[int, int, str | None]] = []
    for sec in sections:
        start = min(max(int(sec.start), 0), text_len)
        end = min(max(int(sec.end), 0), text_len)
        if end <= start:
            continue
        title = sec.title.strip() if isinstance(sec.title, str) and sec.title.strip() else None
        if text is not None:
            start = _snap_start(Section(title, start, end), text, heads)
            if end <= start:
                continue
        spans.append((start, end, title))
    spans.sort(key=lambda s: (s[0], -s[1]))

    kept: list[list] = []
    for start, end, title in spans:
        if kept and end <= kept[-1][1]:
            continue  # nested in (or equal to) the previous section
        if kept and start <= kept[-1][0]:
            continue  # same start, shorter or equal: already sorted longest first
        if kept and start < kept[-1][1]:
            kept[-1][1] = start  # partial overlap: the later start wins
        kept.append([start, end, title])

    tiled: list[Section] = []
    cursor = 0
    for start, end, title in kept:
        if start > cursor:
            _fill_gap(tiled, cursor, start, heads)
        tiled.append(Section(title, start, end))
        cursor = end
    if cursor < text_len:
        _fill_gap(tiled, cursor, text_len, heads)
    if not tiled:
        return [Section(None, 0, text_len)]
    return _merge_adjacent_gaps(tiled, text)


def _fill_gap(tiled: list[Section], start: int, end: int, heads: list[tuple[int, str]]) -> None:
    """Cover the gap `[start, end)` after `tiled`: split at headings, else extend the last one."""
    inside = [(pos, title) for pos, title in heads if start <= pos < end]
    first_head = inside[0][0] if inside else end
    if first_head > start:
        if tiled:
            last = tiled.pop()
            tiled.append(Section(last.title, last.start, first_head))
        else:
            tiled.append(Section(None, start, first_head))
    for i, (pos, head) in enumerate(inside):
        stop = inside[i + 1][0] if i + 1 < len(inside) else end
        tiled.append(Section(head, pos, stop))


def _merge_adjacent_gaps(sections: list[Section], text: str | None) -> list[Section]:
    """Join a leading untitled whitespace-only section into the section after it."""
    if len(sections) >= 2 and text is not None and sections[0].title is None:
        first, second = sections[0], sections[1]
        if not text[first.start : first.end].strip():
            return [Section(second.title, first.start, second.end), *sections[2:]]
    return sections


def _is_additive(count: Callable[[str], int]) -> bool:
    """Whether `count` is the WordPiece counter, whose counts add up across whitespace."""
    return count is count_tokens or isinstance(getattr(count, "__self__", None), MiniLMTokenizer)


def _batch_counter(count: Callable[[str], int]) -> Callable[[Sequence[str]], list[int]]:
    """A counter of many texts at once for `count` (one tokenizer batch when it is ours)."""
    if count is count_tokens:
        return count_tokens_many
    many = getattr(getattr(count, "__self__", None), "count_many", None)
    if callable(many):
        return many
    return lambda texts: [count(t) for t in texts]


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    """`[start, end)` without leading and trailing whitespace (empty when all whitespace)."""
    piece = text[start:end]
    stripped = piece.lstrip()
    start += len(piece) - len(stripped)
    stripped = stripped.rstrip()
    return start, start + len(stripped)


def _split_chars(
    text: str, start: int, end: int, max_tokens: int, max_chars: int, count: Callable[[str], int]
) -> list[tuple[int, int]]:
    """Cut `[start, end)` (no usable whitespace) into the longest spans that fit both budgets.

    A binary search on the length of each span; the length of the previous span is tried first,
    so a uniform run costs about two counts a span.
    """
    spans: list[tuple[int, int]] = []
    pos, guess = start, 0
    while pos < end:
        lo, hi = 1, min(max_chars, end - pos)
        if 1 < guess <= hi:
            if count(text[pos : pos + guess]) <= max_tokens:
                lo = guess
                if guess < hi and count(text[pos : pos + guess + 1]) > max_tokens:
                    hi = guess
            else:
                hi = guess - 1
        while lo < hi:  # the longest prefix that fits; token counts grow with length
            mid = (lo + hi + 1) // 2
            if count(text[pos : pos + mid]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        stop = pos + lo
        while stop < end and stop - 1 > pos and unicodedata.combining(text[stop]):
            stop -= 1  # never separate a letter from its combining mark
        spans.append((pos, stop))
        guess = lo
        pos = stop
    return spans


def _pieces(
    text: str,
    start: int,
    end: int,
    heading_at: set[int],
    max_tokens: int,
    max_chars: int,
    count: Callable[[str], int],
    many: Callable[[Sequence[str]], list[int]],
) -> list[_Piece]:
    """The section `[start, end)` cut into pieces that each fit the budgets alone.

    Pieces are sentences or lines; a piece too large is cut into words, and a word too large into
    characters. Each piece records the strength of the boundary at its start.
    """
    bounds = [(start, HEADING)]
    for m in _BREAK.finditer(text, start, end):
        b = m.end()
        if b >= end:
            continue
        newlines = m.group().count("\n")
        level = PARAGRAPH if newlines >= 2 else LINE if newlines == 1 else SENTENCE
        if newlines and b in heading_at:
            level = HEADING
        bounds.append((b, level))
    spans: list[tuple[int, int, int]] = []
    for k, (b, level) in enumerate(bounds):
        stop = bounds[k + 1][0] if k + 1 < len(bounds) else end
        s, e = _trimmed(text, b, stop)
        if e > s:
            spans.append((s, e, level))
    counts = many([text[s:e] for s, e, _ in spans])
    pieces: list[_Piece] = []
    for (s, e, level), tokens in zip(spans, counts, strict=True):
        if tokens <= max_tokens and e - s <= max_chars:
            pieces.append(_Piece(s, e, level, tokens))
            continue
        words: list[tuple[int, int]] = []
        pos = s
        for m in _WORD_BREAK.finditer(text, s, e):
            words.append((pos, m.start()))
            pos = m.end()
        words.append((pos, e))
        word_counts = many([text[ws:we] for ws, we in words])
        for n, ((ws, we), wt) in enumerate(zip(words, word_counts, strict=True)):
            wlevel = level if n == 0 else WORD
            if wt <= max_tokens and we - ws <= max_chars:
                pieces.append(_Piece(ws, we, wlevel, wt))
                continue
            for c, (cs, ce) in enumerate(_split_chars(text, ws, we, max_tokens, max_chars, count)):
                pieces.append(_Piece(cs, ce, wlevel if c == 0 else CHAR, count(text[cs:ce])))
    return pieces


def _best_break(pieces: list[_Piece], i: int, j: int, used: int, max_tokens: int, rest: int) -> int:
    """Where to end a chunk holding pieces `i..j-1` (j < len(pieces)): the index of its last + 1.

    The strongest boundary once the chunk is at least half full, the latest among equals. When
    the `rest` of the section after piece j-1 is small (under a quarter of the budget), the
    earliest strongest boundary past the middle of what is left, so that the last chunk of the
    section is not a sliver.
    """
    filled_all = used + sum(p.tokens for p in pieces[i:j])
    sliver = rest * 4 < max_tokens
    threshold = (filled_all + rest) / 2 if sliver else max_tokens / 2
    best, best_key = j, (-1, -1)
    filled = used
    for e in range(i + 1, j + 1):
        filled += pieces[e - 1].tokens
        if filled < threshold:
            continue
        key = (pieces[e].level, -e if sliver else e)
        if best_key[0] < 0 or key > best_key:
            best, best_key = e, key
    return best


def _overlap_start(
    text: str,
    pieces: list[_Piece],
    i: int,
    e: int,
    budget: int,
    count: Callable[[str], int],
) -> int | None:
    """Where the next chunk starts: a tail of the chunk of pieces `i..e-1` of <= `budget` tokens.

    Whole pieces (sentences) first; when they give less than half the budget, whole words of the
    piece before them are added. None when no tail fits.
    """
    if budget <= 0:
        return None
    acc, k = 0, e
    while k > i and acc + pieces[k - 1].tokens <= budget:
        acc += pieces[k - 1].tokens
        k -= 1
    start = pieces[k].start if k < e else None
    if acc * 2 < budget and k > i:
        piece, chunk_end = pieces[k - 1], pieces[e - 1].end
        word_starts = [m.end() for m in _WORD_BREAK.finditer(text, piece.start, piece.end)]
        lo, hi = 0, len(word_starts)  # the earliest word start whose tail fits the budget
        while lo < hi:
            mid = (lo + hi) // 2
            if count(text[word_starts[mid] : chunk_end]) <= budget:
                hi = mid
            else:
                lo = mid + 1
        if lo < len(word_starts):
            start = word_starts[lo]
    return start


def _pack(
    text: str,
    pieces: list[_Piece],
    max_tokens: int,
    overlap_tokens: int,
    max_chars: int,
    count: Callable[[str], int],
    additive: bool,
) -> list[tuple[int, int, int]]:
    """Pack the pieces of one section into chunks: (start, end, token count) each.

    With an `additive` counter (the sum of the counts of whitespace-separated pieces is the
    count of their concatenation) a chunk is counted as a whole only when it joins pieces cut
    inside a word.
    """
    out: list[tuple[int, int, int]] = []
    n, i = len(pieces), 0
    cum = [0]
    for piece in pieces:
        cum.append(cum[-1] + piece.tokens)
    ov_start: int | None = None
    ov_tokens = 0
    while i < n:
        cstart = pieces[i].start if ov_start is None else ov_start
        total, j = ov_tokens, i
        while (
            j < n and total + pieces[j].tokens <= max_tokens and pieces[j].end - cstart <= max_chars
        ):
            total += pieces[j].tokens
            j += 1
        if j == i:  # the overlap leaves no room for the next piece: start without it
            ov_start, ov_tokens = None, 0
            continue
        e = _best_break(pieces, i, j, ov_tokens, max_tokens, cum[n] - cum[j]) if j < n else j
        tokens: int | None = None
        if additive and all(pieces[k].level != CHAR for k in range(i + 1, e)):
            tokens = ov_tokens + cum[e] - cum[i]
        while tokens is None:  # count the chunk as a whole; shrink when counts did not add up
            tokens = count(text[cstart : pieces[e - 1].end])
            if tokens <= max_tokens:
                break
            if e - 1 > i:
                e -= 1
            elif cstart != pieces[i].start:
                cstart = pieces[i].start
            else:
                raise RuntimeError(f"a piece of {tokens} tokens does not fit {max_tokens}")
            tokens = None
        out.append((cstart, pieces[e - 1].end, tokens))
        ov_start, ov_tokens = None, 0
        if overlap_tokens and e < n:
            budget = min(overlap_tokens, max_tokens - pieces[e].tokens)
            ov_start = _overlap_start(text, pieces, i, e, budget, count)
            if ov_start is not None:
                ov_tokens = count(text[ov_start : pieces[e - 1].end])
                if ov_tokens + pieces[e].tokens > max_tokens:
                    ov_start, ov_tokens = None, 0
        i = e
    return out


def chunk_document(
    text: str,
    sections: Sequence[Section] | None,
    *,
    max_tokens: int = 512,
    overlap_tokens: int = 64,
    count: Callable[[str], int] = count_tokens,
    max_chars: int | None = None,
    title: str | None = None,
    headers: bool = True,
) -> list[Chunk]:
    """Split `text` into chunks of at most `max_tokens` tokens (overlap and header included).

    `sections` (from phase 1) are repaired with `normalise_sections`; with None or [] the
    document's markdown headings make the sections (text before the first one titled `title`).
    Chunks never cross a section boundary; within a section a chunk after the first starts with
    a tail of about `overlap_tokens` tokens of the one before. `max_chars` (default 16 characters
    a token) also caps a chunk's length, so that long runs the tokenizer counts as a single
    unknown token (hashes, base64) are still cut.

    With `headers`, each chunk gets a header (`chunk_header`: title and section path), at most a
    quarter of the budget, whose tokens (and the blank line after it) the budget counts.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(f"overlap_tokens must be in [0, max_tokens), got {overlap_tokens}")
    max_chars = max_chars if max_chars is not None else max_tokens * 16
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    if not text.strip():
        return []
    if sections:
        secs = normalise_sections(sections, len(text), text=text)
        if secs[0].title is None and title:  # the preamble is titled by the document
            secs[0] = Section(title, secs[0].start, secs[0].end)
    else:
        secs = heading_sections(text, title)
    heading_at = {pos for _, pos, _ in _heading_marks(text)}
    many = _batch_counter(count)
    additive = _is_additive(count)
    paths = section_paths(text, secs) if headers else [[] for _ in secs]
    chunks: list[Chunk] = []
    for sec, path in zip(secs, paths, strict=True):
        header, used = _fit_header(
            chunk_header(title, path) if headers else "", max_tokens // 4, count
        )
        budget = max_tokens - used
        overlap = min(overlap_tokens, budget // 2)
        pieces = _pieces(text, sec.start, sec.end, heading_at, budget, max_chars, count, many)
        packed = _pack(text, pieces, budget, overlap, max_chars, count, additive)
        for start, end, tokens in packed:
            chunks.append(
                Chunk(len(chunks), start, end, text[start:end], sec.title, tokens, header)
            )
    return chunks
