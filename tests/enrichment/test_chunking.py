"""Phase 2 chunking: exact offsets, token budgets, sections, overlap, repair of LLM sections."""

import random
import unicodedata
from itertools import pairwise

import pytest

from memcity_pipeline.enrichment.chunking import (
    Chunk,
    Section,
    chunk_document,
    chunk_header,
    heading_sections,
    normalise_sections,
    section_paths,
)
from memcity_pipeline.enrichment.tokens import MiniLMTokenizer, count_tokens

WORDS = [
    "river",
    "bank",
    "ledger",
    "invoice",
    "harbour",
    "cargo",
    "engine",
    "tariff",
    "clause",
    "warranty",
    "pump",
    "valve",
    "sensor",
    "quarter",
    "revenue",
    "margin",
    "supplier",
    "contract",
    "delivery",
    "schedule",
    "audit",
    "report",
    "customer",
    "region",
]


def sentence(rng: random.Random, n: int | None = None) -> str:
    words = [rng.choice(WORDS) for _ in range(n or rng.randint(6, 18))]
    return " ".join(words).capitalize() + "."


def paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def markdown_doc(seed: int = 7) -> str:
    rng = random.Random(seed)
    parts = ["Preamble before any heading. " + paragraph(rng, 3)]
    for title in ["Overview", "Pricing", "Support"]:
        parts.append(f"## {title}")
        for _ in range(4):
            parts.append(paragraph(rng, rng.randint(2, 7)))
    parts.append("```python\n# a comment, not a heading\nx = 1\n```")
    parts.append("### Appendix\n" + paragraph(rng, 3))
    return "\n\n".join(parts) + "\n"


def check_chunks(text: str, chunks: list[Chunk], max_tokens: int) -> None:
    """What every chunking must guarantee, whatever the input."""
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert c.text == text[c.start : c.end]
        assert c.text.strip() == c.text and c.text
        assert c.token_count == count_tokens(c.text)
        assert c.token_count <= max_tokens
    for a, b in pairwise(chunks):
        assert a.start < b.start and a.end < b.end
    covered = bytearray(len(text))
    for c in chunks:
        covered[c.start : c.end] = b"\x01" * (c.end - c.start)
    missing = [i for i, ch in enumerate(text) if not ch.isspace() and not covered[i]]
    assert not missing, f"text not in any chunk at {missing[:5]}"


def test_small_document_is_one_chunk_per_heading_section() -> None:
    text = "# Guide\n\nShort intro.\n\n## Install\n\nRun the installer.\n"
    chunks = chunk_document(text, None)
    check_chunks(text, chunks, 512)
    assert [(c.section_title, c.text) for c in chunks] == [
        ("Guide", "# Guide\n\nShort intro."),
        ("Install", "## Install\n\nRun the installer."),
    ]


def test_heading_sections_tile_the_text_and_skip_code_fences() -> None:
    text = markdown_doc()
    sections = heading_sections(text, title="Annual report")
    assert [s.title for s in sections] == [
        "Annual report",
        "Overview",
        "Pricing",
        "Support",
        "Appendix",
    ]
    assert sections[0].start == 0 and sections[-1].end == len(text)
    for a, b in pairwise(sections):
        assert a.end == b.start
    assert text[sections[2].start :].startswith("## Pricing")
    assert heading_sections("no headings here", None) == [Section(None, 0, 16)]
    assert heading_sections("\n\n# Only\nbody", "Doc") == [Section("Only", 0, 13)]


def test_chunks_never_cross_sections_and_keep_their_titles() -> None:
    text = markdown_doc()
    chunks = chunk_document(text, None, max_tokens=60, overlap_tokens=12, title="Annual report")
    check_chunks(text, chunks, 60)
    for sec in heading_sections(text, "Annual report"):
        inside = [c for c in chunks if sec.start <= c.start < sec.end]
        assert inside, sec
        assert all(c.end <= sec.end and c.section_title == sec.title for c in inside)
    assert len(chunks) > 10


def test_long_paragraph_is_split_at_sentences() -> None:
    rng = random.Random(1)
    text = paragraph(rng, 80)  # one paragraph of ~1,000 tokens, no line breaks
    chunks = chunk_document(text, None, max_tokens=100, overlap_tokens=0)
    check_chunks(text, chunks, 100)
    assert len(chunks) >= 10
    assert all(c.text.endswith(".") for c in chunks)  # whole sentences, not cut mid-sentence


def test_sentence_longer_than_the_budget_is_split_at_words() -> None:
    rng = random.Random(2)
    text = sentence(rng, 900)  # one sentence of 900 words
    chunks = chunk_document(text, None, max_tokens=128, overlap_tokens=16)
    check_chunks(text, chunks, 128)
    for c in chunks:
        assert c.start == 0 or text[c.start - 1] == " "
        assert c.end == len(text) or text[c.end] == " "


