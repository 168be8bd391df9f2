"""RLM harness figures: overhead per iteration, context load, batched sub-call concurrency.

(Not named `bench/rlm.py`: run as a script, that file would shadow the `rlm` package.)

    python bench/rlm_engine.py [--iterations 10] [--chunks 5000] [--isolation bwrap|none]

1. Harness overhead per iteration: the same scripted root LLM (no latency, on loopback) drives
   `--iterations` iterations over a 5,000-chunk (about 5 MB) context, once through our engine
   (local sandbox session, the context loaded into it) and once through `rlms`'s own in-process
   LocalREPL, in the same run. The ratio is what to compare across machines.
2. The time to gather a 5,000-chunk `documents` context from the lake, and to load it into a
   sandbox session.
3. The wall time of `llm_query_batched` of 16 prompts when each sub-call takes 200 ms
   (concurrent: near 200 ms, not 3.2 s).
"""

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memcity_pipeline.lake.delta import write_rows
from memcity_pipeline.lake.tables import ENRICHED_CHUNKS, scope_where
from memcity_pipeline.llm.client import LLMClient
from memcity_pipeline.resources.sandbox import LocalSandboxResource, SandboxResource
from memcity_pipeline.rlm.context import gather_context
from memcity_pipeline.rlm.query import rlm_query
from memcity_pipeline.rlm.sessions import SessionStore
from tests.scripted_llm_server import Fault, ScriptedLLMServer

ROOT, SUB = "root-model", "sub-model"
STEP = "Looking.\n```repl\nn = len(context)\nprint(n)\n```"


def write_chunks(lake: Path, n: int, size: int = 1000) -> None:
    """An enriched knowledge base `bench/kb` of n chunks of about `size` characters."""
    now = datetime.now(UTC)
    filler = "The hive scale reports weight every hour to the gateway. "
    text = (filler * (size // len(filler) + 1))[:size]
    rows = [
        {
            "org_id": "bench",
            "knowledge_base_id": "kb",
            "document_id": f"doc{i // 50:04d}",
            "chunk_id": f"c{i}",
            "ordinal": i % 50,
            "section_title": "Section",
            "start": 0,
            "end": size,
            "text": text,
            "resolved_text": text,
            "key_terms": None,
            "summary": None,
            "entities": None,
            "enrichment_status": "enriched",
            "enrichment_error": None,
            "model": "m",
            "context_key": "k",
            "llm_calls": 0.0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cost_usd": None,
            "enriched_at": now,
        }
        for i in range(n)
    ]
    frame = pl.from_arrow(pa.Table.from_pylist(rows, schema=ENRICHED_CHUNKS))
    write_rows(lake, "enriched_chunks", scope_where("enriched_chunks", "bench", "kb"), frame)  # type: ignore[arg-type]


def root_responder() -> Any:
    """Root replies: `STEP` every time (never FINAL); sub-calls answered `ok`."""

    def respond(request: dict[str, Any]) -> Any:
        return STEP if request["model"] == ROOT else "ok"

    return respond


def ours(server: ScriptedLLMServer, sandbox: SandboxResource, lake: Path, iterations: int) -> float:
    """Seconds of one query through our engine (sandbox session, context loaded, N iterations)."""
    client = LLMClient(base_url=server.base_url, api_key=None, model=ROOT, cache_dir=None)
    started = time.perf_counter()
    result = rlm_query(
        "bench",
        "How many chunks?",
        "documents",
        knowledge_base_id="kb",
        llm=client,
        sandbox=sandbox.get_backend(),
        lake_dir=lake,
        session_store=SessionStore(lake),
        rlm_config={"max_iterations": iterations},
    )
    elapsed = time.perf_counter() - started
    assert result.iterations == iterations, result
    return elapsed


def theirs(server: ScriptedLLMServer, payload: list[str], iterations: int) -> float:
    """Seconds of the same loop with rlms's own LocalREPL (in-process)."""
    from rlm import RLM

    rlm = RLM(
        backend="openai",
        backend_kwargs={"model_name": ROOT, "base_url": server.base_url, "api_key": "x"},
        environment="local",
        max_iterations=iterations,
    )
    started = time.perf_counter()
    rlm.completion(payload, root_prompt="How many chunks?")
    return time.perf_counter() - started


def batched(sandbox: SandboxResource, lake: Path) -> float:
    """Seconds of `llm_query_batched` of 16 prompts, each sub-call taking 200 ms."""
    code = (
        "import time\nt0 = time.perf_counter()\n"
        "r = llm_query_batched([f'p{i}' for i in range(16)])\n"
        "FINAL(f'{time.perf_counter() - t0:.3f}')"
    )

    def respond(request: dict[str, Any]) -> Any:
        if request["model"] == ROOT:
            return f"Go.\n```repl\n{code}\n```"
        return Fault(200, delay_s=0.2, content="ok")

    with ScriptedLLMServer(respond) as server:
        client = LLMClient(
            base_url=server.base_url,
            api_key=None,
            model=ROOT,
            sub_model=SUB,
            cache_dir=None,
            max_concurrency=16,
        )
        result = rlm_query(
            "bench",
            "batch",
            "custom",
            custom_context="x",
            llm=client,
            sandbox=sandbox.get_backend(),
            lake_dir=lake,
            session_store=SessionStore(lake),
        )
        assert result.status == "completed", result
        return float(result.answer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--chunks", type=int, default=5000)
    parser.add_argument("--isolation", default="bwrap", choices=["bwrap", "none"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rlm-") as tmp:
        lake = Path(tmp) / "lake"
        write_chunks(lake, args.chunks)
        sandbox = LocalSandboxResource(
            sessions_root=str(Path(tmp) / "sandboxes"),
            isolation=args.isolation,
            max_llm_concurrency=16,
            memory_mb=4096,
        )
        try:
            started = time.perf_counter()
            gathered = gather_context(lake, "bench", "documents", knowledge_base_id="kb")
            gather_s = time.perf_counter() - started
            session = sandbox.open_session("bench", lambda prompts, model: ["ok"] * len(prompts))
            started = time.perf_counter()
            session.load_context(gathered.payload)
            load_s = time.perf_counter() - started
            session.close()

            with ScriptedLLMServer(root_responder()) as server:
                ours_s = ours(server, sandbox, lake, args.iterations)
                theirs_s = theirs(server, gathered.payload, args.iterations)
            batch_s = batched(sandbox, lake)
        finally:
            sandbox.close()
    n = args.iterations
    print(f"context: {gathered.item_count} chunks, {gathered.char_count / 1e6:.1f} MB")
    print(f"gather from the lake:            {gather_s * 1000:8.0f} ms")
    print(f"load into a sandbox session:     {load_s * 1000:8.0f} ms")
    print(f"ours (sandbox), whole query:     {ours_s * 1000:8.0f} ms ({n} iterations + 1 answer)")
    print(f"rlms LocalREPL, whole query:     {theirs_s * 1000:8.0f} ms")
    print(f"ours per iteration:              {ours_s / n * 1000:8.1f} ms")
    print(f"rlms per iteration:              {theirs_s / n * 1000:8.1f} ms")
    print(f"ratio ours / rlms:               {ours_s / theirs_s:8.2f}")
    print(f"llm_query_batched 16 x 200 ms:   {batch_s * 1000:8.0f} ms (sequential: 3200 ms)")


if __name__ == "__main__":
    main()
