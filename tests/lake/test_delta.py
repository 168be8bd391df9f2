"""The lake's Delta tables: one MERGE per partition, nothing committed without a change, only the
files of changed rows rewritten, concurrent writers of one table all committing."""

import multiprocessing
import zlib
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from hypothesis import given, settings
from hypothesis import strategies as st

from memcity_pipeline.lake.delta import (
    append_rows,
    delete_rows,
    has_rows,
    maintain,
    partitions,
    read_rows,
    table_version,
    write_rows,
)
from memcity_pipeline.lake.tables import known_orgs, known_scopes, scope_where


def _docs(org: str, kb: str, n: int, text: str = "text") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "org_id": [org] * n,
            "knowledge_base_id": [kb] * n,
            "document_id": [f"d{i:04d}" for i in range(n)],
            "source_path": [f"orgs/{org}/knowledge_bases/{kb}/d{i:04d}.md" for i in range(n)],
            "format": ["md"] * n,
            "title": [f"doc {i}" for i in range(n)],
            "text": [f"{text} {i}" for i in range(n)],
            "char_count": [len(text) + 2] * n,
            "content_hash": [f"h{i}" for i in range(n)],
            "metadata": ["{}"] * n,
            "ingested_at": [datetime(2026, 1, 1, tzinfo=UTC)] * n,
        }
    )


