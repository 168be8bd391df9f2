"""Operations: kill -9 at random points, a flaky LLM, Postgres going away, concurrent runs.

Ingestion runs here are real `memcity ingest` processes (the Dagster multiprocess executor, the
embedded instance) on the sample corpus, enriched by the scripted LLM server of this process
and embedded through its `/v1/embeddings`, so a run takes seconds and its LLM calls are visible.
"""

import ast
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pytest

from memcity_pipeline.cli.runner import copy_sample_corpus
from memcity_pipeline.lake.delta import read_rows
from memcity_pipeline.lake.io import LakeBusyError, table_lock
from memcity_pipeline.lake.tables import TABLES
from memcity_pipeline.rlm.query import rlm_query
from memcity_pipeline.rlm.sessions import SessionStore, pending_ids, postgres_session_ids
from memcity_pipeline.sandbox.local import LocalSandboxBackend
from tests.enrichment.test_enrichment import smart_responder
from tests.fixtures_sandbox import isolation_for_tests
from tests.scripted_llm_server import Fault, ScriptedLLMServer

MEMCITY = str(Path(sys.executable).with_name("memcity"))
CRASHPOINT = str(Path(__file__).resolve().parents[1] / "crashpoint")
_AWS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ALLOW_HTTP",
)
SEED = int(os.environ.get("MEMCITY_TEST_SEED", random.SystemRandom().randrange(10**6)))
# Tables compared between a crashed-then-rerun lake and a clean one (timestamps and LLM
# accounting aside: a rerun answered from the response cache spends nothing).
COMPARED = {
    "raw_documents": ["org_id", "document_id"],
    "memories": ["org_id", "user_id", "memory_id"],
    "conversations": ["org_id", "user_id", "session_id", "turn"],
    "document_structure": ["org_id", "document_id"],
    "chunks": ["org_id", "chunk_id"],
    "enriched_chunks": ["org_id", "chunk_id"],
    "chunk_embeddings": ["org_id", "scope_id", "item_id"],
    "memory_embeddings": ["org_id", "scope_id", "item_id"],
}
# What making a row cost, and how many runs tried the LLM on it (a failed chunk is retried by
# the next run: a rerun after a crash is one), are its history, not what it holds.
NOT_COMPARED = {"llm_calls", "prompt_tokens", "completion_tokens", "cost_usd", "attempts"}


