"""The lake resource: where the lake (`lake_uri`: a local folder or object storage) and the
landing folder are, and the limits of inputs (ingested files and documents, an RLM query's
custom context). Object-storage credentials come from the standard environment variables of
each store (`lake.location`), never from run config."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from memcity_pipeline.ingestion.sync import Limits
from memcity_pipeline.lake.location import Lake


class LakeResource(dg.ConfigurableResource):
    """The lake at `lake_uri`, fed from the landing folder `landing_dir`."""

    lake_uri: str = Field(description="The lake: a local folder or an s3://, gs://, az:// URI.")
    landing_dir: str = Field(description="Where sources arrive.")
    max_file_bytes: int = Field(default=50 * 1024 * 1024, gt=0, description="Larger: refused.")
    max_document_chars: int = Field(default=2_000_000, gt=0, description="Longer: refused.")
    max_custom_context_chars: int = Field(
        default=20_000_000, gt=0, description="An RLM query's custom context: longer is refused."
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Convert a Parquet lake of an earlier version before a step reads it (once; a few
        folder listings when there is nothing to convert)."""
        from memcity_pipeline.lake.migrate import migrate_lake, needs_migration

        if needs_migration(self.lake):
            report = migrate_lake(self.lake)
            if context.log is not None:
                context.log.warning(report.summary(self.lake))

    @property
    def lake(self) -> Lake:
        return Lake.of(self.lake_uri)

    @property
    def landing(self) -> Path:
        return Path(self.landing_dir)

    @property
    def limits(self) -> Limits:
        return Limits(self.max_file_bytes, self.max_document_chars)
