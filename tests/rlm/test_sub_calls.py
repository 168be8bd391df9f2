"""Sub-calls (`llm_query` / `llm_query_batched`) as a user counts and pays for them: a prompt
answered before is served from the project's LLM cache, free; the figures of a query cover
every child RLM. Real OpenAI client against the scripted server, real local sandbox, a real
lake."""

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from memcity_pipeline.llm.client import LLMClient
from memcity_pipeline.resources.sandbox import SandboxResource
from memcity_pipeline.rlm.config import RLMResult
from memcity_pipeline.rlm.sessions import read_sessions
from tests.fixtures_sandbox import BWRAP
from tests.rlm.test_rlm import ROOT, SUB, Script, ask, lake, repl, sandbox  # noqa: F401
from tests.scripted_llm_server import ScriptedLLMServer, approx_tokens

pytestmark = [
    pytest.mark.skipif(not Path(BWRAP).exists(), reason="bubblewrap is not installed"),
    pytest.mark.bwrap,
]

BATCH = "answers = llm_query_batched(['tide at dawn?', 'tide at noon?', 'tide at dusk?'])"


def cached_client(server: ScriptedLLMServer, cache_dir: Path) -> LLMClient:
    """A client with the project's persistent (SQLite) LLM cache in `cache_dir`."""
    return LLMClient(
        base_url=server.base_url,
        api_key=None,
        model=ROOT,
        sub_model=SUB,
        cache_dir=cache_dir,
        max_concurrency=8,
        max_retries=0,
    )


def sub_requests(server: ScriptedLLMServer) -> list[dict[str, Any]]:
    return [r.body for r in server.chat_requests if r.body and r.body["model"] == SUB]


def row_of(lake_dir: Path, result: RLMResult) -> dict[str, Any]:
    rows = read_sessions(lake_dir).filter(pl.col("session_id") == result.session_id)
    return rows.row(0, named=True)


