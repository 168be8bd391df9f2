"""The prompts of the RLM query engine: our system prompt and the context metadata message.

The root LLM never sees the context itself: only its type, size in characters, item count,
length statistics and one short sample (at most `SAMPLE_CHARS` characters). When the REPL has
`search` (a `documents` or `memories` context), `system_prompt` describes it, and a capped
context's metadata says how many items the cap left out and that `search` reaches them all.
"""

import json
import textwrap
from dataclasses import dataclass
from typing import Any

from memcity_pipeline.rlm.tools import MAX_SEARCH_K

SAMPLE_CHARS = 300

# How to work, in either language.
_HOW_TO_WORK = """
How to work:
1. Probe the context first (type, length, a few items). Do not answer on turn 1.
2. Filter with {language} where keywords or structure suffice; hand chunks of text to
   `llm_query_batched` when the question needs reading or judgement (a few large prompts,
   not hundreds of tiny ones). Keep intermediate results in variables.
3. Combine the results in code, check them, then call `FINAL(...)` or `FINAL_VAR(...)` inside
   a ```repl block. The answer must address the query directly and be self-contained.
Write one ```repl block per turn and keep your prose short."""

SYSTEM_PROMPT = """\
You answer a query about a large context that lives in a Python REPL, not in this conversation.
You see only a description of the context. You explore it by writing Python code; the REPL runs
your code and shows you what it printed. The REPL keeps its variables from turn to turn.

To run code, write it in a fenced block whose language is `repl`:
```repl
print(len(context))
print(context[0][:500])
```

Available in the REPL:
- `context`: the data (a `str`, or a `list` of items, usually strings).
- `llm_query(prompt) -> str`: ask a sub-LLM one question; give it the text it needs, since it
  cannot see the REPL. It reads about 100,000 characters well.
- `llm_query_batched(prompts) -> list[str]`: ask many sub-LLM questions at once (they run
  concurrently); answers come back in order. Prefer it to a loop of `llm_query`.
- `SHOW_VARS()`: returns the variables you created so far.
- `print(...)`: the only way to see a value; long output is cut, so print samples and counts.
- `FINAL(answer)`: ends the task with `answer` (a string) as the final answer.
- `FINAL_VAR("name")`: ends the task with the value of the REPL variable `name`.
""" + _HOW_TO_WORK.format(language="Python")


JS_SYSTEM_PROMPT = """\
You answer a query about a large context that lives in a JavaScript REPL, not in this
conversation. You see only a description of the context. You explore it by writing JavaScript
code; the REPL runs your code and shows you what it printed. The REPL keeps its variables from
turn to turn (top-level `const`, `let`, `var`, functions and classes all persist, and a later
turn may declare the same name again).

To run code, write it in a fenced block whose language is `repl`:
```repl
console.log(context.length);
console.log(context[0].slice(0, 500));
```

Available in the REPL (top-level `await` works):
- `context`: the data (a string, or an array of items, usually strings).
- `await llm_query(prompt)` -> string: ask a sub-LLM one question; give it the text it needs,
  since it cannot see the REPL. It reads about 100,000 characters well.
- `await llm_query_batched(prompts)` -> array of strings: ask many sub-LLM questions at once
  (they run concurrently); answers come back in order. Prefer it to a loop of `llm_query`.
- `SHOW_VARS()`: returns the variables you created so far.
- `console.log(...)`: the only way to see a value; long output is cut, so print samples and
  counts.
- `FINAL(answer)`: ends the task with `answer` (a string) as the final answer.
- `FINAL_VAR("name")`: ends the task with the value of the REPL variable `name`.
There are no modules (`require`, `import`), no files, no network and no timers: plain
JavaScript (strings, arrays, Map, Set, JSON, RegExp, Math) and the functions above.
""" + _HOW_TO_WORK.format(language="JavaScript")
SYSTEM_PROMPTS = {"python": SYSTEM_PROMPT, "bun": JS_SYSTEM_PROMPT}

# What `search` reaches and what each hit holds, by context type.
_SEARCHED = {
    "documents": (
        "ALL the chunks of the knowledge base (the ones a cap left out of `context` too)",
        "{chunk_id, document_id, title, section, text, score}",
    ),
    "memories": (
        "ALL the user's memories (the ones a cap left out of `context` too)",
        "{memory_id, text, created_at, score}",
    ),
}
_SEARCH_CALL = {
    "python": "`search(query, k=10) -> list[dict]`",
    "bun": "`await search(query, k = 10)` -> array of objects",
}
_SEARCH_ANCHOR = "- `SHOW_VARS()`"


