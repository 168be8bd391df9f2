"""Partitioned ingestion: what 2 cores buy, and what a rerun after one edit costs.

    python bench/partitions.py [--orgs 4 (2 knowledge bases each)] [--quick] [--keep]

`--quick` is `--orgs 2` (4 knowledge bases): about half the time.

The corpus: `--orgs` orgs (`bench1`, `bench2`, ...), each holding a copy of the sample corpus's
two knowledge-base folders (`company_docs` from brambleway, 12 files, and `operations` from
saltmarsh, 2 files), so 8 knowledge bases by default, shaped like the sample corpus. Users are
left out: they run another job (`ingest_users`, 3 short steps) whose cost says nothing about
knowledge-base partitions, and leaving them out keeps the bench short. Enrichment is off (no
LLM calls); embeddings are the local all-MiniLM-L6-v2.

Every configuration is ingested on its own fresh `MEMCITY_HOME` (a new lake and a new embedded
SQLite Dagster instance), in a subprocess of this script (`--measure ...`), since settings and
`DagsterInstance.get()` follow the environment of the process they start in. The time measured
is that of `plan_ingest` + `run_ingest` inside the subprocess (what `memcity ingest` does after
its imports). Printed, measured in one run (these machines are shared and noisy: ratios of
figures measured alongside each other, never absolute goals):

(a) step concurrency: wall time with the multiprocess executor's `max_concurrent` 2 over 1, one
    partition run at a time (`parallel` 1). Goal <= 0.65 on 2 cores; but a run's steps form a
    chain (documents, structure, chunks, enrichment, then vectors and BM25 side by side), so
    this changes little.
(b) parallel partition runs: wall time with `parallel` 2 over 1, the runs of different knowledge
    bases side by side in two worker processes, with the multiprocess executor and (b') with
    every step in its run's process (`in_process`, the CLI's default).
(d) `in_process` over multiprocess, one run at a time: what a process per step costs.
(c) rerun after editing one file in one knowledge base, with the CLI's defaults (`in_process`,
    one run at a time on 2 cores; only partitions whose files changed run), over the full first
    run of the same home. Goal <= 0.1.

Each measurement also prints about how many cores' worth of CPU its processes got (the CPU time
of the subprocess and every process under it, sampled from /proc every 0.25 s, over the wall
time), and the machine's load and CPU pressure are printed at the start and the end: on a
machine busy with other work no configuration gets a second core, and (b) says little.

A warm-up ingest of one small knowledge base on a throwaway home comes first and is not
counted, so that the first measured configuration does not pay for a cold file cache.
"""

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULT = "BENCH-RESULT "
# (source org, knowledge base) of the sample corpus, copied under each bench org.
SOURCE_KBS = [("brambleway", "company_docs"), ("saltmarsh", "operations")]
EDITED = ("company_docs", "policies/warranty.md")  # the file edited before the rerun


def _child_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["MEMCITY_HOME"] = str(home)
    env["MEMCITY_ENRICHMENT"] = "off"
    for name in ("DAGSTER_HOME", "MEMCITY_LANDING"):  # the embedded instance, $HOME/landing
        env.pop(name, None)
    return env


def _setup(landing: Path, orgs: int, kbs: list[tuple[str, str]]) -> int:
    """Copy the sample corpus's knowledge-base folders under `orgs` bench orgs; files copied."""
    from memcity_pipeline.cli.runner import sample_corpus_dir

    src = sample_corpus_dir() / "orgs"
    count = 0
    for i in range(1, orgs + 1):
        for org, kb in kbs:
            folder = src / org / "knowledge_bases" / kb
            dest = landing / "orgs" / f"bench{i}" / "knowledge_bases" / kb
            shutil.copytree(folder, dest, copy_function=shutil.copy2)
            count += sum(1 for p in dest.rglob("*") if p.is_file())
    return count


def _edit(landing: Path) -> str:
    """Append a paragraph to one file of one knowledge base; its landing path."""
    kb, rel = EDITED
    path = landing / "orgs" / "bench1" / "knowledge_bases" / kb / rel
    with path.open("a", encoding="utf-8") as f:
        f.write("\n\nEdited for the rerun benchmark: warranty claims now take 10 working days.\n")
    return str(path.relative_to(landing))