def _env(home: Path, server: ScriptedLLMServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMCITY_", "DAGSTER_"))}
    env.update(
        MEMCITY_HOME=str(home),
        MEMCITY_LLM_BASE_URL=server.base_url,
        MEMCITY_LLM_MODEL="scripted-model",
        MEMCITY_LLM_API_KEY="test-key",
        MEMCITY_LLM_TIMEOUT_S="5",
        MEMCITY_ENRICHMENT="llm",
        MEMCITY_LONG_DOCUMENTS="windowed",
        MEMCITY_EMBEDDINGS="openai:scripted-embedding",
    )
    env.update(extra)
    return env


def _start_ingest(home: Path, server: ScriptedLLMServer, **extra: str) -> subprocess.Popen:
    """`memcity ingest` in its own process group (so kill -9 reaches its step processes)."""
    return subprocess.Popen(
        [MEMCITY, "ingest"],
        env=_env(home, server, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen, timeout_s: float = 300) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"ingestion did not end within {timeout_s} s:\n{output[-3000:]}")
    return process.returncode, output


def _ingest(home: Path, server: ScriptedLLMServer, **extra: str) -> str:
    code, output = _finish(_start_ingest(home, server, **extra))
    assert code == 0, output[-3000:]
    return output


def _new_home(root: Path, name: str) -> Path:
    home = root / name
    copy_sample_corpus(home / "landing")
    return home


def _lake(home: Path | str) -> str:
    """A lake given as its home (the local lake `<home>/lake`) or as its URI."""
    return str(home / "lake") if isinstance(home, Path) else home


def _table(home: Path | str, name: str) -> pl.DataFrame:
    frame = read_rows(_lake(home), name)
    assert frame.height, f"no {name} rows in {_lake(home)}"
    return frame


def _comparable(home: Path | str, name: str) -> pl.DataFrame:
    frame = _table(home, name)
    keep = [
        c
        for c, dtype in frame.schema.items()
        if c not in NOT_COMPARED and not isinstance(dtype, pl.Datetime)
    ]
    return frame.select(keep).sort(COMPARED[name])


def _prompt(request: Any) -> str:
    return repr(request.body.get("messages")) if request.body else ""


def _answered(server: ScriptedLLMServer) -> set[str]:
    return {
        _prompt(r)
        for r in server.chat_requests
        if r.t_done is not None and r.reply_kind in ("content", "body")
    }


def _accepted(prompts: set[str], home: Path | str) -> set[str]:
    """The prompts whose answers the pipeline accepted: not those that carry a chunk that ended
    failed (a rejected answer is never cached, and its retry asks the model again)."""
    failed = _table(home, "enriched_chunks").filter(pl.col("enrichment_status") == "failed")
    texts = failed["text"].to_list()

    def carries_failed(prompt: str) -> bool:
        content = " ".join(m["content"] for m in ast.literal_eval(prompt) or [])
        return any(t in content for t in texts)

    return {p for p in prompts if not carries_failed(p)}


def _assert_lake_whole(home: Path | str) -> None:
    """Every table of the lake reads at its current version, with no key twice in a partition."""
    for table in TABLES.values():
        frame = read_rows(_lake(home), table.name)
        keys = [*table.partition_by, *table.key]
        assert frame.select(keys).is_duplicated().sum() == 0, f"{table.name}: duplicated keys"


@pytest.fixture(scope="module")
def ops_server() -> Iterator[ScriptedLLMServer]:
    with ScriptedLLMServer(responder=smart_responder) as server:
        yield server


@pytest.fixture(scope="module")
def clean_home(tmp_path_factory: pytest.TempPathFactory, ops_server: ScriptedLLMServer) -> Path:
    """The sample corpus ingested once, without incident: what every recovery must match."""
    home = _new_home(tmp_path_factory.mktemp("clean"), "home")
    _ingest(home, ops_server)
    return home


# ------------------------------------------------------------------------------ kill -9


@pytest.mark.slow
@pytest.mark.parametrize("lake_kind", ["local", "s3"])
@pytest.mark.parametrize("point", ["parse", "enrichment", "lake-write"])
def test_kill_9_then_rerun_matches_a_clean_run_without_repeating_llm_work(
    point: str,
    lake_kind: str,
    tmp_path: Path,
    ops_server: ScriptedLLMServer,
    clean_home: Path,
    request: pytest.FixtureRequest,
) -> None:
    rng = random.Random(f"{SEED}-{point}")
    home = _new_home(tmp_path, "home")
    ops_server.reset()
    killed = threading.Event()
    process: subprocess.Popen | None = None
    lake: Path | str = home
    lake_env: dict[str, str] = {}
    if lake_kind == "s3":  # the same runs against an S3-protocol server (moto)
        lake = request.getfixturevalue("s3_lake")
        lake_env = {k: os.environ[k] for k in (*_AWS, "MEMCITY_LAKE_URI")}
    extra: dict[str, str] = dict(lake_env)
    if point == "enrichment":
        # kill on the n-th LLM call, once every answered call had time to reach the cache
        nth = rng.randrange(3, 40)
        calls = {"n": 0}
        lock = threading.Lock()

        def responder(request: dict[str, Any]) -> Any:
            with lock:
                calls["n"] += 1
                fire = calls["n"] == nth
            if fire or killed.is_set():
                if fire:
                    time.sleep(1.0)
                    assert process is not None
                    os.killpg(process.pid, signal.SIGKILL)
                    killed.set()
                return Fault(500, delay_s=5)
            return smart_responder(request)

        ops_server.responder = responder
    else:
        nth = rng.randrange(1, 15 if point == "parse" else 25)
        extra |= {
            "PYTHONPATH": os.pathsep.join(filter(None, [CRASHPOINT, os.environ.get("PYTHONPATH")])),
            "MEMCITY_TEST_CRASH": f"{point}:{nth}",
            "MEMCITY_TEST_CRASH_COUNTER": str(tmp_path / "crash-counter"),
        }
    try:
        process = _start_ingest(home, ops_server, **extra)
        code, output = _finish(process)
    finally:
        ops_server.responder = smart_responder
    where = f"{point} #{nth} (seed {SEED})"
    assert code == -signal.SIGKILL, f"{where}: the run was not killed:\n{output[-2000:]}"

    # The lake is readable as the crash left it.
    for table in TABLES:
        read_rows(_lake(lake), table)
    before_rerun = _answered(ops_server)
    ops_server.reset()

    _ingest(home, ops_server, **lake_env)
    _assert_lake_whole(lake)
    for name, keys in COMPARED.items():
        recovered, clean = _comparable(lake, name), _comparable(clean_home, name)
        assert recovered.select(keys).is_duplicated().sum() == 0, f"{where}: {name} duplicated"
        assert recovered.equals(clean), f"{where}: {name} differs from a clean run"
    repeated = _accepted(before_rerun, lake) & {_prompt(r) for r in ops_server.chat_requests}
    assert not repeated, f"{where}: {len(repeated)} answered LLM calls were made again"


# ------------------------------------------------------------------------------ a flaky LLM


@pytest.mark.slow
def test_ingestion_and_a_query_hold_up_when_30_percent_of_llm_calls_fail(
    tmp_path: Path,
) -> None:
    rng_seed = SEED
    with ScriptedLLMServer(
        responder=smart_responder, fail_rate=0.3, seed=rng_seed, hang_s=3.0
    ) as server:
        home = _new_home(tmp_path, "home")
        _ingest(home, server, MEMCITY_LLM_TIMEOUT_S="1", MEMCITY_LLM_MAX_RETRIES="3")
        faults = [r for r in server.chat_requests if r.reply_kind.startswith("fault")]
        assert faults, "the server injected no fault"
        _assert_lake_whole(home)

        structure = _table(home, "document_structure")
        assert structure["document_id"].is_duplicated().sum() == 0
        assert set(structure["status"].to_list()) <= {"ok", "failed"}
        assert structure.filter(
            (pl.col("status") == "failed") & pl.col("error").is_null()
        ).is_empty()
        enriched = _table(home, "enriched_chunks")
        assert enriched["chunk_id"].is_duplicated().sum() == 0
        assert set(enriched["enrichment_status"].to_list()) <= {"enriched", "failed"}
        assert enriched.filter(
            (pl.col("enrichment_status") == "failed") & pl.col("enrichment_error").is_null()
        ).is_empty()
        assert _table(home, "chunks").height == enriched.height
        assert _table(home, "chunk_embeddings").height == enriched.height

        program = (
            "```repl\nparts = llm_query_batched([c[:200] for c in context[:6]])\n"
            "FINAL(str(len(parts)) + ' parts read')\n```"
        )
        server.responder = lambda request: program
        result = rlm_query(
            "brambleway",
            "How many parts?",
            "documents",
            knowledge_base_id="company_docs",
            rlm_config={"max_iterations": 4, "max_timeout": 120},
            llm=_llm_client(server),
            sandbox=LocalSandboxBackend(home / "sandboxes", isolation=isolation_for_tests()),
            lake_dir=home / "lake",
            session_store=SessionStore(home / "lake"),
        )
        assert result.status in ("completed", "partial", "timeout"), result
        if result.status == "completed":
            assert result.answer == "6 parts read"
        else:
            assert result.warning
        sessions = read_rows(home / "lake", "rlm_sessions")
        assert sessions["status"].to_list() == [result.status]


def _llm_client(server: ScriptedLLMServer, timeout_s: float = 1.0) -> Any:
    from memcity_pipeline.llm.client import LLMClient

    return LLMClient(
        base_url=server.base_url,
        api_key="test-key",
        model="scripted-model",
        cache_dir=None,
        timeout_s=timeout_s,
        max_retries=5,
        backoff_base_s=0.05,
        backoff_max_s=0.5,
    )


# ------------------------------------------------------------------------------ Postgres


PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), Path("/nonexistent"))