def test_a_partition_is_merged_and_a_rerun_commits_nothing(tmp_path: Path) -> None:
    where = scope_where("raw_documents", "acme", "kb")
    first = write_rows(tmp_path, "raw_documents", where, _docs("acme", "kb", 5))
    assert first is not None
    assert read_rows(tmp_path, "raw_documents", where).height == 5
    # The same rows again: no new version.
    assert write_rows(tmp_path, "raw_documents", where, _docs("acme", "kb", 5)) is None
    assert table_version(tmp_path, "raw_documents") == first

    # One row edited, one gone: one commit, the partition is exactly the new rows.
    edited = _docs("acme", "kb", 4).with_columns(
        pl.when(pl.col("document_id") == "d0001")
        .then(pl.lit("changed"))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    second = write_rows(tmp_path, "raw_documents", where, edited)
    assert second == first + 1
    back = read_rows(tmp_path, "raw_documents", where)
    assert back["document_id"].to_list() == ["d0000", "d0001", "d0002", "d0003"]
    assert back.filter(pl.col("document_id") == "d0001")["text"].item() == "changed"
    metrics = DeltaTable(str(tmp_path / "raw_documents")).history(1)[0]["operationMetrics"]
    assert metrics["num_target_rows_updated"] == 1 and metrics["num_target_rows_deleted"] == 1


def test_a_write_touches_only_its_own_partition(tmp_path: Path) -> None:
    a, b = (scope_where("raw_documents", "acme", kb) for kb in ("a", "b"))
    write_rows(tmp_path, "raw_documents", a, _docs("acme", "a", 3))
    write_rows(tmp_path, "raw_documents", b, _docs("acme", "b", 3))
    files_b = set(DeltaTable(str(tmp_path / "raw_documents")).file_uris())
    files_b = {f for f in files_b if "knowledge_base_id=b" in f}

    write_rows(tmp_path, "raw_documents", a, _docs("acme", "a", 2))

    after = set(DeltaTable(str(tmp_path / "raw_documents")).file_uris())
    assert files_b <= after, "files of another partition were rewritten"
    assert read_rows(tmp_path, "raw_documents", b).height == 3
    assert read_rows(tmp_path, "raw_documents", a).height == 2
    with pytest.raises(ValueError, match="outside"):
        write_rows(tmp_path, "raw_documents", a, _docs("acme", "b", 1))


def test_partitions_deletes_and_what_exists(tmp_path: Path) -> None:
    write_rows(
        tmp_path, "raw_documents", scope_where("raw_documents", "acme", "a"), _docs("acme", "a", 2)
    )
    write_rows(
        tmp_path, "raw_documents", scope_where("raw_documents", "zeta", "z"), _docs("zeta", "z", 1)
    )
    assert known_orgs(tmp_path) == ["acme", "zeta"]
    assert known_scopes(tmp_path, "acme", "knowledge_base") == ["a"]
    assert {"org_id": "acme", "knowledge_base_id": "a"} in partitions(tmp_path, "raw_documents")

    assert delete_rows(tmp_path, "raw_documents", scope_where("raw_documents", "acme", "a"))
    assert not has_rows(tmp_path, "raw_documents", scope_where("raw_documents", "acme", "a"))
    assert delete_rows(tmp_path, "raw_documents", scope_where("raw_documents", "acme", "a")) is None
    assert known_orgs(tmp_path) == ["zeta"]
    assert read_rows(tmp_path, "memories").height == 0  # never written: empty, with its schema
    assert "memory_id" in read_rows(tmp_path, "memories").columns


def _write_partition(lake: str, kb: str, start: "multiprocessing.synchronize.Event") -> None:
    start.wait(30)
    for n in (3, 5, 4):  # several commits each, interleaved with the other processes'
        write_rows(
            lake, "raw_documents", scope_where("raw_documents", "acme", kb), _docs("acme", kb, n)
        )


@pytest.mark.parametrize("store", ["local", "s3"])
def test_concurrent_writers_of_different_partitions_all_commit(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # On S3 (moto), with no lock service: commits rely on conditional writes alone.
    lake = request.getfixturevalue("s3_lake") if store == "s3" else str(tmp_path)
    ctx = multiprocessing.get_context("spawn")  # children inherit the AWS variables
    start = ctx.Event()
    procs = [ctx.Process(target=_write_partition, args=(lake, kb, start)) for kb in "abcd"]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    rows = read_rows(lake, "raw_documents")
    assert rows.group_by("knowledge_base_id").len().sort("knowledge_base_id")["len"].to_list() == [
        4,
        4,
        4,
        4,
    ]
    assert rows.select("knowledge_base_id", "document_id").is_duplicated().sum() == 0


def _files(n: int) -> pl.DataFrame:
    """`n` rows of the (unbucketed) bookkeeping table `source_files` of one scope."""
    return pl.DataFrame(
        {
            "kind": ["documents"] * n,
            "org_id": ["acme"] * n,
            "scope_id": ["kb"] * n,
            "path": [f"f{i}.md" for i in range(n)],
            "size": list(range(n)),
        }
    )


FILES = {"kind": "documents", "org_id": "acme", "scope_id": "kb"}


def test_maintenance_compacts_and_keeps_every_row(tmp_path: Path) -> None:
    for n in range(1, 6):
        write_rows(tmp_path, "source_files", FILES, _files(n))  # one file more each time
    table = str(tmp_path / "_state" / "source_files")
    assert len(DeltaTable(table).file_uris()) == 5
    done = maintain(tmp_path, "source_files", retention_hours=0)
    assert done["files_removed"] == 5 and done["vacuumed_files"] == 5, done
    assert read_rows(tmp_path, "source_files", FILES).height == 5
    assert len(DeltaTable(table).file_uris()) == 1


def test_a_large_partition_is_spread_over_buckets_and_an_edit_rewrites_few(
    tmp_path: Path,
) -> None:
    where = scope_where("raw_documents", "acme", "kb")
    write_rows(tmp_path, "raw_documents", where, _docs("acme", "kb", 200))
    dt = DeltaTable(str(tmp_path / "raw_documents"))
    assert len(dt.file_uris()) == 32  # every bucket of the partition has a file
    edited = _docs("acme", "kb", 200).with_columns(
        pl.when(pl.col("document_id") == "d0100")
        .then(pl.lit("edited"))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    write_rows(tmp_path, "raw_documents", where, edited)
    metrics = DeltaTable(str(tmp_path / "raw_documents")).history(1)[0]["operationMetrics"]
    assert metrics["num_target_files_removed"] == 1 and metrics["num_target_files_added"] == 1
    assert "bucket" not in read_rows(tmp_path, "raw_documents", where).columns


def test_the_maintenance_job_compacts_every_table_with_the_configured_retention(
    tmp_path: Path,
) -> None:
    import dagster as dg

    from memcity_pipeline.defs.maintenance import lake_maintenance_job, weekly_maintenance
    from memcity_pipeline.resources.lake import LakeResource

    for n in range(1, 4):
        write_rows(tmp_path, "source_files", FILES, _files(n))
    schedule = weekly_maintenance(0.0)
    config = schedule.evaluate_tick(dg.build_schedule_context()).run_requests[0].run_config
    result = lake_maintenance_job.execute_in_process(
        run_config=config,
        resources={"lake": LakeResource(lake_uri=str(tmp_path), landing_dir=str(tmp_path))},
    )
    assert result.success
    assert len(DeltaTable(str(tmp_path / "_state" / "source_files")).file_uris()) == 1
    assert read_rows(tmp_path, "source_files", FILES).height == 3


def _write_same_partition(lake: str, n: int, start: "multiprocessing.synchronize.Event") -> None:
    start.wait(30)
    where = scope_where("raw_documents", "acme", "kb")
    for text in ("first", "second", "third"):
        write_rows(lake, "raw_documents", where, _docs("acme", "kb", n, text=f"{text}-{n}"))


def test_conflicting_writers_of_one_partition_are_retried_and_one_state_wins(
    tmp_path: Path,
) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    sizes = [40, 41, 42]
    procs = [
        ctx.Process(target=_write_same_partition, args=(str(tmp_path), n, start)) for n in sizes
    ]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]  # conflicts were retried, none failed
    rows = read_rows(tmp_path, "raw_documents")
    assert rows["document_id"].is_duplicated().sum() == 0
    # The partition is exactly one writer's last state, not a mix.
    (text,) = {t.rsplit(" ", 1)[0] for t in rows["text"].to_list()}
    assert text.startswith("third-") and rows.height == int(text.split("-")[1])


def test_a_column_added_to_a_schema_joins_an_existing_table(tmp_path: Path) -> None:
    """A lake written before `chunks` had its `header` column: it reads as null, the next write
    adds the column (a metadata-only commit) and fills it, and a read of some columns works on
    either."""
    from deltalake import write_deltalake

    from memcity_pipeline.lake.tables import table

    t = table("chunks")
    old_schema = pa.schema([f for f in t.storage_schema if f.name != "header"])
    where = scope_where("chunks", "acme", "kb")
    rows = pl.DataFrame(
        {
            "org_id": ["acme"] * 2,
            "knowledge_base_id": ["kb"] * 2,
            "document_id": ["d1", "d1"],
            "chunk_id": ["c1", "c2"],
            "ordinal": [0, 1],
            "section_title": ["Intro", "Intro"],
            "start": [0, 10],
            "end": [10, 20],
            "text": ["first part", "second one"],
            "token_count": [2, 2],
            "source_key": ["k", "k"],
            "bucket": [zlib.crc32(b"d1") % 32] * 2,
        }
    )
    write_deltalake(
        str(tmp_path / "chunks"),
        rows.to_arrow().cast(old_schema),
        partition_by=t.storage_partitions,
    )
    before = read_rows(tmp_path, "chunks", where)
    assert before["header"].to_list() == [None, None]
    assert read_rows(tmp_path, "chunks", where, columns=["chunk_id", "header"]).height == 2

    with_header = before.with_columns(pl.lit("Manual › Intro").alias("header"))
    assert write_rows(tmp_path, "chunks", where, with_header) is not None
    after = read_rows(tmp_path, "chunks", where, columns=["chunk_id", "header"])
    assert after["header"].to_list() == ["Manual › Intro"] * 2
    assert "header" in DeltaTable(str(tmp_path / "chunks")).schema().to_arrow().names


# ---------------------------------------------------------------- property: a write is exact

_DOCS = [f"doc{i}" for i in range(6)]  # their buckets differ (crc32 % 32), so rows move buckets
_chunk_states = st.lists(
    st.dictionaries(
        st.sampled_from([f"c{i}" for i in range(12)]),
        st.tuples(st.sampled_from(_DOCS), st.sampled_from(["a", "b", "a longer text", ""])),
        max_size=12,
    ),
    min_size=1,
    max_size=5,
)


def _chunk_frame(state: dict[str, tuple[str, str]]) -> pl.DataFrame:
    ids = sorted(state)
    return pl.DataFrame(
        {
            "org_id": ["acme"] * len(ids),
            "knowledge_base_id": ["kb"] * len(ids),
            "document_id": [state[c][0] for c in ids],
            "chunk_id": ids,
            "ordinal": list(range(len(ids))),
            "section_title": [None] * len(ids),
            "start": [0] * len(ids),
            "end": [len(state[c][1]) for c in ids],
            "text": [state[c][1] for c in ids],
            "token_count": [1] * len(ids),
            "source_key": ["k"] * len(ids),
            "header": [None] * len(ids),
        },
        schema_overrides={"section_title": pl.String, "header": pl.String},
    )


def _as_set(frame: pl.DataFrame) -> set[tuple[object, ...]]:
    return set(frame.select(sorted(frame.columns)).iter_rows())


@given(states=_chunk_states, damage=st.booleans())
@settings(max_examples=25)
def test_any_sequence_of_writes_leaves_the_partition_exactly_the_last_state(
    tmp_path_factory: pytest.TempPathFactory, states: list[dict[str, tuple[str, str]]], damage: bool
) -> None:
    """`chunks` is keyed by chunk and bucketed by document: whatever rows come and go, change
    document (so bucket) or text, each write leaves the partition exactly the rows asked for,
    with no key twice, and the other partition untouched. A partition damaged by an earlier
    version (a row held twice, a stale row) is healed by the next write."""
    lake = tmp_path_factory.mktemp("lake")
    where = scope_where("chunks", "acme", "kb")
    other = scope_where("chunks", "acme", "other")
    bystander = _chunk_frame({"c0": ("doc0", "other kb")}).with_columns(
        knowledge_base_id=pl.lit("other")
    )
    write_rows(lake, "chunks", other, bystander)
    if damage:  # the same row twice and a stale row, as appends (no MERGE) would leave them
        append_rows(lake, "chunks", _chunk_frame({"c0": ("doc1", "a"), "c11": ("doc2", "b")}))
        append_rows(lake, "chunks", _chunk_frame({"c0": ("doc1", "a")}))
    for state in states:
        write_rows(lake, "chunks", where, _chunk_frame(state))
        back = read_rows(lake, "chunks", where)
        assert back["chunk_id"].is_duplicated().sum() == 0
        assert _as_set(back) == _as_set(_chunk_frame(state))
    assert _as_set(read_rows(lake, "chunks", other)) == _as_set(bystander)
