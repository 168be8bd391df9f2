"""`bench/rlm_quality.py` end to end on a scripted model: the tasks it makes score as they
should, the RLM and the direct call both run, the direct call gets the context cut to the
window (shorter again when the server refuses it), and every run and session is kept."""

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import polars as pl
import pytest

from memcity_pipeline.rlm.sessions import read_sessions
from tests.fixtures_sandbox import BWRAP
from tests.rlm.test_rlm import repl
from tests.scripted_llm_server import Fault, ScriptedLLMServer

BENCH = Path(__file__).resolve().parents[2] / "bench" / "rlm_quality.py"
WINDOW = 1_500  # tokens: the 8k tasks do not fit whole
REFUSED_ABOVE = 3_000  # the server's own limit, in characters, below the bench's estimate


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rlm_quality", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tasks_score_right_and_wrong_answers() -> None:
    bench = load_bench()
    needle = bench.needle_task(8_000, 1)
    assert len(needle.context) == 8_000 and needle.context.count("special magic number") == 1
    assert needle.score(f"It is {needle.truth:,}.") == 1.0 and needle.score("1234567") == 0.0

    counts = bench.aggregation_task(64_000, 1)
    assert sum(counts.truth.values()) == len(counts.context.splitlines())
    assert counts.score(json.dumps(counts.truth)) == 1.0
    off_by_two = {**counts.truth, "human": counts.truth["human"] + 2}
    assert counts.score(f"Here: {json.dumps(off_by_two)}") == pytest.approx((5 + 0.75**2) / 6)
    assert counts.score("about a hundred") == 0.0

    pairs = bench.pairs_task(64_000, 1)
    truth = pairs.truth
    assert len(truth) == len(pairs.context.splitlines()) // 40  # one pair in 40 users
    assert pairs.score("\n".join(f"{b}, {a}" for a, b in truth)) == 1.0  # order does not matter
    half = truth[: len(truth) // 2]
    expected = 2 * len(half) / (len(half) + len(truth))
    assert pairs.score("\n".join(f"{a}, {b}" for a, b in half)) == pytest.approx(expected)
    assert pairs.score("U00000, U11111") == 0.0
    # the same seed makes the same task; another seed another
    assert bench.pairs_task(64_000, 1).context == pairs.context
    assert bench.pairs_task(64_000, 2).context != pairs.context


@pytest.mark.skipif(not Path(BWRAP).exists(), reason="bubblewrap is not installed")
@pytest.mark.bwrap
def test_the_bench_runs_both_methods_and_keeps_every_run(
    scripted_llm: ScriptedLLMServer,
    memcity_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    direct_prompts: list[str] = []

    def responder(request: dict[str, Any]) -> Any:
        prompt = str(request["messages"][-1]["content"])
        if prompt.startswith("Context:\n"):  # the direct call
            if len(prompt) > REFUSED_ABOVE:
                return Fault(400, {"error": {"message": "maximum context length exceeded"}})
            direct_prompts.append(prompt)
            found = re.search(r"magic number for \w+ is (\d+)", prompt)
            return found.group(1) if found else "I cannot tell."
        return repl(
            "import re\n"
            "m = re.search(r'magic number for \\w+ is (\\d+)', context)\n"
            "FINAL(m.group(1) if m else 'not found')"
        )

    scripted_llm.responder = responder
    monkeypatch.setenv("MEMCITY_LLM_BASE_URL", scripted_llm.base_url)
    monkeypatch.setenv("MEMCITY_LLM_MODEL", "root-model")
    monkeypatch.setenv("MEMCITY_LLM_CONTEXT_WINDOW", str(WINDOW))
    monkeypatch.setenv("MEMCITY_LLM_MAX_RETRIES", "0")
    bench = load_bench()

    runs = bench.main(["--tasks", "needle,pairs", "--sizes", "8k", "--max-iterations", "2"])

    by = {(r.task, r.method): r for r in runs}
    assert sorted(by) == [
        ("needle", "direct"),
        ("needle", "rlm"),
        ("pairs", "direct"),
        ("pairs", "rlm"),
    ]
    # The RLM read the whole context in its sandbox and found the needle; on pairs it failed.
    needle = bench.needle_task(8_000, 7)
    assert by["needle", "rlm"].score == 1.0 and by["needle", "rlm"].status == "completed"
    assert by["needle", "rlm"].answer == str(needle.truth)
    assert by["pairs", "rlm"].score == 0.0 and by["pairs", "rlm"].answer == "not found"
    # The direct call got the head of the context, cut until the server took it.
    assert len(direct_prompts) == 2  # one accepted prompt per task, after refusals
    for prompt in direct_prompts:
        assert len(prompt) <= REFUSED_ABOVE and "[the context is cut here:" in prompt
    given = by["needle", "direct"].given_chars
    assert 0 < given < 8_000
    assert by["needle", "direct"].score == float(str(needle.truth) in needle.context[:given])
    assert by["needle", "direct"].status == "completed"

    # Every run is a line of results.jsonl; each RLM run a session of the lake, kept.
    lines = (memcity_home / "rlm_quality" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["method"] for line in lines] == [r.method for r in runs]
    sessions = read_sessions(memcity_home / "lake").filter(pl.col("org_id") == "rlm-quality")
    assert sorted(sessions["session_id"]) == sorted(r.session_id for r in runs if r.method == "rlm")
    printed = capsys.readouterr().out
    assert re.search(r"^needle\s+8k\s+rlm\s+1\s+1\.000\s+1/0/0/0", printed, re.MULTILINE), printed
    assert "rlm     mean score 0.500 over 2 runs" in printed