@pytest.mark.parametrize(
    "line",
    [
        "x" * 50_000,  # one "word" the tokenizer counts as a single unknown token
        "長い日本語の文章には空白がありません" * 400,  # one token a character, no spaces
        "ab" * 20_000,  # word pieces inside one word
    ],
    ids=["unknown-token-run", "cjk", "word-pieces"],
)
def test_huge_line_without_spaces_is_cut_within_budgets(line: str) -> None:
    text = "Intro sentence.\n" + line + "\nOutro sentence."
    chunks = chunk_document(text, None, max_tokens=200, overlap_tokens=20)
    check_chunks(text, chunks, 200)
    assert all(len(c.text) <= 200 * 16 for c in chunks)
    assert len(chunks) > 2


def test_given_sections_are_respected() -> None:
    rng = random.Random(3)
    first, second = paragraph(rng, 6), paragraph(rng, 6)
    text = first + "\n" + second
    boundary = len(first) + 1
    sections = [Section("First part", 0, boundary), Section("Second part", boundary, len(text))]
    chunks = chunk_document(text, sections, max_tokens=512)
    check_chunks(text, chunks, 512)
    assert [(c.section_title, c.start, c.end) for c in chunks] == [
        ("First part", 0, len(first)),
        ("Second part", boundary, len(text)),
    ]


def test_imperfect_llm_sections_are_repaired() -> None:
    text = markdown_doc()
    pricing = text.index("## Pricing")
    support = text.index("## Support")
    appendix = text.index("### Appendix")
    llm_sections = [
        Section("Support", support + 37, appendix - 30),  # start off by 37, ends early
        Section("Pricing", pricing - 25, support + 60),  # off, and overlapping the next one
        Section("Overview", -10, pricing - 3),  # negative start
        Section("Nested", pricing + 5, pricing + 50),  # inside Pricing
        Section("Empty", 40, 40),
        Section("Beyond", len(text) + 5, len(text) + 500),
        Section("Inverted", 300, 200),
    ]
    repaired = normalise_sections(llm_sections, len(text), text=text)
    assert repaired[0].start == 0 and repaired[-1].end == len(text)
    for a, b in pairwise(repaired):
        assert a.end == b.start
    titles = {s.title: s for s in repaired}
    assert titles["Pricing"].start == pricing
    assert titles["Support"].start == support
    assert titles["Appendix"].start == appendix  # a heading in an uncovered gap starts a section
    assert titles["Appendix"].end == len(text)
    assert "Nested" not in titles and "Empty" not in titles and "Inverted" not in titles
    assert "Beyond" not in titles

    chunks = chunk_document(text, llm_sections, max_tokens=80, overlap_tokens=10)
    check_chunks(text, chunks, 80)
    assert {c.section_title for c in chunks} == {"Overview", "Pricing", "Support", "Appendix"}
    assert all(not (c.start < pricing < c.end) for c in chunks)


def test_normalise_sections_without_text_clamps_and_fills_gaps() -> None:
    sections = [Section("B", 50, 80), Section("A", 10, 60), Section("C", 90, 500)]
    assert normalise_sections(sections, 100) == [
        Section(None, 0, 10),
        Section("A", 10, 50),
        Section("B", 50, 90),
        Section("C", 90, 100),
    ]
    assert normalise_sections([], 5) == [Section(None, 0, 5)]
    assert normalise_sections([Section("x", 0, 3)], 0) == []


def test_consecutive_chunks_overlap_by_a_tail_of_whole_words() -> None:
    rng = random.Random(4)
    text = "\n\n".join(paragraph(rng, 5) for _ in range(12))
    chunks = chunk_document(text, None, max_tokens=120, overlap_tokens=30)
    check_chunks(text, chunks, 120)
    assert len(chunks) > 4
    for prev, nxt in pairwise(chunks):
        assert nxt.start < prev.end, "no overlap"
        shared = text[nxt.start : prev.end]
        assert prev.text.endswith(shared) and nxt.text.startswith(shared)
        assert 0 < count_tokens(shared) <= 30
        assert text[nxt.start - 1].isspace()  # starts at a word (here: sentence) boundary
    no_overlap = chunk_document(text, None, max_tokens=120, overlap_tokens=0)
    check_chunks(text, no_overlap, 120)
    assert all(a.end <= b.start for a, b in pairwise(no_overlap))
    assert len(no_overlap) < len(chunks)


def test_overlap_stays_inside_a_section() -> None:
    text = markdown_doc(11)
    chunks = chunk_document(text, None, max_tokens=50, overlap_tokens=20)
    for prev, nxt in pairwise(chunks):
        if prev.section_title != nxt.section_title:
            assert nxt.start >= prev.end


def test_chunking_is_deterministic() -> None:
    text = markdown_doc(5)
    first = chunk_document(text, None, max_tokens=64, overlap_tokens=16)
    again = chunk_document(text, None, max_tokens=64, overlap_tokens=16)
    other_counter = chunk_document(
        text, None, max_tokens=64, overlap_tokens=16, count=MiniLMTokenizer().count
    )
    assert first == again == other_counter


