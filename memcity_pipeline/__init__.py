"""memcity-pipeline: documents, memories and conversations made into enriched, searchable
knowledge, and deep questions over all of it answered with Recursive Language Models.

`definitions` is the Dagster code location, `api` the Python API, `cli` the `memcity` command;
the README's "Where things are" maps every package to its role.
"""
