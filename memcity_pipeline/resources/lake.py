"""The lake resource: where the Parquet lake and the landing folder are, and ingestion limits."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from memcity_pipeline.lib.ingest import Limits
from memcity_pipeline.lib.lake import table_lock
from memcity_pipeline.settings import Settings, get_settings


class LakeResource(dg.ConfigurableResource):
    """The Parquet lake under `lake_dir`, fed from the landing folder `landing_dir`."""

    lake_dir: str
    landing_dir: str
    max_file_bytes: int = 50 * 1024 * 1024
    max_document_chars: int = 2_000_000
    lock_timeout_s: float = 1800.0

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "LakeResource":
        s = settings or get_settings()
        return cls(
            lake_dir=str(s.lake_dir),
            landing_dir=str(s.landing_dir),
            max_file_bytes=s.max_file_bytes,
            max_document_chars=s.max_document_chars,
            lock_timeout_s=s.lake_lock_timeout_s,
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
    def writing(self, context: dg.AssetExecutionContext, table: str) -> Iterator[None]:
        """Hold `table`'s write lock for an asset's whole run (another run's write waits)."""
        with table_lock(
            self.lake,
            table,
            timeout_s=self.lock_timeout_s,
            holder=f"run {context.run_id}",
            on_wait=context.log.warning,
        ):
            yield
