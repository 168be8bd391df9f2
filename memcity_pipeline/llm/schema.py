"""Bounded answer schemas: every string and list an LLM writes has a size limit, so it ends.

A model that answers under a grammar (the embedded llama.cpp server turns the JSON schema of a
structured call into one) can run on inside a string until its token limit cuts the answer,
which then is not JSON. With `maxLength` on every string and `maxItems` on every list, the
grammar closes each one in time, and `max_answer_chars` gives the longest answer the schema
allows: a token limit at least that large never cuts a valid answer.

The bounds are in the JSON schema only (`json_schema_extra`), not in validation: a provider
that ignores them and answers longer is not failed for it; the code keeps what it needs. Likewise
`ask_for_every_field` lists every property as required in the schema (a small model skips the
optional ones), while validation still accepts an answer without the defaulted ones.
"""

from typing import Any

from pydantic import BaseModel, Field

# The longest JSON text of a scalar of each type (an int64, a float in exponent form, ...).
_SCALAR_CHARS = {"integer": 12, "number": 24, "boolean": 5, "null": 4}


def text(max_chars: int, description: str | None = None, *, default: Any = ...) -> Any:
    """A string field of at most `max_chars` characters (in the schema); required unless a
    `default` is given."""
    return Field(default, description=description, json_schema_extra={"maxLength": max_chars})


def items(max_items: int, *, item_chars: int | None = None, description: str | None = None) -> Any:
    """A list field (empty by default) of at most `max_items` items (in the schema); with
    `item_chars`, a list of strings of at most that many characters each."""
    bounds: dict[str, Any] = {"maxItems": max_items}
    if item_chars is not None:
        bounds["items"] = {"type": "string", "maxLength": item_chars}
    return Field(default_factory=list, description=description, json_schema_extra=bounds)


def ask_for_every_field(schema: dict[str, Any]) -> None:
    """`json_schema_extra` of a model: every property is required in its JSON schema."""
    schema["required"] = list(schema.get("properties", {}))


def max_answer_chars(model: type[BaseModel]) -> int | None:
    """The length of the longest JSON answer `model`'s schema allows (values at their bounds,
    one space between tokens), or None when a string or list in it has no bound."""
    schema = model.model_json_schema()
    return _max_chars(schema, schema.get("$defs", {}))


def _max_chars(node: dict[str, Any], defs: dict[str, Any]) -> int | None:
    if "$ref" in node:
        return _max_chars(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    options = node.get("anyOf") or node.get("oneOf")
    if options:
        sizes = [_max_chars(o, defs) for o in options]
        return None if None in sizes else max(s for s in sizes if s is not None)
    if "enum" in node:
        return max(len(str(v)) + 2 for v in node["enum"])
    kind = node.get("type")
    if kind == "string":
        return node["maxLength"] + 2 if "maxLength" in node else None
    if kind == "array":
        item = _max_chars(node.get("items", {}), defs)
        if item is None or "maxItems" not in node:
            return None
        return 2 + node["maxItems"] * (item + 2)
    if kind == "object":
        total = 2
        for name, prop in node.get("properties", {}).items():
            value = _max_chars(prop, defs)
            if value is None:
                return None
            total += len(name) + 6 + value
        return total
    return _SCALAR_CHARS.get(str(kind))
