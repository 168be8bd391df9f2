"""Bounded answer schemas: every string and list the enrichment LLM writes has a limit, every
field is asked for, and the longest answer allowed is known (the calls' token limit)."""

import json

import pytest
from pydantic import BaseModel, ConfigDict

from memcity_pipeline.enrichment.enrich import ChunkBatchOut, batch_schema
from memcity_pipeline.enrichment.structure import DocumentStructureOut, SummaryOut
from memcity_pipeline.llm.schema import ask_for_every_field, items, max_answer_chars, text


class Pair(BaseModel):
    model_config = ConfigDict(json_schema_extra=ask_for_every_field)

    name: str = text(10)
    tags: list[str] = items(3, item_chars=5)
    count: int = 0


def test_longest_answer_is_bounded_and_counted() -> None:
    longest = json.dumps({"name": "n" * 10, "tags": ["t" * 5] * 3, "count": -(10**10)})
    limit = max_answer_chars(Pair)
    assert limit is not None and len(longest) <= limit < 2 * len(longest)
    schema = Pair.model_json_schema()
    assert schema["required"] == ["name", "tags", "count"]
    assert schema["properties"]["tags"]["items"] == {"type": "string", "maxLength": 5}


def test_an_unbounded_string_or_list_has_no_limit() -> None:
    class Loose(BaseModel):
        name: str

    class LooseList(BaseModel):
        tags: list[str] = items(3)  # items without a length

    assert max_answer_chars(Loose) is None
    assert max_answer_chars(LooseList) is None


@pytest.mark.parametrize("model", [DocumentStructureOut, SummaryOut, batch_schema(4)])
def test_every_enrichment_answer_is_bounded(model: type[BaseModel]) -> None:
    limit = max_answer_chars(model)
    assert limit is not None and limit < 8192, limit  # fits the embedded model's window
    schema = model.model_json_schema()
    for node in [schema, *schema.get("$defs", {}).values()]:
        assert set(node.get("required", [])) == set(node["properties"]), node


def test_bounds_are_asked_for_not_enforced() -> None:
    """A provider that ignores the bounds (or omits a list) is not failed for it."""
    long = {
        "summary": "s" * 5000,
        "entities": [{"name": f"E{i}"} for i in range(30)],
    }
    parsed = DocumentStructureOut.model_validate(long)
    assert len(parsed.entities) == 30 and parsed.sections == []


def test_a_batch_schema_wants_exactly_one_answer_per_chunk() -> None:
    schema = batch_schema(3).model_json_schema()["properties"]["chunks"]
    assert (schema["minItems"], schema["maxItems"]) == (3, 3)
    assert batch_schema(3) is batch_schema(3)
    assert issubclass(batch_schema(3), ChunkBatchOut)
    assert max_answer_chars(batch_schema(2)) < max_answer_chars(batch_schema(4))  # type: ignore[operator]
