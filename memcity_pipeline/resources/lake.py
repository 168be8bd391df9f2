"""The lake resource: where the lake and the landing folder are, and ingestion limits."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
from pydantic import Field

from memcity_pipeline.ingestion.sync import Limits
from memcity_pipeline.lake.io import table_lock


class LakeResource(dg.ConfigurableResource):
    """The lake under `lake_dir`, fed from the landing folder `landing_dir`."""

    lake_dir: str = Field(description="Root folder of the lake.")
    landing_dir: str = Field(description="Where sources arrive.")
    max_file_bytes: int = Field(default=50 * 1024 * 1024, gt=0, description="Larger: refused.")
    max_document_chars: int = Field(default=2_000_000, gt=0, description="Longer: refused.")
    lock_timeout_s: float = Field(
        default=1800.0, ge=0, description="Wait for another run writing the same partition."
    )

    @property
    def lake(self) -> Path:
        return Path(self.lake_dir)

    @property
    def landing(self) -> Path:
        return Path(self.landing_dir)

    @property
    def limits(self) -> Limits:
        return Limits(self.max_file_bytes, self.max_document_chars)

    @contextmanager
    def writing(
        self, context: dg.AssetExecutionContext, table: str, scope: tuple[str, str]
    ) -> Iterator[None]:
        """Hold the write lock of one partition's (`scope`'s) part of `table` while a step
        reads, computes and writes it (another run's write of that part waits; other
        partitions go on)."""
        with table_lock(
            self.lake,
            table,
            scope,
            timeout_s=self.lock_timeout_s,
            holder=f"run {context.run_id}",
            on_wait=context.log.warning,
        ):
            yield
