"""Sandboxes that run LLM-written code: the backend interface and the host side of the REPL
protocol (`base`), the local bubblewrap backend, the Daytona backend and its snapshot, and the
REPL servers that run inside a sandbox (`servers/`)."""
