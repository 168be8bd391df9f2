"""LLMs: the OpenAI-compatible client, its persistent response cache, provider resolution, the
embedded local model server, and usage (tokens and cost)."""
