"""How the enrichment phases run: LLM or off, the chunk budget, batching."""

from enum import StrEnum

import dagster as dg
from pydantic import Field


class EnrichmentMode(StrEnum):
    """`llm` runs the LLM phases; `off` skips them."""

    llm = "llm"
    off = "off"


class LongDocuments(StrEnum):
    """How phase 1 reads a document over the LLM's window."""

    rlm = "rlm"
    windowed = "windowed"


class EnrichmentResource(dg.ConfigurableResource):
    """Options of phases 1-3 (`MEMCITY_ENRICHMENT`, `MEMCITY_CHUNK_TOKENS`, ...)."""

    mode: EnrichmentMode = Field(
        default=EnrichmentMode.llm, description="`off` skips the LLM phases."
    )
    chunk_tokens: int = Field(default=512, gt=16, description="Token budget of a chunk.")
    chunk_overlap_tokens: int = Field(default=64, ge=0, description="Overlap between chunks.")
    chunks_per_call: int = Field(default=4, gt=0, description="Chunks enriched per LLM call.")
    max_workers: int = Field(default=4, gt=0, description="Documents worked on at once.")
    long_documents: LongDocuments = Field(
        default=LongDocuments.rlm, description="Phase 1 of a document over the LLM's window."
    )
    max_attempts: int = Field(
        default=3,
        gt=0,
        description="Runs that try a row whose LLM answer failed before it stays failed (until "
        "its input or the model changes).",
    )
    rlm_max_iterations: int = Field(default=12, gt=0, description="Turns of a phase-1 RLM.")
    rlm_max_timeout_s: float = Field(default=600.0, gt=0, description="Wall clock of one.")

    @property
    def enabled(self) -> bool:
        return self.mode == "llm"

    @property
    def rlm_for_long_documents(self) -> bool:
        return self.long_documents == "rlm"