def system_prompt(runtime: str, search: str | None = None) -> str:
    """The built-in system prompt of `runtime`; with `search` (the context type `search`
    covers: `documents` or `memories`), it describes the REPL's `search` function too."""
    prompt = SYSTEM_PROMPTS[runtime]
    if search not in _SEARCHED:
        return prompt
    what, fields = _SEARCHED[search]
    text = (
        f"{_SEARCH_CALL[runtime]}: hybrid search (keywords and meaning) over {what}; "
        f"returns the `k` (at most {MAX_SEARCH_K}) best hits, best first, each `{fields}`. Use it to "
        "find the items about a name or a fact without reading everything."
    )
    line = textwrap.fill(text, 96, initial_indent="- ", subsequent_indent="  ") + "\n"
    at = prompt.index(_SEARCH_ANCHOR)
    return prompt[:at] + line + prompt[at:]


@dataclass(frozen=True)
class ContextMetadata:
    """What the root LLM may know about the context."""

    context_type: str  # memories | documents | conversation | custom
    value_type: str  # str | list
    chars: int
    items: int
    item_min_chars: int
    item_max_chars: int
    sample: str
    truncated: bool = False
    total_available: int = 0
    cap_note: str | None = None  # what a cap kept: "the most recent 1,000 of 1,200 memories"
    searchable: bool = False  # the REPL's `search` reaches every item, the capped ones too

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form (for the session log)."""
        return dict(self.__dict__)


def _item_chars(item: Any) -> int:
    return len(item) if isinstance(item, str) else len(json.dumps(item, default=str))


def _short(text: str, limit: int = SAMPLE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def describe_context(
    context_type: str,
    payload: str | list[Any],
    *,
    truncated: bool = False,
    total: int = 0,
    cap_note: str | None = None,
    searchable: bool = False,
) -> ContextMetadata:
    """Metadata of a context: type, sizes and a short sample, never the whole of it.
    `searchable` says that the REPL's `search` reaches every item of the context's source."""
    if isinstance(payload, str):
        return ContextMetadata(
            context_type,
            "str",
            len(payload),
            1,
            len(payload),
            len(payload),
            _short(payload),
            truncated,
            total or 1,
            cap_note,
            searchable,
        )
    sizes = [_item_chars(item) for item in payload] or [0]
    first = payload[0] if payload else ""
    sample = first if isinstance(first, str) else json.dumps(first, default=str)
    return ContextMetadata(
        context_type,
        "list",
        sum(sizes),
        len(payload),
        min(sizes),
        max(sizes),
        _short(sample),
        truncated,
        total or len(payload),
        cap_note,
        searchable,
    )


CONTEXT_KINDS = {
    "memories": "a user's memories, one string per memory: `[memory id | date] text`",
    "documents": "the chunks of a knowledge base, one string per chunk: "
    "`[document id#chunk number | section]` then the text",
    "conversation": "a user's conversation sessions, one transcript string per session",
    "custom": "data supplied with the query",
}


def metadata_message(meta: ContextMetadata, query: str) -> str:
    """The first user message: the query and the description of the context."""
    if meta.value_type == "str":
        shape = f"a string of {meta.chars:,} characters"
    else:
        shape = (
            f"a list of {meta.items:,} items, {meta.chars:,} characters in total "
            f"(items of {meta.item_min_chars:,} to {meta.item_max_chars:,} characters)"
        )
    lines = [
        f"Query: {query}",
        "",
        f"The REPL variable `context` holds {CONTEXT_KINDS.get(meta.context_type, 'data')}.",
        f"It is {shape}.",
    ]
    if meta.truncated:
        kept = meta.cap_note or f"the first {meta.items:,} of {meta.total_available:,} items"
        left = max(meta.total_available - meta.items, 0)
        lines.append(f"It holds {kept}: a cap left {left:,} out.")
        if meta.searchable:
            lines.append(
                f"`search(query)` searches all {meta.total_available:,}, the {left:,} left out "
                "included: use it to reach them."
            )
    label = "Start of the context" if meta.value_type == "str" else "First item"
    lines += ["", f"{label} (a sample, not the whole):", meta.sample]
    return "\n".join(lines)


def build_messages(system_prompt: str, meta: ContextMetadata, query: str) -> list[dict[str, str]]:
    """The opening messages of the root LLM's conversation."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": metadata_message(meta, query)},
    ]
