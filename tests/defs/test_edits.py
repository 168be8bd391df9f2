"""After any sequence of edits, the lake equals a fresh ingest of the same landing folder.

Hypothesis writes a knowledge base of markdown documents (headings, paragraphs, numbered lists),
then edits it the way people do: lines appended, inserted and deleted, list items and headings
changed, files renamed, replaced, added and removed. After each edit the knowledge base's assets
are materialized on one lake (incrementally, reusing what did not change) and on a new lake
(a fresh ingest); every table, the errors and the BM25 index must be the same on both, with no
stale row anywhere, and every blocking check must pass (a failed one fails the materialization).
With enrichment off, and with the LLM phases on a scripted model (the fresh ingest is then
answered from the cache, so what the calls cost is left out of the comparison).
"""

import os
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memcity_pipeline.defs.enrichment import chunks, document_structure, enriched_chunks
from memcity_pipeline.defs.indexing import bm25_index, chunk_embeddings
from memcity_pipeline.defs.ingestion import raw_documents
from memcity_pipeline.lake.delta import read_rows
from memcity_pipeline.lake.tables import bm25_prefix
from memcity_pipeline.resources.enrichment import EnrichmentResource
from memcity_pipeline.resources.lake import LakeResource
from memcity_pipeline.resources.llm import LLMResource
from memcity_pipeline.search import bm25_store
from memcity_pipeline.settings import build_resources, get_settings
from tests.enrichment.test_enrichment import smart_responder
from tests.scripted_llm_server import ScriptedLLMServer

pytestmark = pytest.mark.slow

ASSETS = [raw_documents, document_structure, chunks, enriched_chunks, chunk_embeddings, bm25_index]
KB = Path("orgs/acme/knowledge_bases/kb")
PARTITION = "acme/kb"
# Columns that record when a row was made, how often the LLM was tried on it, or what making it
# cost: its history, not what it holds.
WHEN = {"ingested_at", "structured_at", "enriched_at", "detected_at", "attempts"}
COST = {"llm_calls", "prompt_tokens", "completion_tokens", "cost_usd"}
TABLES = {
    "raw_documents": "document_id",
    "document_structure": "document_id",
    "chunks": "chunk_id",
    "enriched_chunks": "chunk_id",
    "chunk_embeddings": "item_id",
    "ingestion_errors": "path",
    "source_files": "path",
}

WORDS = [
    "hive",
    "scale",
    "battery",
    "gateway",
    "winter",
    "swarm",
    "queen",
    "sensor",
    "alert",
    "weight",
    "signal",
    "level",
]
words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=14).map(" ".join)
sentence = words.map(lambda w: w.capitalize() + ".")
heading = st.tuples(st.integers(1, 3), words).map(lambda h: "#" * h[0] + " " + h[1].title())
list_item = st.tuples(st.integers(1, 9), sentence).map(lambda i: f"{i[0]}. {i[1]}")
line = st.one_of(heading, sentence, list_item, st.just(""))
document = st.lists(line, min_size=1, max_size=16).map(lambda ls: "\n".join(["# Doc", *ls]) + "\n")
names = st.sampled_from(["winter.md", "spring.md", "notes/hives.md", "notes/queens.md"])

edit = st.one_of(
    st.tuples(st.just("append"), line),
    st.tuples(st.just("insert"), line),
    st.tuples(st.just("delete_line"), st.none()),
    st.tuples(st.just("list_item"), list_item),
    st.tuples(st.just("heading"), heading),
    st.tuples(st.just("rename"), names),
    st.tuples(st.just("replace"), document),
    st.tuples(st.just("add"), st.tuples(names, document)),
    st.tuples(st.just("remove"), st.none()),
)


