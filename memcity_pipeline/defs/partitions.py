"""The two partitionings of the pipeline: one partition per knowledge base, one per user.

Keys are `<org>/<kb>` and `<org>/<user>`. They are dynamic: the landing sensor and `memcity
ingest` add a partition when its folder appears and delete it (and, through the
`sync_landing_layout` job, its data) when the folder goes. A backfill puts up to
`PARTITIONS_PER_RUN` partitions in one run; each step then handles those partitions one by one.
"""

import warnings

import dagster as dg

from memcity_pipeline.lake.tables import PARTITIONS, ScopeKind, parse_scope_key

knowledge_bases = dg.DynamicPartitionsDefinition(name=PARTITIONS["knowledge_base"])
users = dg.DynamicPartitionsDefinition(name=PARTITIONS["user"])
PARTITIONS_DEFS: dict[ScopeKind, dg.DynamicPartitionsDefinition] = {
    "knowledge_base": knowledge_bases,
    "user": users,
}

PARTITIONS_PER_RUN = 4
# Backfill policies (and the automation sensor's owners) are beta in Dagster 1.13; the warning
# would print on every load of the definitions.
for _beta in ("backfill_policy", "owners"):
    warnings.filterwarnings("ignore", message=f"Parameter `{_beta}`", category=dg.BetaWarning)
backfill_policy = dg.BackfillPolicy.multi_run(max_partitions_per_run=PARTITIONS_PER_RUN)


def partition_scopes(context: dg.AssetExecutionContext) -> list[tuple[str, str]]:
    """The (org, kb or user) pairs of the partitions this step materializes."""
    return [parse_scope_key(key) for key in context.partition_keys]
