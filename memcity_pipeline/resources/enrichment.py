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

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "EnrichmentResource":
        s = settings or get_settings()
        return cls(
            mode=s.enrichment,
            chunk_tokens=s.chunk_tokens,
            chunk_overlap_tokens=min(s.chunk_overlap_tokens, s.chunk_tokens // 2),
            max_workers=s.llm_max_concurrency,
        )

    @property
    def enabled(self) -> bool:
        if self.mode not in ("llm", "off"):
            raise ValueError(f"MEMCITY_ENRICHMENT must be 'llm' or 'off', not {self.mode!r}")
        return self.mode == "llm"