def test_unicode_text_keeps_exact_offsets() -> None:
    decomposed = unicodedata.normalize("NFD", "Crème brûlée à la façon de Zoë")
    parts = [
        "# Café menu 🍰\n",
        ("Ünïcödé sentences with émojis 🚀🔥 and accents. " * 30).strip(),
        "## 日本語のセクション\n" + "これは日本語の文です。" * 60,
        "## עברית\n" + "זהו משפט בעברית עם מילים. " * 40,
        "## Decomposed\n" + (decomposed + ". ") * 40,
    ]
    text = "\n\n".join(parts)
    chunks = chunk_document(text, None, max_tokens=40, overlap_tokens=8)
    check_chunks(text, chunks, 40)
    assert {c.section_title for c in chunks} >= {"Café menu 🍰", "日本語のセクション", "עברית"}
    for c in chunks:  # a combining mark never starts a chunk
        assert not unicodedata.combining(c.text[0])


def test_any_counter_can_be_swapped_in() -> None:
    rng = random.Random(6)
    text = "\n\n".join(paragraph(rng, 4) for _ in range(10)) + "\n" + "z" * 400

    def words(t: str) -> int:
        return len(t.split())

    def quarter_chars(t: str) -> int:  # does not add up across pieces: chunks are re-counted
        return (len(t) + 3) // 4

    for counter in (words, quarter_chars):
        chunks = chunk_document(text, None, max_tokens=50, overlap_tokens=10, count=counter)
        assert chunks and all(c.text == text[c.start : c.end] for c in chunks)
        assert all(c.token_count == counter(c.text) <= 50 for c in chunks)


def test_degenerate_inputs() -> None:
    assert chunk_document("", None) == []
    assert chunk_document(" \n\t\n ", None) == []
    assert chunk_document("one word", []) == [Chunk(0, 0, 8, "one word", None, 2)]
    with pytest.raises(ValueError, match="overlap_tokens"):
        chunk_document("text", None, max_tokens=10, overlap_tokens=10)
    with pytest.raises(ValueError, match="max_tokens"):
        chunk_document("text", None, max_tokens=0, overlap_tokens=0)


def test_the_last_chunk_of_a_section_is_not_a_sliver() -> None:
    rng = random.Random(8)
    lines = [" ".join(rng.choice(WORDS) for _ in range(19)) for _ in range(11)]
    text = "\n".join(lines)

    def words(t: str) -> int:
        return len(t.split())

    chunks = chunk_document(text, None, max_tokens=100, overlap_tokens=0, count=words)
    assert [c.token_count for c in chunks] == [95, 57, 57]  # greedy packing would end on 19
    assert "\n".join(c.text for c in chunks) == text


def test_section_paths_follow_heading_levels() -> None:
    text = (
        "# Guide\n\nIntro.\n\n## Install\n\nSteps.\n\n### On Linux\n\nApt.\n\n## Use\n\nRun it.\n"
    )
    sections = heading_sections(text, "Guide")
    assert section_paths(text, sections) == [
        ["Guide"],
        ["Guide", "Install"],
        ["Guide", "Install", "On Linux"],
        ["Guide", "Use"],
    ]
    # a section phase 1 titled itself ends its path with that title
    given = [Section("Everything", 0, len(text))]
    assert section_paths(text, given) == [["Guide", "Everything"]]


def test_chunk_header_names_title_and_path_without_repeats() -> None:
    assert chunk_header("json — JSON encoder", ["json — JSON encoder", "Basic usage"]) == (
        "json — JSON encoder › Basic usage"
    )
    assert chunk_header(None, ["A", "A", "B¶"]) == "A › B"
    assert chunk_header("", []) == ""


def test_every_chunk_with_its_header_fits_the_budget() -> None:
    text = markdown_doc(3)
    chunks = chunk_document(text, None, max_tokens=64, overlap_tokens=16, title="Field manual")
    check_chunks(text, chunks, 64)
    pricing = [c for c in chunks if c.section_title == "Pricing"]
    assert pricing and all(c.header == "Field manual › Pricing" for c in pricing)
    appendix = [c for c in chunks if c.section_title == "Appendix"]
    assert appendix and appendix[0].header == "Field manual › Support › Appendix"
    for c in chunks:
        assert count_tokens(f"{c.header}\n\n{c.text}") <= 64
    bare = chunk_document(text, None, max_tokens=64, overlap_tokens=16, headers=False)
    assert all(c.header == "" for c in bare) and len(bare) <= len(chunks)


def test_a_long_header_is_cut_to_a_quarter_of_the_budget() -> None:
    text = "# " + " ".join(["heading"] * 80) + "\n\n" + paragraph(random.Random(2), 6)
    chunks = chunk_document(text, None, max_tokens=64, overlap_tokens=8)
    check_chunks(text, chunks, 64)
    assert all(0 < count_tokens(c.header) <= 16 for c in chunks)