class _TreeCPU(threading.Thread):
    """CPU seconds of this process and its descendants, sampled from /proc (Linux; 0 elsewhere).

    A process is counted with the last CPU time seen for it, so one that lives less than a
    sampling interval is missed: a lower bound."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval, self.stop = interval, threading.Event()
        self.seen: dict[int, float] = {}
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _sample(self) -> None:
        parents: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                pid = int(entry.name)
                parents[pid] = int(fields[1])  # ppid; utime, stime are fields 14, 15 of stat
                cpu[pid] = (int(fields[11]) + int(fields[12])) / self.tick
        mine = {os.getpid()}
        for pid in parents:
            chain, p = [], pid
            while p in parents and p not in mine and p > 1 and len(chain) < 64:
                chain.append(p)
                p = parents[p]
            if p in mine:
                mine.update(chain)
        for pid in mine:
            if pid in cpu:
                self.seen[pid] = max(self.seen.get(pid, 0.0), cpu[pid])

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(OSError):
                self._sample()

    def total(self) -> float:
        self.stop.set()
        self.join(timeout=5)
        with contextlib.suppress(OSError):
            self._sample()
        return sum(self.seen.values())


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """In the subprocess: set up (not timed), then plan and run one ingest (timed)."""
    os.environ.clear()
    os.environ.update(_child_env(args.home))  # before settings and the instance are read
    from memcity_pipeline.cli.ingest import plan_ingest, run_ingest
    from memcity_pipeline.cli.runner import get_instance
    from memcity_pipeline.settings import load_settings

    settings = load_settings()
    out: dict[str, Any] = {"home": str(args.home)}
    if args.measure == "full":
        kbs = SOURCE_KBS[1:] if args.warmup else SOURCE_KBS
        out["files"] = _setup(settings.landing_dir, args.orgs, kbs)
    else:
        out["edited"] = _edit(settings.landing_dir)
    tree = _TreeCPU()
    cpu_before = time.process_time()
    tree.start()
    started = time.perf_counter()
    instance = get_instance(settings)
    plan = plan_ingest(settings, instance)
    outcome = run_ingest(
        settings,
        plan,
        instance=instance,
        parallel=args.parallel,
        executor=args.executor,
        max_concurrent=args.max_concurrent,
    )
    out["seconds"] = time.perf_counter() - started
    # Less what this process had used before the timed part (imports and set-up).
    out["cpu_seconds"] = tree.total() - cpu_before
    out["runs"] = [p.key for p in plan.runs]
    out["unchanged"] = len(plan.unchanged)
    out["success"] = outcome.success
    out["failures"] = [
        f"{p.partition.key}: {p.failure}" for p in outcome.partitions if not p.success
    ] + ([outcome.layout_failure] if outcome.layout_failure else [])
    out["chunks"] = sum(
        int(m.get("dagster/row_count", 0)) for m in outcome.materializations("chunks")
    )
    return out


def _run_child(
    mode: str,
    home: Path,
    *,
    orgs: int,
    parallel: int,
    max_concurrent: int,
    executor: str = "multiprocess",
    warmup: bool = False,
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure",
        mode,
        "--home",
        str(home),
        "--orgs",
        str(orgs),
        "--parallel",
        str(parallel),
        "--max-concurrent",
        str(max_concurrent),
        "--executor",
        executor,
    ] + (["--warmup"] if warmup else [])
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=_child_env(home), capture_output=True, text=True, check=False)
    process_s = time.perf_counter() - started
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{mode} ingest in {home} failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len(RESULT) :])
    result["process_seconds"] = process_s
    if not result["success"]:
        sys.stderr.write(proc.stderr[-8000:])
        raise SystemExit(f"{mode} ingest in {home} failed: {'; '.join(result['failures'])}")
    return result


def _show(label: str, r: dict[str, Any]) -> None:
    print(
        f"  {label:<44} {r['seconds']:6.1f} s  ({len(r['runs'])} run(s), {r['unchanged']} up to date,"
        f" {r['chunks']} chunks; {r['process_seconds']:.1f} s with the subprocess's imports,"
        f" {r['cpu_seconds']:.0f} CPU s = {r['cpu_seconds'] / r['seconds']:.2f} cores)",
        flush=True,
    )


def _load() -> str:
    """The load average and, where the kernel reports it, the CPU pressure (share of time some
    task waited for a CPU, over 60 s)."""
    one, five, _ = os.getloadavg()
    text = f"load average {one:.1f} (1 min), {five:.1f} (5 min)"
    with contextlib.suppress(OSError, ValueError, IndexError):
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
        text += f"; CPU pressure {float(some[2].split('=')[1]):.0f}% (60 s)"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orgs", type=int, default=4, help="bench orgs, 2 knowledge bases each")
    parser.add_argument("--quick", action="store_true", help="2 orgs (4 knowledge bases)")
    parser.add_argument("--keep", action="store_true", help="keep the homes (printed)")
    parser.add_argument("--no-warmup", dest="warmup_first", action="store_false")
    # Internal: one measurement, in a subprocess.
    parser.add_argument("--measure", choices=["full", "rerun"], help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--parallel", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--max-concurrent", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--executor", default="multiprocess", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(RESULT + json.dumps(measure(args)), flush=True)
        return

    if args.quick:
        args.orgs = 2
    root = Path(tempfile.mkdtemp(prefix="memcity-partitions-"))
    cores = os.cpu_count() or 1
    print(
        f"{cores} cores; {args.orgs * len(SOURCE_KBS)} knowledge bases "
        f"({args.orgs} orgs x {', '.join(kb for _, kb in SOURCE_KBS)}), enrichment off; "
        f"homes under {root}",
        flush=True,
    )
    print(f"  at the start: {_load()}", flush=True)
    try:
        if args.warmup_first:
            w = _run_child(
                "full", root / "warmup", orgs=1, parallel=1, max_concurrent=2, warmup=True
            )
            print(f"  warm-up (not counted): {w['seconds']:.1f} s", flush=True)
        configs = {
            "mc1_p1": ("multiprocess, max_concurrent 1, parallel 1", 1, 1, "multiprocess"),
            "mc2_p1": ("multiprocess, max_concurrent 2, parallel 1", 2, 1, "multiprocess"),
            "mc2_p2": ("multiprocess, max_concurrent 2, parallel 2", 2, 2, "multiprocess"),
            "ip_p1": ("in_process, parallel 1 (the CLI on 2 cores)", 2, 1, "in_process"),
            "ip_p2": ("in_process, parallel 2", 2, 2, "in_process"),
        }
        full: dict[str, dict[str, Any]] = {}
        for name, (label, mc, par, executor) in configs.items():
            full[name] = _run_child(
                "full",
                root / name,
                orgs=args.orgs,
                parallel=par,
                max_concurrent=mc,
                executor=executor,
            )
            _show(f"full, {label}:", full[name])
        rerun = _run_child(
            "rerun",
            root / "ip_p1",
            orgs=args.orgs,
            parallel=1,
            max_concurrent=2,
            executor="in_process",
        )
        _show("rerun, one file edited (CLI defaults):", rerun)
        print(f"    (edited {rerun['edited']}, in the ip_p1 home)", flush=True)
        if rerun["runs"] != ["bench1/" + EDITED[0]]:
            print(f"  note: the rerun ran {rerun['runs']}, not only the edited knowledge base")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(f"  at the end: {_load()}", flush=True)
    rows = [
        (
            "(a) multiprocess max_concurrent 2 / 1",
            full["mc2_p1"]["seconds"] / full["mc1_p1"]["seconds"],
            "<= 0.65 on 2 cores",
        ),
        (
            "(b) multiprocess parallel 2 / 1",
            full["mc2_p2"]["seconds"] / full["mc2_p1"]["seconds"],
            "(runs side by side)",
        ),
        (
            "(b') in_process parallel 2 / 1",
            full["ip_p2"]["seconds"] / full["ip_p1"]["seconds"],
            "(runs side by side)",
        ),
        (
            "(d) in_process / multiprocess (parallel 1)",
            full["ip_p1"]["seconds"] / full["mc2_p1"]["seconds"],
            "(a process per step)",
        ),
        (
            "(c) rerun after 1 edit / full run (CLI)",
            rerun["seconds"] / full["ip_p1"]["seconds"],
            "<= 0.1",
        ),
    ]
    print(f"\nfigures on {cores} cores (wall-time ratios, measured in this run):")
    print(f"  {'figure':<40} {'ratio':>6}  goal")
    for label, ratio, goal in rows:
        print(f"  {label:<40} {ratio:6.2f}  {goal}")


if __name__ == "__main__":
    main()
