"""`plan_rows`: what is kept, what is computed, what drops out."""

import polars as pl

from memcity_pipeline.lake.reconcile import plan_rows


def frame(rows: list[dict[str, object]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"id": pl.String, "fp": pl.String, "status": pl.String})


def test_unchanged_rows_are_kept_changed_and_new_ones_computed_and_gone_ones_dropped() -> None:
    existing = frame(
        [
            {"id": "a", "fp": "1", "status": "ok"},
            {"id": "b", "fp": "1", "status": "ok"},
            {"id": "gone", "fp": "1", "status": "ok"},
        ]
    )
    wanted = pl.DataFrame({"id": ["a", "b", "new"], "fp": ["1", "2", "1"]})
    plan = plan_rows(wanted, existing, key="id", fingerprint="fp")
    assert plan.reuse["id"].to_list() == ["a"]
    assert sorted(plan.todo["id"].to_list()) == ["b", "new"]
    assert plan.dropped == 2  # "b" is replaced, "gone" left
    assert plan.changed


def test_a_rerun_on_the_same_input_changes_nothing() -> None:
    existing = frame([{"id": "a", "fp": "1", "status": "ok"}])
    plan = plan_rows(pl.DataFrame({"id": ["a"], "fp": ["1"]}), existing, key="id", fingerprint="fp")
    assert plan.todo.height == 0 and plan.dropped == 0 and not plan.changed


def test_rows_that_are_not_reusable_are_computed_again() -> None:
    existing = frame([{"id": "a", "fp": "1", "status": "failed"}])
    plan = plan_rows(
        pl.DataFrame({"id": ["a"], "fp": ["1"]}),
        existing,
        key="id",
        fingerprint="fp",
        reusable=pl.col("status") == "ok",
    )
    assert plan.reuse.height == 0 and plan.todo["id"].to_list() == ["a"] and plan.changed


def test_a_key_with_several_rows_is_kept_only_when_all_of_them_match() -> None:
    # chunks of two documents: d1's chunks all carry the wanted key, d2's are mixed
    existing = pl.DataFrame(
        {
            "doc": ["d1", "d1", "d2", "d2"],
            "chunk": ["c1", "c2", "c3", "c4"],
            "source_key": ["k1", "k1", "k2", "old"],
        }
    )
    wanted = pl.DataFrame({"doc": ["d1", "d2"], "source_key": ["k1", "k2"]})
    plan = plan_rows(wanted, existing, key="doc", fingerprint="source_key", row_key="chunk")
    assert plan.reuse["chunk"].to_list() == ["c1", "c2"]
    assert plan.todo["doc"].to_list() == ["d2"]
    assert plan.dropped == 2


def test_an_empty_table_computes_everything() -> None:
    wanted = pl.DataFrame({"id": ["a", "b"], "fp": ["1", "2"]})
    plan = plan_rows(wanted, frame([]), key="id", fingerprint="fp")
    assert plan.todo.height == 2 and plan.reuse.height == 0 and plan.dropped == 0


def test_a_row_held_twice_is_dropped_once_so_the_table_is_rewritten() -> None:
    # a table damaged by an earlier version: one chunk twice, with the wanted fingerprint
    existing = pl.DataFrame(
        {"doc": ["d1", "d1", "d1"], "chunk": ["c1", "c1", "c2"], "source_key": ["k1"] * 3}
    )
    wanted = pl.DataFrame({"doc": ["d1"], "source_key": ["k1"]})
    plan = plan_rows(wanted, existing, key="doc", fingerprint="source_key", row_key="chunk")
    assert plan.reuse["chunk"].to_list() == ["c1", "c2"]
    assert plan.todo.height == 0 and plan.dropped == 1 and plan.changed
