"""Local sandbox overhead: a trivial statement per execution, and loading a 5,000-chunk context.

    python bench/sandbox.py [--runs 200] [--isolation bwrap|none]

Prints the median and p95 of one `execute("x = 1")` round trip next to a bare in-process
`exec` of the same statement measured in the same run (the ratio is what to compare across
machines), the session start time, and the time to load 5,000 chunks of about 1 KB each into a
session, through a file in the session directory and inline in the protocol message.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from memcity_pipeline.sandbox.local import LocalSandboxBackend

STATEMENT = "x = 1"


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bare_exec(runs: int) -> list[float]:
    """Seconds per in-process `exec` of the statement (compiled each time, as the server does)."""
    namespace: dict = {}
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        exec(compile(STATEMENT, "<bench>", "exec"), namespace)
        times.append(time.perf_counter() - started)
    return times


def context_chunks(n: int = 5000, size: int = 1000) -> list[dict]:
    """n chunks of about `size` characters."""
    body = ("The hive scale reports weight every ten minutes. " * (size // 48 + 1))[:size]
    return [{"chunk_id": f"c{i}", "document": f"doc{i // 20}", "text": body} for i in range(n)]


def answer(prompts: list[str], model: str | None) -> list[str]:
    """A host LLM handler that answers instantly."""
    return ["ok" for _ in prompts]


def line(label: str, values: list[float]) -> str:
    median, p95 = statistics.median(values), percentile(values, 0.95)
    return f"{label:<34} median {median * 1e3:8.3f} ms   p95 {p95 * 1e3:8.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--isolation", default="bwrap", choices=["bwrap", "none"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="memcity-bench-sandbox-") as root:
        backend = LocalSandboxBackend(Path(root), isolation=args.isolation)
        isolated = backend.isolated
        started = time.perf_counter()
        session = backend.open_session("bench", answer)
        start_s = time.perf_counter() - started
        with session:
            for _ in range(10):  # warm up
                session.execute(STATEMENT)
            sandbox = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                session.execute(STATEMENT)
                sandbox.append(time.perf_counter() - t0)
            bare = bare_exec(args.runs)

            chunks = context_chunks()
            megabytes = len(json.dumps(chunks)) / 1e6
            t0 = time.perf_counter()
            session.load_context(chunks)
            via_file = time.perf_counter() - t0
            t0 = time.perf_counter()
            session.client.load_context(data=chunks)
            inline = time.perf_counter() - t0
            check = session.execute("print(len(context))").stdout.strip()
        backend.close()

    ratio = statistics.median(sandbox) / statistics.median(bare)
    print(f"local sandbox, isolated={isolated}, {args.runs} runs of {STATEMENT!r}")
    print(f"session start                      {start_s * 1e3:8.1f} ms")
    print(line("execute() round trip", sandbox))
    print(line("bare in-process exec (baseline)", bare))
    print(f"ratio (median)                     {ratio:8.0f}x")
    print(f"context: {len(chunks)} chunks, {megabytes:.1f} MB JSON (loaded: {check})")
    print(f"  load via session-dir file        {via_file * 1e3:8.1f} ms")
    print(f"  load inline in the message       {inline * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
