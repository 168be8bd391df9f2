"""A session's trajectory for a person: a line per iteration while it runs, markdown after.

- `iteration_line(data)` is the one line an `iteration_done` progress event (`rlm.engine`)
  becomes, in `memcity query` and in the `rlm_query` run's log alike: the iteration, its code
  (blocks, lines), the size of what the code printed, its sub-calls and searches, and the
  tokens and cost the query has spent so far.
- `read_trajectory(lake, session_id)` reads the trajectory the session left in the lake (the
  `rlms` logger's JSONL, `rlm_trajectories/<session_id>.jsonl`); a line that is not JSON is
  skipped and counted, never an error.
- `trajectory_markdown(entries)` renders it: per iteration the root model's prose, each code
  block and its output, the error it raised, the sub-calls (`llm_query`) and searches it made,
  and the final answer. Every text is cut to a readable length, and the whole to `max_chars`
  (what is left out is said, with where the full trajectory lies): it is what the `rlm_sessions`
  materialization shows beside the answer in the UI.

An execution whose calls went past what the engine keeps (`rlm.engine.MAX_KEPT_CALLS`) says
how many more it made. Reading is forgiving: an entry written by an earlier version (no `tool_calls`), a runtime
fallback (two `metadata` entries in one file) or a missing field renders as far as it goes.
"""

import json
import re
from dataclasses import dataclass
from typing import Any

from memcity_pipeline.lake.files import get_bytes
from memcity_pipeline.lake.location import Lake
from memcity_pipeline.lake.tables import trajectory_key

CODE_CHARS = 1_500
OUTPUT_CHARS = 1_000
PROSE_CHARS = 600
CALL_CHARS = 160
CALLS_SHOWN = 5
MAX_CHARS = 40_000


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def _money(cost: float | None) -> str:
    return "cost n/a" if cost is None else f"${cost:.4f}"


def iteration_line(data: dict[str, Any]) -> str:
    """One `iteration_done` event as a line: `iteration 3: 2 code blocks (14 lines), printed
    1,234 chars, 4 sub-calls, 1 search, 5.3 s · so far 9 sub-calls, 1,830 tokens, $0.0012`."""
    blocks = int(data.get("code_blocks", 0))
    parts = [
        f"{_plural(blocks, 'code block')} ({_plural(int(data.get('code_lines', 0)), 'line')})"
        if blocks
        else "no code"
    ]
    if blocks:
        parts.append(f"printed {_plural(int(data.get('output_chars', 0)), 'char')}")
    if data.get("errors"):
        parts.append(_plural(int(data["errors"]), "error"))
    parts.append(_plural(int(data.get("sub_calls", 0)), "sub-call"))
    if data.get("search_calls"):
        parts.append(_plural(int(data["search_calls"]), "search", "searches"))
    parts.append(f"{float(data.get('seconds', 0.0)):.1f} s")
    line = f"iteration {data.get('iteration', '?')}: {', '.join(parts)}"
    if data.get("final"):
        line += ", FINAL"
    so_far = [
        _plural(int(data.get("total_sub_calls", 0)), "sub-call"),
        _plural(int(data.get("tokens", 0)), "token"),
        _money(data.get("cost_usd")),
    ]
    return f"{line} · so far {', '.join(so_far)}"


@dataclass(frozen=True)
class Trajectory:
    """The entries of a session's trajectory file, and how many lines were not JSON."""

    entries: list[dict[str, Any]]
    skipped_lines: int = 0
    location: str | None = None


def parse_trajectory(text: str, location: str | None = None) -> Trajectory:
    """The JSON object lines of a trajectory file (others counted in `skipped_lines`)."""
    entries, skipped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            skipped += 1
    return Trajectory(entries, skipped, location)


def read_trajectory(lake: Lake | str, session_id: str) -> Trajectory | None:
    """The trajectory of a session, or None when the lake holds none for it."""
    lake = Lake.of(lake)
    key = trajectory_key(session_id)
    data = get_bytes(lake, key)
    if data is None:
        return None
    return parse_trajectory(data.decode("utf-8", errors="replace"), lake.join(key))


