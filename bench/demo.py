"""`memcity demo` on embedded defaults: wall time, and how much of the sample corpus failed.

    python bench/demo.py [--home DIR] [--enrichment llm|off] [--local-servers N] [--keep]

Runs `memcity demo` as a user would, in a subprocess, on a fresh `MEMCITY_HOME` (a new lake, a
new embedded Dagster instance and an empty LLM response cache), with every LLM variable removed
from its environment: the enrichment phases run on the bundled SmolLM2-135M model on the CPU.
The install (`make install`) is not part of the figure. `--local-servers N` sets
`MEMCITY_LLM_LOCAL_SERVERS` (default: one embedded model server per core).

Printed:
- the wall time of the command, and each step's time (from the instance's event log), so that
  the phases that cost the time can be told apart;
- documents whose phase-1 structure failed (`document_structure.status = failed`, sections
  from headings instead) and chunks whose phase-3 enrichment failed
  (`enriched_chunks.enrichment_status = failed`), as counts and shares, with the most common
  reasons;
- LLM calls and tokens, summed over the knowledge bases' materializations.

Goals (README): at most 10 minutes on 2 cores, at most 10% of the chunks and of the documents
failed.
"""

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

GOAL_MINUTES = 10.0
GOAL_FAILED = 0.10
VENV_BIN = Path(sys.executable).parent


def _environment(home: Path, enrichment: str, servers: int | None) -> dict[str, str]:
    """This process's environment without any LLM or home setting, on `home`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MEMCITY_", "OPENROUTER_", "DAGSTER_", "DAYTONA_"))
    }
    env["MEMCITY_HOME"] = str(home)
    env["MEMCITY_ENRICHMENT"] = enrichment
    if servers:
        env["MEMCITY_LLM_LOCAL_SERVERS"] = str(servers)
    return env


def _memcity() -> list[str]:
    script = VENV_BIN / "memcity"
    return [str(script)] if script.exists() else [sys.executable, "-m", "memcity_pipeline.cli"]


def _step_times(home: Path) -> list[tuple[str, str, float]]:
    """(partition, step, seconds) of every step of every run on the home's instance."""
    os.environ["DAGSTER_HOME"] = str(home / "dagster_home")
    import dagster as dg

    rows = []
    with dg.DagsterInstance.get() as instance:
        for run in reversed(instance.get_runs()):
            key = run.tags.get("dagster/partition", run.job_name)
            for stat in instance.get_run_step_stats(run.run_id):
                if stat.start_time and stat.end_time:
                    rows.append((key, stat.step_key, stat.end_time - stat.start_time))
    return rows


def _table(lake: Path, name: str) -> pl.DataFrame:
    """Every row of a lake table (empty when the table does not exist)."""
    from memcity_pipeline.lake.delta import read_rows

    return read_rows(str(lake), name)


def _reasons(frame: pl.DataFrame, column: str, top: int = 5) -> list[tuple[str, int]]:
    counts = collections.Counter(
        (reason or "")[:120] for reason in frame.get_column(column).to_list()
    )
    return counts.most_common(top)


def _share(failed: int, total: int) -> str:
    return f"{failed}/{total} ({failed / total:.0%})" if total else "0/0"


def _llm_totals(outcome: dict[str, Any]) -> dict[str, int]:
    totals: collections.Counter[str] = collections.Counter()
    for part in outcome.get("partitions", []):
        for asset in ("document_structure", "enriched_chunks"):
            meta = part.get("assets", {}).get(asset, {})
            for key in ("llm_calls", "prompt_tokens", "completion_tokens"):
                value = meta.get(key)
                if isinstance(value, int | float):
                    totals[f"{asset}.{key}"] += int(value)
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--home", type=Path, default=None, help="a fresh folder (default: temp)")
    parser.add_argument("--enrichment", choices=["llm", "off"], default="llm")
    parser.add_argument("--local-servers", type=int, default=None, help="embedded model servers")
    parser.add_argument("--keep", action="store_true", help="keep the home afterwards")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="memcity-demo-bench-"))
    if home.exists() and any(home.iterdir()):
        raise SystemExit(f"{home} is not empty: the figure is that of a fresh home")
    home.mkdir(parents=True, exist_ok=True)
    servers = args.local_servers or "one per core"
    print(f"memcity demo, enrichment {args.enrichment}, local model servers: {servers}")
    print(f"home {home}; load average at the start {os.getloadavg()[0]:.2f}", flush=True)

    started = time.perf_counter()
    proc = subprocess.run(
        [*_memcity(), "demo", "--json"],
        env=_environment(home, args.enrichment, args.local_servers),
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"memcity demo exited with {proc.returncode} after {wall:.0f} s")
    outcome = json.loads(proc.stdout)

    lake = home / "lake"
    structure = _table(lake, "document_structure")
    enriched = _table(lake, "enriched_chunks")
    failed_docs = structure.filter(pl.col("status") == "failed") if structure.height else structure
    failed_chunks = (
        enriched.filter(pl.col("enrichment_status") == "failed") if enriched.height else enriched
    )

    print(f"\nwall time: {wall:.0f} s ({wall / 60:.1f} min; goal <= {GOAL_MINUTES:g} min)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (2 cores: above 2, other work ran)")
    print("\nstep times (s):")
    for key, step, seconds in _step_times(home):
        print(f"  {key:28} {step:22} {seconds:7.1f}")
    print(
        f"\ndocuments failed (phase 1): {_share(failed_docs.height, structure.height)}"
        f"\nchunks failed (phase 3):    {_share(failed_chunks.height, enriched.height)}"
        f"  (goal <= {GOAL_FAILED:.0%} each)"
    )
    if failed_docs.height:
        print("phase 1 reasons:")
        for reason, n in _reasons(failed_docs, "error"):
            print(f"  {n:3}  {reason}")
    if failed_chunks.height:
        print("phase 3 reasons:")
        for reason, n in _reasons(failed_chunks, "enrichment_error"):
            print(f"  {n:3}  {reason}")
    print("\nLLM:")
    for key, value in sorted(_llm_totals(outcome).items()):
        print(f"  {key:36} {value:8}")
    if not args.keep and args.home is None:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
