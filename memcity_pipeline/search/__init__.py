"""Search: embeddings, BM25, hybrid fusion, the index builders, and retrieval (`get_context`,
`search_memories`) over one org's knowledge base or user."""