class PrivatePostgres:
    """A Postgres cluster of our own (initdb in a temporary folder) that a test may stop."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *argv: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *argv], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._as_postgres(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        self._as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-w",
            "start",
            "-l",
            str(self.folder / "log"),
        )

    def stop(self) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """Outside pytest's private temporary tree, which the postgres user cannot enter."""
    folder = Path(tempfile.mkdtemp(prefix="memcity-pg-"))
    os.chmod(folder, 0o755)
    server = PrivatePostgres(folder / "cluster")
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()  # unless already stopped
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.postgres
def test_postgres_stopped_mid_series_loses_and_duplicates_no_session(
    tmp_path: Path, scripted_llm: ScriptedLLMServer, private_postgres: PrivatePostgres
) -> None:
    lake = tmp_path / "lake"
    store = SessionStore(lake, private_postgres.url)
    scripted_llm.responder = lambda request: "```repl\nFINAL('done')\n```"
    results = []
    for index in range(6):
        if index == 2:
            private_postgres.stop()
        if index == 4:
            private_postgres.start()
        results.append(
            rlm_query(
                "acme",
                f"question {index}",
                "custom",
                custom_context=["a note"],
                llm=_llm_client(scripted_llm, timeout_s=10),
                sandbox=LocalSandboxBackend(
                    lake.parent / "sandboxes", isolation=isolation_for_tests()
                ),
                lake_dir=lake,
                session_store=store,
            )
        )
    assert [r.status for r in results] == ["completed"] * 6
    assert [r.logged_to_postgres for r in results] == [True, True, False, False, True, True]
    ids = {r.session_id for r in results}
    assert not pending_ids(lake)  # the 5th session caught up the two missed
    assert postgres_session_ids(private_postgres.url) == ids
    with psycopg.connect(private_postgres.url) as conn:
        count = conn.execute("SELECT count(*) FROM rlm_sessions").fetchone()
    assert count == (6,)
    assert store.sync_to_postgres() == 0  # a catch-up run finds nothing more to copy
    assert read_rows(lake, "rlm_sessions").height == 6


