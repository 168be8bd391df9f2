"""The trajectory as a person reads it: the line per iteration, and the markdown of a session.

The end-to-end cases (a real query's progress lines, the trajectory it leaves in the lake, the
`rlm_sessions` materialization and `memcity sessions --trajectory`) are in `test_search.py`
and `test_rlm.py`; here the rendering itself, on trajectories written as the rlms logger
writes them.
"""

import json
from pathlib import Path
from typing import Any

from memcity_pipeline.lake.files import put_bytes
from memcity_pipeline.lake.tables import trajectory_key
from memcity_pipeline.rlm.trajectory import (
    MAX_CHARS,
    OUTPUT_CHARS,
    Trajectory,
    iteration_line,
    parse_trajectory,
    read_trajectory,
    trajectory_markdown,
)


def iteration(n: int, code: str, stdout: str = "", **result: Any) -> dict[str, Any]:
    """An iteration entry as the rlms logger writes it (one code block)."""
    return {
        "type": "iteration",
        "iteration": n,
        "timestamp": "2026-12-07T10:00:00",
        "prompt": [{"role": "user", "content": "the whole history"}],
        "response": f"Let me look at step {n}.\n```repl\n{code}\n```",
        "code_blocks": [
            {
                "code": code,
                "result": {
                    "stdout": stdout,
                    "stderr": result.pop("stderr", ""),
                    "locals": {},
                    "execution_time": 0.2,
                    "rlm_calls": result.pop("rlm_calls", []),
                    "final_answer": result.pop("final_answer", None),
                    **result,
                },
            }
        ],
        "final_answer": None,
        "iteration_time": 1.25,
    }


def sub_call(prompt: str, response: str, **metadata: Any) -> dict[str, Any]:
    call: dict[str, Any] = {
        "root_model": "sub-model",
        "prompt": prompt,
        "response": response,
        "usage_summary": {"model_usage_summaries": {}},
        "execution_time": 0.5,
    }
    if metadata:
        call["metadata"] = metadata
    return call


def test_the_iteration_line_says_what_the_iteration_did_and_the_spend_so_far() -> None:
    line = iteration_line(
        {
            "iteration": 3,
            "seconds": 5.26,
            "code_blocks": 2,
            "code_lines": 14,
            "output_chars": 1234,
            "errors": 1,
            "sub_calls": 4,
            "search_calls": 1,
            "final": False,
            "total_sub_calls": 9,
            "tokens": 1830,
            "cost_usd": 0.00123,
        }
    )
    assert line == (
        "iteration 3: 2 code blocks (14 lines), printed 1,234 chars, 1 error, 4 sub-calls, "
        "1 search, 5.3 s · so far 9 sub-calls, 1,830 tokens, $0.0012"
    )
    quiet = iteration_line(
        {"iteration": 1, "seconds": 0.4, "code_blocks": 0, "final": True, "cost_usd": None}
    )
    assert quiet == (
        "iteration 1: no code, 0 sub-calls, 0.4 s, FINAL · so far 0 sub-calls, 0 tokens, cost n/a"
    )


