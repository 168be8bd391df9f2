"""The lake's blocking checks over a run of several partitions, as a backfill makes them."""

from pathlib import Path

import dagster as dg

from memcity_pipeline.defs.indexing import memory_index
from memcity_pipeline.defs.ingestion import conversations, memories
from memcity_pipeline.settings import build_resources, get_settings


def _write_user(landing: Path, user: str) -> None:
    folder = landing / "orgs/acme/users" / user
    (folder / "conversations").mkdir(parents=True)
    (folder / "memories.jsonl").write_text(
        f'{{"id": "m1", "text": "{user} likes tea"}}\n{{"id": "m2", "text": "{user} walks"}}\n'
    )
    (folder / "conversations/s1.jsonl").write_text('{"role": "user", "content": "hello"}\n')


def test_users_sharing_memory_ids_pass_every_check_in_one_run() -> None:
    """Memory ids are each user's own: two users with `m1` in one backfill run are no
    duplicate, and every check of the run passes."""
    settings = get_settings()
    for user in ("ann", "bob"):
        _write_user(settings.landing_dir, user)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("users", ["acme/ann", "acme/bob"])
    result = dg.materialize(
        [memories, conversations, memory_index],
        instance=instance,
        resources=build_resources(settings),
        tags={
            "dagster/asset_partition_range_start": "acme/ann",
            "dagster/asset_partition_range_end": "acme/bob",
        },
    )
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {
        "memories_unique_ids": True,
        "conversations_unique_ids": True,
        "memory_index_matches_memories": True,
        "memory_bm25_matches_memories": True,
    }
