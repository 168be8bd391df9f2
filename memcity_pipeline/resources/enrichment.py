"""How the enrichment phases run: LLM or off, the chunk budget, batching."""

import dagster as dg

from memcity_pipeline.settings import Settings, get_settings


class EnrichmentResource(dg.ConfigurableResource):
    """Settings of phases 1-3 (`MEMCITY_ENRICHMENT`, `MEMCITY_CHUNK_TOKENS`, ...)."""

    mode: str = "llm"  # llm | off
    chunk_tokens: int = 512
    chunk_overlap_tokens: int = 64
    chunks_per_call: int = 4
    max_workers: int = 4
    long_documents: str = "rlm"  # rlm | windowed: phase 1 of a document over the LLM's window
    rlm_max_iterations: int = 12  # root-LLM turns of one phase-1 RLM session
    rlm_max_timeout_s: float = 600.0  # wall clock of one phase-1 RLM session

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "EnrichmentResource":
        s = settings or get_settings()
        return cls(
            mode=s.enrichment,
            chunk_tokens=s.chunk_tokens,
            chunk_overlap_tokens=min(s.chunk_overlap_tokens, s.chunk_tokens // 2),
            max_workers=s.llm_max_concurrency,
            long_documents=s.long_documents,
        )

    @property
    def enabled(self) -> bool:
        if self.mode not in ("llm", "off"):
            raise ValueError(f"MEMCITY_ENRICHMENT must be 'llm' or 'off', not {self.mode!r}")
        return self.mode == "llm"

    @property
    def rlm_for_long_documents(self) -> bool:
        if self.long_documents not in ("rlm", "windowed"):
            raise ValueError(
                f"MEMCITY_LONG_DOCUMENTS must be 'rlm' or 'windowed', not {self.long_documents!r}"
            )
        return self.long_documents == "rlm"
