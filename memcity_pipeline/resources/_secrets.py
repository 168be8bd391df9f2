"""Secrets of resources: `dg.EnvVar` fields resolved when a resource is used outside Dagster."""

from typing import Any

import dagster as dg


def secret_value(value: Any) -> str | None:
    """The value of a secret field: an `EnvVar` read from the environment, else the string."""
    if isinstance(value, dg.EnvVar):
        return value.get_value() or None
    return value or None
