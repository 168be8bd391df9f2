"""Enrichment: phase 1 document structure, phase 2 guided chunking, phase 3 chunk enrichment,
the incremental table builders of the three phases, and token counting."""