# ------------------------------------------------------------------------------ concurrency


@pytest.mark.slow
def test_two_ingestion_runs_at_once_wait_for_each_other_and_match_a_clean_run(
    tmp_path: Path, ops_server: ScriptedLLMServer, clean_home: Path
) -> None:
    home = _new_home(tmp_path, "home")
    ops_server.reset()

    def slow(request: dict[str, Any]) -> Any:
        time.sleep(0.05)  # both runs are surely inside enrichment at the same time
        return smart_responder(request)

    ops_server.responder = slow
    try:
        first = _start_ingest(home, ops_server)
        second = _start_ingest(home, ops_server)
        (code1, out1), (code2, out2) = _finish(first), _finish(second)
    finally:
        ops_server.responder = smart_responder
    assert code1 == 0 and code2 == 0, (out1[-2000:], out2[-2000:])
    assert "is being written by memcity ingest" in out1 + out2, "the runs did not meet"
    _assert_lake_whole(home)
    for name in COMPARED:
        assert _comparable(home, name).equals(_comparable(clean_home, name)), name
    prompts = [_prompt(r) for r in ops_server.chat_requests]
    accepted = _accepted(set(prompts), home)
    assert all(prompts.count(p) == 1 for p in accepted), "the second run repeated LLM calls"


def test_a_lake_table_lock_waits_then_fails_clearly(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path;"
            "from memcity_pipeline.lake.io import table_lock\n"
            "with table_lock(Path(sys.argv[1]), 'chunks', timeout_s=5, holder='run A'):\n"
            "    print('held', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        waits: list[str] = []
        with (
            pytest.raises(LakeBusyError, match=r"'chunks' is still being written by run A"),
            table_lock(tmp_path, "chunks", timeout_s=0.5, on_wait=waits.append),
        ):
            pass
        assert waits and "run A" in waits[0]
        holder.kill()  # kill -9 frees the lock: the OS drops it with the process
        holder.wait()
        with table_lock(tmp_path, "chunks", timeout_s=5, holder="run B"):
            assert "run B" in (tmp_path / ".locks" / "chunks.holder").read_text()
    finally:
        holder.kill()
        holder.wait()
