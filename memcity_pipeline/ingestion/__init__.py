"""Ingestion: the landing folder's layout and scan, parsing of every source format, and the
incremental sync of landing files into the lake's source tables."""
