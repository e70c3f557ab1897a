"""One case of the attack suite: what is tried, what the server should answer, and what it did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Outcome:
    held: bool
    observed: str  # one line for the table
    figures: dict = field(default_factory=dict)  # measured values, for the JSON


@dataclass(frozen=True)
class Case:
    name: str
    expected: str  # one line for the table
    description: str  # how the case is provoked
    run: Callable  # run(ctx: Context) -> Outcome
    limit: float = 420.0  # seconds the case may take, server starts included


def outcome(checks: dict[str, bool], observed: str, **figures) -> Outcome:
    """Held if every named check is true; the names of the failed checks are appended to `observed`."""
    failed = [name for name, ok in checks.items() if not ok]
    text = observed + (f" [failed: {', '.join(failed)}]" if failed else "")
    return Outcome(not failed, text, {**figures, "checks": checks})
