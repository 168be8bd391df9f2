"""The RLM engine on `rlms`: its configuration and result, context gathering from the lake,
prompts, the query loop over a sandbox session, and session logging (the lake and Postgres)."""
