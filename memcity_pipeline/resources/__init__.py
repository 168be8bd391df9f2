"""Thin `dg.ConfigurableResource`s over the domain packages: the lake, the LLM, embeddings,
enrichment options and sandboxes. Each builds its domain object from explicit fields; secrets
are `dg.EnvVar`s."""