def test_a_repeated_batch_is_served_from_the_cache_free_against_the_budget(
    scripted_llm: ScriptedLLMServer,
    sandbox: SandboxResource,  # noqa: F811
    lake: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    cache = tmp_path / "llm-cache"
    script = Script(
        repl(BATCH, "Asking."),
        repl(f"first = answers\n{BATCH}\nprint(answers == first)", "Asking again."),
        repl("FINAL(' | '.join(answers))"),
        cost=0.01,
    )
    scripted_llm.responder = script
    # Three root calls and three sub-calls reach the server: $0.06. Without the cache the
    # second batch would cost $0.03 more and pass the budget.
    result = ask(
        scripted_llm,
        sandbox,
        "custom",
        custom_context="x",
        client=cached_client(scripted_llm, cache),
        rlm_config={"max_budget": 0.065},
    )
    assert result.status == "completed", result
    assert result.answer == "sub[tide at dawn?] | sub[tide at noon?] | sub[tide at dusk?]"
    assert "True" in str(script.root_prompts[2][-2]["content"])  # the same answers came back
    assert (result.total_sub_calls, result.sub_call_cache_hits) == (6, 3)
    assert len(script.sub_prompts) == 3  # the second batch never reached the LLM
    assert result.cost == pytest.approx(0.06)
    row = row_of(lake, result)
    assert (row["sub_calls"], row["sub_call_cache_hits"]) == (6, 3)
    assert row["cost_usd"] == pytest.approx(0.06)
    # The trajectory marks the answers that came from the cache.
    assert result.trajectory_path is not None
    lines = Path(result.trajectory_path).read_text().splitlines()
    second = json.loads(lines[2])["code_blocks"][0]["result"]["rlm_calls"]
    assert [c["metadata"] for c in second] == [{"cache_hit": True}] * 3

    # The cache is the project's and persists: a later query (a new client on the same cache)
    # gets the whole batch from it, at no cost for its sub-calls.
    script = Script(repl(BATCH, "Asking."), repl("FINAL(answers[0])"), cost=0.01)
    scripted_llm.responder = script
    again = ask(
        scripted_llm,
        sandbox,
        "custom",
        custom_context="y",
        client=cached_client(scripted_llm, cache),
    )
    assert again.status == "completed" and again.answer == "sub[tide at dawn?]"
    assert (again.total_sub_calls, again.sub_call_cache_hits) == (3, 3)
    assert script.sub_prompts == [] and again.cost == pytest.approx(0.02)


def test_the_cache_is_off_when_asked_or_when_sub_calls_sample(
    scripted_llm: ScriptedLLMServer,
    sandbox: SandboxResource,  # noqa: F811
    lake: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    cache = tmp_path / "llm-cache"
    for config in ({}, {"cache_sub_calls": False}, {"sub_temperature": 0.7}):
        scripted_llm.responder = Script(repl(BATCH, "Asking."), repl("FINAL(answers[0])"))
        result = ask(
            scripted_llm,
            sandbox,
            "custom",
            custom_context="x",
            client=cached_client(scripted_llm, cache),
            rlm_config=config,
        )
        assert result.status == "completed", result
        assert result.total_sub_calls == 3
        # The first query fills the cache; asked off, or sampling, a query calls the LLM.
        assert result.sub_call_cache_hits == 0
    temperatures = [body["temperature"] for body in sub_requests(scripted_llm)]
    assert temperatures == [0.0] * 6 + [0.7] * 3
    # Sampling with the cache asked for explicitly: the answers of that temperature are reused.
    scripted_llm.responder = Script(repl(BATCH, "Asking."), repl("FINAL(answers[0])"))
    result = ask(
        scripted_llm,
        sandbox,
        "custom",
        custom_context="x",
        client=cached_client(scripted_llm, cache),
        rlm_config={"sub_temperature": 0.7, "cache_sub_calls": True},
    )
    assert result.sub_call_cache_hits == 0  # the 0.7 answers above were not kept
    scripted_llm.responder = Script(repl(BATCH, "Asking."), repl("FINAL(answers[0])"))
    result = ask(
        scripted_llm,
        sandbox,
        "custom",
        custom_context="x",
        client=cached_client(scripted_llm, cache),
        rlm_config={"sub_temperature": 0.7, "cache_sub_calls": True},
    )
    assert result.sub_call_cache_hits == 3


# -- the tree of child RLMs (max_depth 2 and 3) ---------------------------------------------------


class Tally(Script):
    """The script's replies, recorded, so a test can add up what the server counted."""

    def __init__(self, *root: str, cost: float | None = None) -> None:
        super().__init__(*root, cost=cost)
        self.tokens = [0, 0]

    def __call__(self, request: dict[str, Any]) -> Any:
        reply = super().__call__(request)
        content = reply["choices"][0]["message"]["content"] if isinstance(reply, dict) else reply
        prompt = " ".join(str(m.get("content") or "") for m in request["messages"])
        self.tokens[0] += approx_tokens(prompt)
        self.tokens[1] += approx_tokens(str(content))
        return reply


CHILD = "n = llm_query('how many words: ' + context)\nFINAL(n)"


def test_at_depth_2_the_figures_cover_every_child_rlm(
    scripted_llm: ScriptedLLMServer,
    sandbox: SandboxResource,  # noqa: F811
    lake: Path,  # noqa: F811
) -> None:
    script = Tally(
        repl("a = llm_query('count: a b c')\nb = llm_query('count: d e')\nprint(a, b)"),
        repl(CHILD),  # the child RLM answering 'count: a b c'
        repl(CHILD),  # and the one answering 'count: d e'
        repl("FINAL(a + ' / ' + b)"),
        cost=0.01,
    )
    scripted_llm.responder = script
    result = ask(scripted_llm, sandbox, "custom", custom_context="x", rlm_config={"max_depth": 2})
    assert result.status == "completed", result
    assert result.answer == "sub[how many words: count: a b c] / sub[how many words: count: d e]"
    # Six LLM calls: four root turns (two of the root, one per child) and the children's two
    # sub-calls; the root's two llm_query calls were answered by the children.
    assert len(scripted_llm.chat_requests) == 6 and len(script.sub_prompts) == 2
    assert result.total_sub_calls == 4
    assert result.iterations == 4
    assert result.depth_reached == 2
    assert result.cost == pytest.approx(0.06)
    assert [result.prompt_tokens, result.completion_tokens] == script.tokens
    row = row_of(lake, result)
    assert (row["sub_calls"], row["iterations"], row["depth_reached"]) == (4, 4, 2)
    assert row["cost_usd"] == pytest.approx(0.06)
    assert [row["prompt_tokens"], row["completion_tokens"]] == script.tokens

    # The same question at depth 1: llm_query is a plain call, the depth reached is 1.
    scripted_llm.responder = Script(repl("a = llm_query('count: a b c')\nFINAL(a)"))
    flat = ask(scripted_llm, sandbox, "custom", custom_context="x")
    assert (flat.total_sub_calls, flat.iterations, flat.depth_reached) == (1, 1, 1)
    assert row_of(lake, flat)["depth_reached"] == 1


def test_the_budget_counts_the_children_s_calls(
    scripted_llm: ScriptedLLMServer,
    sandbox: SandboxResource,  # noqa: F811
    lake: Path,  # noqa: F811
) -> None:
    script = Script(
        repl("a = llm_query('count: a b c')\nb = llm_query('count: d e')\nprint(a, b)"),
        repl(CHILD),
        repl(CHILD),
        repl("FINAL('never')"),
        cost=0.01,
    )
    scripted_llm.responder = script
    result = ask(
        scripted_llm,
        sandbox,
        "custom",
        custom_context="x",
        rlm_config={"max_depth": 2, "max_budget": 0.035},
    )
    # The root's own calls cost $0.01; its first child spent $0.02 and the second $0.01 before
    # the budget stopped it: the query stops there, on the tree's spend, without a second turn.
    assert result.status == "partial", result
    assert "Budget exceeded after iteration 1" in (result.warning or "")
    assert "child RLMs included" in (result.warning or "")
    assert result.cost == pytest.approx(0.04)
    assert len(script.root_prompts) == 3  # root turn 1 and one turn per child, no root turn 2
    assert result.depth_reached == 2
    assert result.total_sub_calls == 2  # the first child's answer and its own sub-call
    assert row_of(lake, result)["cost_usd"] == pytest.approx(0.04)


def test_at_depth_3_a_grandchild_counts_too(
    scripted_llm: ScriptedLLMServer,
    sandbox: SandboxResource,  # noqa: F811
    lake: Path,  # noqa: F811
) -> None:
    script = Script(
        repl("a = llm_query('level one')\nprint(a)"),
        repl("b = llm_query('level two: ' + context)\nFINAL(b)"),  # the child
        repl(CHILD),  # the grandchild: its llm_query is a plain sub-call
        repl("FINAL(a)"),
    )
    scripted_llm.responder = script
    result = ask(scripted_llm, sandbox, "custom", custom_context="x", rlm_config={"max_depth": 3})
    assert result.status == "completed", result
    assert result.answer == "sub[how many words: level two: lev]"  # its first 30 characters
    assert (result.total_sub_calls, result.iterations, result.depth_reached) == (3, 4, 3)
    row = row_of(lake, result)
    assert (row["sub_calls"], row["iterations"], row["depth_reached"]) == (3, 4, 3)


def test_past_what_an_execution_keeps_calls_are_answered_and_counted_not_kept(
    scripted_llm: ScriptedLLMServer,
    sandbox: SandboxResource,  # noqa: F811
    lake: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from memcity_pipeline.rlm import engine
    from memcity_pipeline.rlm.trajectory import read_trajectory, trajectory_markdown

    monkeypatch.setattr(engine, "MAX_KEPT_CALLS", 3)  # the code makes 5 of each
    script = Script(
        repl(
            "answers = [llm_query(f'ferry {i}?') for i in range(5)]\n"
            "for i in range(5):\n"
            "    try:\n"
            "        search('ferry')\n"
            "    except RuntimeError:\n"
            "        pass\n"
            "print(len(answers))",
            "Asking.",
        ),
        repl("FINAL(answers[-1])"),
    )
    scripted_llm.responder = script
    events: list[dict[str, Any]] = []
    result = ask(
        scripted_llm,
        sandbox,
        "custom",
        custom_context="x",
        progress=lambda event, data: events.append(data) if event == "iteration_done" else None,
    )
    assert result.status == "completed" and result.answer == "sub[ferry 4?]", result
    assert result.total_sub_calls == 5  # every answered prompt counts
    assert (events[0]["sub_calls"], events[0]["search_calls"]) == (5, 2)  # 3 kept + 2 left out
    assert result.trajectory_path is not None
    first = json.loads(Path(result.trajectory_path).read_text().splitlines()[1])
    kept = first["code_blocks"][0]["result"]
    assert [c["prompt"] for c in kept["rlm_calls"]] == ["ferry 0?", "ferry 1?", "ferry 2?"]
    assert len(kept["tool_calls"]) == 3
    assert (kept["sub_calls_left_out"], kept["searches_left_out"]) == (2, 2)
    trajectory = read_trajectory(lake, result.session_id)
    assert trajectory is not None
    text = trajectory_markdown(trajectory)
    assert "Sub-calls (5):" in text and "- … and 2 more the trajectory does not keep" in text


def test_code_names_at_most_a_few_models(
    scripted_llm: ScriptedLLMServer,
    sandbox: SandboxResource,  # noqa: F811
    lake: Path,  # noqa: F811
) -> None:
    from memcity_pipeline.rlm.engine import MAX_SUB_MODELS

    script = Script(
        repl(
            "failed = []\n"
            "for i in range(20):\n"
            "    try:\n"
            "        llm_query('hi', model=f'model-{i}')\n"
            "    except RuntimeError as exc:\n"
            "        failed.append(str(exc))\n"
            "print(len(failed), failed[-1])",
            "Asking.",
        ),
        repl("FINAL('done')"),
        sub=lambda prompt: "fine",
    )
    scripted_llm.responder = script
    result = ask(scripted_llm, sandbox, "custom", custom_context="x")
    assert result.status == "completed", result
    printed = str(script.root_prompts[1][-2]["content"])
    # the root and sub models are two of them: six more names are served, the rest refused
    assert f"{20 - (MAX_SUB_MODELS - 2)} llm_query failed" in printed
    assert f"a query may name at most {MAX_SUB_MODELS} models" in printed
