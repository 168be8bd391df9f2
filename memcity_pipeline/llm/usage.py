"""Usage: the tokens and cost of LLM calls, in one type that adds up.

`cost_usd` is None when no call reported a cost (local models, most OpenAI-compatible
servers): unknown, which is not zero. Adding a known cost to an unknown one gives the known one;
two unknowns stay unknown. `calls` counts LLM calls (a batched call shared by N items counts
1/N for each, so it may be fractional).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Usage:
    """Tokens and cost of one or more LLM calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    calls: float = 0

    def __add__(self, other: "Usage") -> "Usage":
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            add_costs(self.cost_usd, other.cost_usd),
            self.calls + other.calls,
        )

    def __sub__(self, other: "Usage") -> "Usage":
        """What was spent since `other` (an earlier reading of the same counter)."""
        if not isinstance(other, Usage):
            return NotImplemented
        cost = None if self.cost_usd is None else self.cost_usd - (other.cost_usd or 0.0)
        return Usage(
            self.prompt_tokens - other.prompt_tokens,
            self.completion_tokens - other.completion_tokens,
            cost,
            self.calls - other.calls,
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def share(self, parts: int) -> "Usage":
        """This usage split evenly over `parts` items (a batch's share per item)."""
        if parts <= 1:
            return self
        cost = None if self.cost_usd is None else self.cost_usd / parts
        return Usage(
            round(self.prompt_tokens / parts),
            round(self.completion_tokens / parts),
            cost,
            self.calls / parts,
        )

    def as_columns(self) -> dict[str, Any]:
        """The lake's usage columns: `llm_calls`, `prompt_tokens`, `completion_tokens`,
        `cost_usd`."""
        return {
            "llm_calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": self.cost_usd,
        }

    @classmethod
    def of_columns(cls, row: dict[str, Any]) -> "Usage":
        """The usage recorded in a row with the lake's usage columns."""
        return cls(
            int(row.get("prompt_tokens") or 0),
            int(row.get("completion_tokens") or 0),
            row.get("cost_usd"),
            float(row.get("llm_calls") or 0),
        )


def add_costs(a: float | None, b: float | None) -> float | None:
    """`a + b` where None is unknown: unknown only when both are."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def total(usages: Iterable[Usage]) -> Usage:
    """The sum of `usages` (zero usage for none)."""
    out = Usage()
    for usage in usages:
        out = out + usage
    return out