class Landing:
    """The knowledge base's folder; each write gets a later mtime, as a real edit does."""

    def __init__(self, root: Path) -> None:
        self.root = root / KB
        self.clock = 1_700_000_000 * 10**9

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*.md"))

    def write(self, path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.clock += 10**9
        os.utime(path, ns=(self.clock, self.clock))

    def apply(self, kind: str, arg: Any, pick: int) -> None:
        files = self.files()
        if kind == "add" or not files:
            name, text = arg if kind == "add" else ("winter.md", "# Doc\nFirst line.\n")
            self.write(self.root / name, text)
            return
        target = files[pick % len(files)]
        lines = target.read_text().split("\n")
        at = pick % len(lines)
        if kind == "append":
            lines.insert(len(lines) - 1, arg)
        elif kind == "insert":
            lines.insert(at, arg)
        elif kind == "delete_line" and len(lines) > 2:
            del lines[at]
        elif kind in ("list_item", "heading"):  # change one (or else any line) into `arg`
            first = "0123456789" if kind == "list_item" else "#"
            hits = [i for i, s in enumerate(lines) if s[:1] and s[:1] in first]
            lines[hits[pick % len(hits)] if hits else at] = arg
        elif kind == "rename":
            new = self.root / arg
            if not new.exists():
                new.parent.mkdir(parents=True, exist_ok=True)
                target.rename(new)
                self.clock += 10**9
                os.utime(new, ns=(self.clock, self.clock))
            return
        elif kind == "replace":
            self.write(target, arg)
            return
        elif kind == "remove" and len(files) > 1:
            target.unlink()
            return
        text = "\n".join(lines)
        if text.strip():
            self.write(target, text)


def _materialize(lake_dir: Path, instance: dg.DagsterInstance, llm: str | None) -> None:
    """The knowledge base's assets on `lake_dir`; the LLM phases on the model at `llm`."""
    settings = get_settings()
    resources = {
        **build_resources(settings),
        "lake": LakeResource(lake_uri=str(lake_dir), landing_dir=str(settings.landing_dir)),
        "enrichment": EnrichmentResource(
            mode="llm" if llm else "off", chunk_tokens=40, chunk_overlap_tokens=6
        ),
    }
    if llm:
        resources["llm"] = LLMResource(
            base_url=llm, model="scripted-model", cache_dir=str(settings.cache_dir / "llm")
        )
    instance.add_dynamic_partitions("knowledge_bases", [PARTITION])
    result = dg.materialize(ASSETS, partition_key=PARTITION, instance=instance, resources=resources)
    assert result.success
    failed = [
        e.event_specific_data.check_name  # type: ignore[union-attr]
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
        and not e.event_specific_data.passed  # type: ignore[union-attr]
    ]
    assert not failed, f"checks failed: {failed}"


def _state(lake_dir: Path) -> dict[str, Any]:
    """Everything the lake holds for the knowledge base, as comparable values."""
    out: dict[str, Any] = {}
    for name, key in TABLES.items():
        frame = read_rows(lake_dir, name)
        keep = [c for c in frame.columns if c not in WHEN | COST and c != "vector"]
        assert frame[key].is_duplicated().sum() == 0 or name == "ingestion_errors", name
        out[name] = frame.select(keep).sort(keep, nulls_last=True).to_dicts()
    out["bm25"] = bm25_store.current_key(lake_dir, bm25_prefix("chunks", "acme", "kb"))
    vectors = read_rows(lake_dir, "chunk_embeddings")
    out["vector_lengths"] = sorted(
        zip(vectors["item_id"], vectors["vector"].list.len(), strict=True)
    )
    return out


@pytest.mark.parametrize("enrichment", ["off", "llm"])
@given(first=st.lists(st.tuples(names, document), min_size=1, max_size=3), data=st.data())
@settings(max_examples=8)
def test_the_lake_equals_a_fresh_ingest_after_any_sequence_of_edits(
    tmp_path_factory: pytest.TempPathFactory,
    scripted_llm: ScriptedLLMServer,
    enrichment: str,
    first: list[tuple[str, str]],
    data: st.DataObject,
) -> None:
    scripted_llm.responder = smart_responder
    llm = scripted_llm.base_url if enrichment == "llm" else None
    home = tmp_path_factory.mktemp("edits")
    os.environ["MEMCITY_HOME"] = str(home)  # the fixture's variable, for this example only
    landing = Landing(get_settings().landing_dir)
    for name, text in first:
        landing.write(landing.root / name, text)
    instance = dg.DagsterInstance.ephemeral()
    _materialize(home / "lake", instance, llm)
    edits = data.draw(st.lists(st.tuples(edit, st.integers(0, 1000)), min_size=1, max_size=4))
    for step, ((kind, arg), pick) in enumerate(edits):
        landing.apply(kind, arg, pick)
        _materialize(home / "lake", instance, llm)
        fresh = home / f"fresh-{step}"
        _materialize(fresh, dg.DagsterInstance.ephemeral(), llm)
        incremental, expected = _state(home / "lake"), _state(fresh)
        for part in expected:
            assert incremental[part] == expected[part], f"{part} after {kind} (edit {step + 1})"
