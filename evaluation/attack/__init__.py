"""The attack suite of issue 13 (`python -m molcloak.evaluation.attack_check`): every probe of the issue
against real `molcloak serve` processes on loopback. `context` starts the servers and holds the honest
client; `probes` (requests), `workers` (workers and key store) and `quotas` (tokens, quotas, budgets,
rate, expiry) hold the cases; `CASES` lists them in the order they run."""

from __future__ import annotations

from . import probes, quotas, workers
from .cases import Case, Outcome
from .context import Context

CASES: list[Case] = [*probes.CASES, *workers.CASES, *quotas.CASES]

__all__ = ["CASES", "Case", "Context", "Outcome"]