def cut(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying how much was left out."""
    if len(text.rstrip()) <= limit:
        return text.rstrip()
    return f"{text[:limit].rstrip()}\n… ({len(text) - limit:,} more characters)"


def _one_line(text: str, limit: int = CALL_CHARS) -> str:
    """`text` on one line, cut to `limit`, safe inside markdown inline code."""
    flat = " ".join(str(text).split())
    if len(flat) > limit:
        flat = flat[: limit - 1].rstrip() + "…"
    return flat.replace("`", "'")


def fenced(text: str, language: str = "") -> str:
    """`text` in a code fence longer than any run of backticks inside it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def _prose(response: str) -> str:
    """The root model's reply without its code blocks."""
    return re.sub(r"```[^\n]*\n.*?\n```", "", response or "", flags=re.DOTALL).strip()


def _sub_call_line(call: dict[str, Any]) -> str:
    model = call.get("root_model") or "?"
    seconds = call.get("execution_time")
    took = f" · {seconds:.1f} s" if isinstance(seconds, int | float) else ""
    meta = call.get("metadata") or {}
    notes = []
    if isinstance(meta, dict) and meta.get("cache_hit"):
        notes.append("from the cache")
    if isinstance(meta, dict) and meta.get("iterations"):
        notes.append(f"a child RLM, {_plural(len(meta['iterations']), 'iteration')}")
    note = f" ({', '.join(notes)})" if notes else ""
    return (
        f"- `{model}`{took}{note}: `{_one_line(call.get('prompt') or '')}` → "
        f"`{_one_line(call.get('response') or '')}`"
    )


def _tool_call_line(call: dict[str, Any]) -> str:
    if call.get("tool") != "search":
        return f"- `{call.get('tool')}`"
    k = f", k={call['k']}" if call.get("k") is not None else ""
    outcome = (
        f"error: {_one_line(call['error'])}"
        if call.get("error")
        else _plural(int(call.get("hits") or 0), "hit")
    )
    query = call.get("query")
    asked = f"`{_one_line(query)}`" if isinstance(query, str) else "(no text query)"
    return f"- search {asked}{k} → {outcome}"


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _listed(title: str, lines: list[str], left_out: int = 0) -> list[str]:
    """Up to `CALLS_SHOWN` lines under a title with the count; `left_out`: calls made that the
    trajectory does not keep (past the engine's `MAX_KEPT_CALLS`)."""
    if not lines and not left_out:
        return []
    shown = lines[:CALLS_SHOWN]
    more = len(lines) - len(shown)
    notes = [f"- … and {more:,} more"] if more else []
    if left_out:
        notes.append(f"- … and {left_out:,} more the trajectory does not keep")
    return [f"{title} ({len(lines) + left_out:,}):", *shown, *notes, ""]


def is_closing_answer(entry: dict[str, Any]) -> bool:
    """The entry `rlms` logs when the iterations ran out: the root model asked for its best
    answer, no code, the answer as the entry's own `final_answer`."""
    return (
        entry.get("final_answer") is not None
        and not entry.get("code_blocks")
        and entry.get("iteration_time") is None
    )


def iteration_markdown(entry: dict[str, Any], language: str = "python") -> str:
    """One iteration of the trajectory as markdown."""
    if is_closing_answer(entry):
        answer = cut(str(entry["final_answer"]), PROSE_CHARS)
        return "\n".join(
            ["### The best answer when the iterations ran out", "", *answer.splitlines(), ""]
        )
    blocks = [b for b in entry.get("code_blocks") or [] if isinstance(b, dict)]
    seconds = entry.get("iteration_time")
    took = f" · {seconds:.1f} s" if isinstance(seconds, int | float) else ""
    lines = [f"### Iteration {entry.get('iteration', '?')}{took}", ""]
    prose = _prose(entry.get("response") or "")
    if prose:
        lines += ["> " + ln for ln in cut(prose, PROSE_CHARS).splitlines()] + [""]
    for n, block in enumerate(blocks, start=1):
        result = block.get("result") or {}
        code = str(block.get("code") or "")
        if len(blocks) > 1:
            lines += [f"**Code block {n}**", ""]
        lines += [fenced(cut(code, CODE_CHARS), language), ""]
        stdout = str(result.get("stdout") or "")
        stderr = str(result.get("stderr") or "")
        if stdout.strip():
            lines += [f"Output ({len(stdout):,} chars):", "", fenced(cut(stdout, OUTPUT_CHARS))]
            lines.append("")
        if stderr.strip():
            lines += ["Error:", "", fenced(cut(stderr, OUTPUT_CHARS)), ""]
        sub_calls = [_sub_call_line(c) for c in result.get("rlm_calls") or []]
        searches = [_tool_call_line(c) for c in result.get("tool_calls") or []]
        lines += _listed("Sub-calls", sub_calls, _count(result.get("sub_calls_left_out")))
        lines += _listed("Searches", searches, _count(result.get("searches_left_out")))
        if result.get("final_answer") is not None:
            lines += [f"**FINAL**: {_one_line(result['final_answer'], PROSE_CHARS)}", ""]
    if not blocks:
        lines += ["_(no code)_", ""]
    return "\n".join(lines)


def trajectory_markdown(
    trajectory: Trajectory, *, runtime: str | None = "python", max_chars: int = MAX_CHARS
) -> str:
    """The trajectory as markdown, at most about `max_chars` characters (later iterations are
    left out first, and the text says so); code is labelled in the language of `runtime` (the
    session's `runtime_used`)."""
    language = "javascript" if runtime == "bun" else "python"
    iterations = [e for e in trajectory.entries if e.get("type") == "iteration"]
    attempts = sum(1 for e in trajectory.entries if e.get("type") == "metadata")
    where = f" (`{trajectory.location}`)" if trajectory.location else ""
    turns = sum(1 for e in iterations if not is_closing_answer(e))
    head = [f"**{_plural(turns, 'iteration')}**{where}"]
    if attempts > 1:
        head.append(
            f"_{attempts} attempts (the runtime failed and the query ran again on python): "
            "the iterations of both are shown in order._"
        )
    if trajectory.skipped_lines:
        head.append(f"_{_plural(trajectory.skipped_lines, 'line')} of the file could not be read._")
    text = "\n\n".join(head) + "\n\n"
    for shown, entry in enumerate(iterations):
        part = iteration_markdown(entry, language)
        if len(text) + len(part) > max_chars and shown:
            left = len(iterations) - shown
            text += (
                f"_… {_plural(left, 'more iteration')} left out here; the whole trajectory is "
                f"in the lake{where}._\n"
            )
            break
        text += part + "\n"
    if not iterations:
        text += "_(no iteration ran)_\n"
    return text