def test_the_markdown_shows_code_output_sub_calls_searches_and_the_final_answer() -> None:
    long_output = "".join(f"line {i}\n" for i in range(1000))
    code = 'print("```")\nparts = llm_query_batched([a, b])'
    entries = [
        {"type": "metadata", "root_model": "root-model"},
        iteration(
            1,
            code,
            long_output,
            rlm_calls=[
                sub_call(f"Summarise part {i}:\n{'word ' * 100}", f"part {i}") for i in range(7)
            ],
            tool_calls=[
                {"tool": "search", "query": "vault code", "k": 5, "hits": 5, "seconds": 0.1},
                {"tool": "search", "query": "x", "k": 0, "error": "k must be from 1 to 50"},
            ],
        ),
        iteration(2, "undefined_name", stderr="NameError: name 'undefined_name' is not defined"),
        iteration(
            3,
            "FINAL_VAR('answer')",
            rlm_calls=[sub_call("cached?", "yes", cache_hit=True)],
            final_answer="The code is 7741.",
        ),
    ]
    text = trajectory_markdown(Trajectory(entries, location="/lake/rlm_trajectories/s1.jsonl"))

    assert text.startswith("**3 iterations** (`/lake/rlm_trajectories/s1.jsonl`)")
    assert "### Iteration 1 · 1.2 s" in text and "### Iteration 3" in text
    assert "> Let me look at step 1." in text  # the prose, without the code block
    # code holding a fence is fenced with a longer one, so the markdown stays whole
    assert '````python\nprint("```")\nparts = llm_query_batched([a, b])\n````' in text
    assert f"Output ({len(long_output):,} chars):" in text
    assert f"({len(long_output) - OUTPUT_CHARS:,} more characters)" in text
    assert "line 999" not in text
    assert "Sub-calls (7):" in text and "- … and 2 more" in text
    assert "`Summarise part 0: word word" in text and "→ `part 0`" in text
    assert "(from the cache)" in text
    assert "- search `vault code`, k=5 → 5 hits" in text
    assert "- search `x`, k=0 → error: k must be from 1 to 50" in text
    assert "Error:\n\n```\nNameError: name 'undefined_name' is not defined\n```" in text
    assert "**FINAL**: The code is 7741." in text
    assert "the whole history" not in text  # the prompt history is not repeated


def test_a_long_trajectory_is_cut_and_says_where_the_rest_is() -> None:
    entries = [iteration(n, f"step_{n} = {n}", "x" * 900) for n in range(1, 201)]
    text = trajectory_markdown(Trajectory(entries, location="s3://lake/t.jsonl"))
    assert len(text) <= MAX_CHARS + 1000
    shown = text.count("### Iteration ")
    assert 10 < shown < 200
    assert f"… {200 - shown} more iterations left out here" in text
    assert "`s3://lake/t.jsonl`" in text


def test_the_answer_asked_for_when_the_iterations_ran_out_is_shown_as_such() -> None:
    closing = {
        "type": "iteration",
        "iteration": 3,
        "prompt": [],
        "response": "My best guess is 12.",
        "code_blocks": [],
        "final_answer": "My best guess is 12.",
        "iteration_time": None,
    }
    text = trajectory_markdown(Trajectory([iteration(1, "x = 1"), iteration(2, "y = 2"), closing]))
    assert text.startswith("**2 iterations**")
    assert "### The best answer when the iterations ran out\n\nMy best guess is 12." in text
    assert "### Iteration 3" not in text


def test_a_child_rlm_and_a_runtime_fallback_are_named() -> None:
    child = sub_call("count the ferries", "3", iterations=[{}, {}])
    entries = [
        {"type": "metadata"},
        iteration(1, "await boom()", stderr="the REPL died"),
        {"type": "metadata"},
        iteration(1, "x = llm_query('count the ferries')", rlm_calls=[child]),
    ]
    text = trajectory_markdown(Trajectory(entries))
    assert "2 attempts (the runtime failed and the query ran again on python)" in text
    assert "(a child RLM, 2 iterations)" in text


def test_reading_a_trajectory_skips_broken_lines(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    lines = [
        json.dumps({"type": "metadata"}),
        "{not json",
        json.dumps([1, 2]),
        json.dumps(iteration(1, "print(1)", "1\n")),
    ]
    put_bytes(str(lake), trajectory_key("s1"), "\n".join(lines).encode())
    found = read_trajectory(str(lake), "s1")
    assert found is not None
    assert [e["type"] for e in found.entries] == ["metadata", "iteration"]
    assert found.skipped_lines == 2
    assert found.location is not None and found.location.endswith("rlm_trajectories/s1.jsonl")
    assert "2 lines of the file could not be read" in trajectory_markdown(found)
    assert read_trajectory(str(lake), "missing") is None
    assert parse_trajectory("").entries == []
    assert "_(no iteration ran)_" in trajectory_markdown(parse_trajectory(""))
